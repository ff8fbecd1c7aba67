"""Runtime backends by name. Each `mtpkit/runtime/<module>.py` exposes `Options` (a dataclass of its load-time
options), `load(target, drafter, options, max_len=..., max_draft=...) -> backend.Loaded` and `SIBLING_DRAFTER`
(the drafter found beside an exported target, or None); api.load and the CLI dispatch through this table."""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

from mtpkit.errors import MtpkitError

BACKENDS = {"torch": "mtpkit.runtime.torch_backend", "llamacpp": "mtpkit.runtime.llamacpp_backend",
            "mlx": "mtpkit.runtime.mlx_backend", "onnx": "mtpkit.runtime.onnx_backend",
            "coreml": "mtpkit.runtime.coreml_backend"}
EXTRAS = {"torch": "torch", "llamacpp": "gguf", "mlx": "mlx", "onnx": "onnx", "coreml": "coreml"}  # pip extra that installs each backend's library


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise MtpkitError(f"unknown backend {name!r} (have: {', '.join(BACKENDS)})")
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as e:
        if (e.name or "mtpkit").startswith("mtpkit"):
            raise
        raise MtpkitError(f"backend {name} needs {e.name or 'a library that is not installed'} "
                          f"(pip install 'mtpkit[{EXTRAS[name]}]')") from None


def backend_options(mod: ModuleType, name: str, given: dict[str, Any]):
    """The backend's Options from keyword options; None values mean "the backend's default"."""
    fields = [f.name for f in dataclasses.fields(mod.Options)]
    bad = sorted(k for k, v in given.items() if v is not None and k not in fields)
    if bad:
        raise MtpkitError(f"backend {name} has no option {bad[0]!r} (its options: {', '.join(fields) or 'none'})")
    return mod.Options(**{k: v for k, v in given.items() if v is not None})
