"""Run the real ``graft`` CLI with every atomic publish delayed, so a test can SIGKILL it mid-write.

Usage: ``python -m tests.faults.slow_cli SECONDS <graft arguments>``

Only ``os.replace`` is slowed, and only for paths under the current folder (the test workspace):
it is the last step of :func:`graft.atomic.atomic_path`, so during the delay a finished temporary
file waits beside its final path. The stage code itself runs unchanged; the delay only makes the
moment of the kill deterministic (after at least one publish, during another).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> int:
    delay = float(sys.argv[1])
    here = Path.cwd().resolve()
    real_replace = os.replace

    def slow_replace(src, dst, *args, **kwargs):
        if Path(dst).resolve().is_relative_to(here):
            time.sleep(delay)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = slow_replace
    from graft.cli import main as graft_main

    return graft_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
