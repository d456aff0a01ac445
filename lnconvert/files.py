"""Low-level file helpers: output paths checked up front, atomic writes."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def check_output_path(path: str | Path, force: bool) -> Path:
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output path {path} is a directory; give a file name")
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory {parent} is not writable")
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temp path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    # keep the real suffix last: torch.export checks it
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent or ".")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the user's usual permissions
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave a partial file
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
