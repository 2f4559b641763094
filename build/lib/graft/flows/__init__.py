"""Prefect flows: they only chain the stage tasks from ``tasks/``."""
