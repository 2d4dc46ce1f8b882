"""Files written whole or not at all: a crash, a kill or ComfyUI's interrupt during a write leaves
the previous state (or nothing), never a truncated file under the real name."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; it becomes ``path`` (an atomic rename on
    the same file system) only when the block finishes, and is removed if it does not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
