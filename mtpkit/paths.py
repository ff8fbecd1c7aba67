"""Where mtpkit caches things: $MTPKIT_CACHE, else $XDG_CACHE_HOME/mtpkit, else ~/.cache/mtpkit."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("MTPKIT_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "mtpkit"
