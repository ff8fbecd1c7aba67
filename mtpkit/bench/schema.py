"""The layout of a bench document (`mtpkit.bench/1`, described in docs/bench.md): the check that `report` and
`predict` run on what they are given, and the atomic writer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mtpkit.errors import MtpkitError
from mtpkit.paths import atomic_write

SCHEMA = "mtpkit.bench/1"
SUMMARY_KEYS = ("tok_per_s", "speedup", "tau", "acceptance", "c", "verify_rel", "peak_rss_mb", "rss_growth_mb",
                "peak_cuda_mb", "cuda_growth_mb", "greedy_identical", "prompts")
DOC_KEYS = ("schema", "created", "machine", "settings", "models", "methods", "skipped", "summary", "by_category",
            "greedy_mismatch", "prompts")


def check_document(doc: Any, where: str = "document") -> None:
    """Raise a one-line MtpkitError unless `doc` has the layout of docs/bench.md (this schema version)."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise MtpkitError(f"{where} is not an {SCHEMA} document (schema: {got!r})")
    missing = [k for k in DOC_KEYS if k not in doc]
    if missing:
        raise MtpkitError(f"{where}: missing {', '.join(missing)}")
    for name in ("plain", "speculative"):
        if name not in doc["summary"]:
            raise MtpkitError(f"{where}: summary has no {name!r}")
    for name, s in doc["summary"].items():
        lost = [k for k in SUMMARY_KEYS if k not in s]
        if lost or name not in doc["methods"]:
            raise MtpkitError(f"{where}: summary[{name!r}] lacks {', '.join(lost) or 'its methods entry'}")


def write_json(doc: dict[str, Any], path: str | os.PathLike) -> None:
    """Write atomically: a reader never sees half a document."""
    atomic_write(Path(path), json.dumps(doc, indent=2))
