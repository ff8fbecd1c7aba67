"""Where mtpkit caches things ($MTPKIT_CACHE, else $XDG_CACHE_HOME/mtpkit, else ~/.cache/mtpkit), and the one
way it writes a directory so that a reader never sees half of it (`atomic_dir`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("MTPKIT_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "mtpkit"


def swap_dir(tmp: Path, dest: Path) -> None:
    """Put the finished directory `tmp` at `dest`; an existing `dest` is kept as `.{name}.old` until then."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a fresh directory beside `dest` to fill; on success it replaces `dest`, on any error it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result is an ordinary directory
    try:
        yield tmp
        swap_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
