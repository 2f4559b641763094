"""graft: transfer learning for image classification (feature transfer and fine-tuning)."""

__version__ = "0.1.0"


class GraftError(Exception):
    """An expected failure with a one-line, actionable message (bad input, missing file, bad params)."""
