"""User text (labels, paths, reasons) as graft's outputs show it: never markup, never a formula.

Labels and file names come from users and reach ``reports/report.md`` and the CSV files. In the
report they are shown as typed (HTML and Markdown link syntax escaped, one line per cell); in a CSV
a cell that a spreadsheet would run as a formula (``=cmd|...``, ``+``, ``-``, ``@``) gets a leading
``'``, the usual neutraliser, and :func:`csv_unescape` gives the original back exactly.
"""

from __future__ import annotations

import html
import re
from typing import Any

_MARKDOWN = re.compile(r"([\\`\[\]|])")  # a table separator, code spans, link and image syntax
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")  # "'" too, so that unescaping is exact
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def md_cell(value: object) -> str:
    """``value`` as literal text in a Markdown table cell: one line, no HTML tags, no links, no '|'."""
    text = " ".join(str(value).splitlines())
    return _MARKDOWN.sub(r"\\\1", html.escape(text, quote=False))


def csv_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: strings starting like a formula get a leading "'"."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_unescape(value: object) -> object:
    """The inverse of :func:`csv_cell`, for graft's own readers of its CSV files."""
    if isinstance(value, str) and value.startswith("'") and value[1:].startswith(_FORMULA_START):
        return value[1:]
    return value


def csv_safe(frame: Any) -> Any:
    """A copy of a pandas DataFrame with every text cell passed through :func:`csv_cell`."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    out = frame.copy()
    for col in out.columns:
        if is_object_dtype(out[col].dtype) or is_string_dtype(out[col].dtype):  # pandas 3 has a str dtype
            out[col] = out[col].map(csv_cell)
    return out
