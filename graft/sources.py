"""Where image bytes come from: local paths or fsspec URLs, checked against the ingest hash, decoded in batches.

The one read-and-decode path of featurize (local and Dask shards) and of sharded predict, so a file
that changed, vanished or cannot be decoded gives the same one-line error everywhere, and a read
that may pass (a flaky mount) stays an ``OSError`` that Prefect retries.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from graft import GraftError
from graft.images import (
    FILE_BYTES_CEILING,
    BadImage,
    Preprocess,
    RefusedFile,
    load_rgb,
    prefetch_map,
    preprocess,
    read_regular,
)


def resolve_url(root: str, path: str) -> str:
    """Where a manifest path lives: kept if absolute or a URL, else joined to ``data.root`` (a folder or URL)."""
    if "://" in path or os.path.isabs(path):
        return path
    if "://" in root:
        return f"{root.rstrip('/')}/{path}"
    return str(Path(root) / path)


def read_bytes(url: str, max_bytes: int = FILE_BYTES_CEILING) -> bytes:
    """The bytes of a local regular file (:func:`graft.images.read_regular`: a FIFO or a device is refused
    unopened), or of any fsspec URL (s3://, gs://, memory://, ...); never more than ``max_bytes``.

    Raises:
        RefusedFile: not a regular file, or over ``max_bytes`` (checked before and while reading).
    """
    if "://" not in url:
        return read_regular(url, max_bytes)
    import fsspec

    too_big = f"over the {max_bytes}-byte limit (ingest.max_file_bytes)"
    with fsspec.open(url, "rb") as fh:
        if isinstance(size := getattr(fh, "size", None), int) and size > max_bytes:
            raise RefusedFile(f"file is {size} bytes, {too_big}")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RefusedFile(f"file is {too_big}")
    return data


def is_transient(exc: BaseException | None) -> bool:
    """The one retry rule: I/O errors that may pass (not bad inputs or bad params, which fail the same way again)."""
    return isinstance(exc, OSError) and not isinstance(exc, GraftError)


def load_checked(sha: str, url: str, pp: Preprocess) -> np.ndarray:
    """Read one image, check it against its ingest hash, and preprocess it (CHW float32)."""
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise GraftError(f"{url}: not found (moved or deleted since ingest); rerun ingest") from None
    except RefusedFile as exc:  # replaced since ingest by a FIFO, a device or a huge file: never retried
        raise GraftError(f"{url}: {exc}; rerun ingest") from None
    except OSError as exc:  # kept an OSError: a transient read failure is retried by the Prefect task
        raise OSError(exc.errno, f"{url}: cannot read for featurize ({exc.strerror or exc})") from exc
    if hashlib.sha256(data).hexdigest() != sha:
        raise GraftError(f"{url} changed since ingest (content hash differs); rerun ingest")
    try:
        return preprocess(load_rgb(data, min_side=pp.resize)[0], pp)
    except BadImage as exc:
        raise GraftError(f"{url}: cannot decode for featurize ({exc}); rerun ingest") from None


def _decode(chunk: Sequence[tuple[str, str]], pp: Preprocess) -> tuple[list[str], np.ndarray]:
    return [sha for sha, _ in chunk], np.stack([load_checked(sha, url, pp) for sha, url in chunk])


def decoded_batches(
    items: Sequence[tuple[str, str]], pp: Preprocess, batch_size: int, workers: int
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(keys, NCHW batch) per ``batch_size`` (sha256, url) items, in order.

    With ``workers`` > 0 a pool of that many threads decodes at most ``workers + 1`` batches ahead
    (Pillow releases the GIL); with 0 decoding runs inline (a Dask shard that owns one core).
    """
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    decode = functools.partial(_decode, pp=pp)
    if workers:
        yield from prefetch_map(decode, chunks, workers)
    else:
        yield from map(decode, chunks)
