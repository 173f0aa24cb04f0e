"""What the study scripts (reproduce_dnat.py, reproduce_nvm.py) share: their output folder and their progress log."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def study_folder(out: Path | None, prefix: str) -> Path:
    """``out`` (made if missing), or a new temporary folder named ``prefix...``."""
    folder = out or Path(tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def progress_log(t_start: float) -> Callable[[str], None]:
    """A logger to stderr that stamps each line with wall seconds since ``t_start`` and this process's CPU seconds."""

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s, cpu {time.process_time():6.1f} s] {msg}", file=sys.stderr,
              flush=True)

    return log
