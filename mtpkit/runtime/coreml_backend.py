"""The Core ML backend: DIR/target.mlpackage (+ drafter.mlpackage) from `mtpkit export --format coreml`, through
`MLModel.predict` on macOS 15+ (coremltools). Needs numpy, not torch.

The programs run through `Programs.run(package, function, inputs) -> outputs`: on a Mac `CoreMLPrograms` (one MLModel
per function, and per package one MLState that every function of it shares); elsewhere nothing runs Core ML, and
the exporter's checks and the tests hand in `mtpkit.export.mil_eval.EvaluatedPrograms` (numpy evaluation of the same
programs: a test harness, not a runtime). The steps are the same either way.

Cache (coreml_graphs.py): --compute gpu keeps K/V in the package's states: a target step writes its rows by position
and the draft function reads them in place; --compute ane keeps them here, [L, KV, C, D] float16 arrays passed to
every call, the target's new rows written back at p..p+n-1 and the drafter given its two layers. Either way every
position stays: rollback is setting the length (masks are by position), and a forward one raises.
Steps: a prefill runs PREFILL-token calls, then verify-sized ones; verify(n) takes the `decode` function for one
token and `verify` (K + 1 rows, padded) for more, in pieces when n > K + 1. Padded rows write K/V past the length,
which no mask shows and the next step overwrites: max_len is at most context - K.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtpkit.errors import MtpkitError
from mtpkit.model.config import DrafterConfig, GemmaConfig
from mtpkit.runtime.backend import Backend, BackendInfo, DraftStep, Loaded, read_manifest

MANIFEST = "coreml.json"  # = mtpkit.export.coreml.MANIFEST (the exporter is not imported here)
SIBLING_DRAFTER = None  # the drafter is in coreml.json: `draft` in target.mlpackage (gpu) or drafter.mlpackage (ane)
COMPUTE_UNITS = {"gpu": "CPU_AND_GPU", "ane": "CPU_AND_NE", "cpu": "CPU_ONLY", "all": "ALL"}


@dataclass(frozen=True)
class Options:
    device: str | None = None  # compute units: gpu | ane | cpu | all (default: what the export was made for)


def load(target: str, drafter: str | None, opts: Options, *, max_len: int, max_draft: int) -> Loaded:
    """`target`: the export's DIR (or DIR/target.mlpackage); `drafter`: None = the export's own, "none" is resolved
    by the caller to None as well, so an export without a drafter runs plain."""
    d = Path(target)
    if d.suffix == ".mlpackage":
        d = d.parent
    if not (d / MANIFEST).is_file():
        raise MtpkitError(f"backend coreml needs the directory of `mtpkit export --format coreml --out DIR`, "
                          f"got {target!r}")
    if drafter is not None and Path(drafter).resolve() != d.resolve() and Path(drafter).parent.resolve() != d.resolve():
        raise MtpkitError("backend coreml runs the drafter exported with the target (coreml.json); re-export with "
                          "--drafter instead of passing one")
    m = _manifest(d)
    if opts.device is not None and opts.device not in COMPUTE_UNITS:
        raise MtpkitError(f"backend coreml: device {opts.device!r} is not one of {' | '.join(COMPUTE_UNITS)}")
    programs = CoreMLPrograms(d, m, opts.device or m["compute"])
    be = CoreMLBackend(d, m["drafter"] is not None, max_len=max_len, programs=programs)
    return Loaded(be, be.tokenizer, be.config, str(d) if be.has_drafter else None,
                  {"kind": "coreml", "path": str(d.resolve()), "quant": m["quant"], "compute": m["compute"],
                   "target_name": m.get("target_name"), "origin": m.get("target_source")})


def _manifest(d: Path) -> dict:
    return read_manifest(d / MANIFEST, "coreml", "Core ML")


class CoreMLPrograms:
    """The packages through Core ML (macOS 15+): one MLModel per function, one MLState per stateful package."""

    def __init__(self, d: Path, manifest: dict, compute: str):
        if platform.system() != "Darwin":
            raise MtpkitError("backend coreml runs on macOS 15+ (Core ML's MLModel.predict); on this "
                              f"{platform.system()} machine the export's programs are only checked, by numpy "
                              "evaluation (mtpkit export --format coreml does it)")
        try:
            import coremltools as ct
        except ImportError:
            raise MtpkitError("backend coreml needs coremltools (pip install 'mtpkit[coreml]')") from None
        self.ct, self.dir, self.units = ct, d, getattr(ct.ComputeUnit, COMPUTE_UNITS[compute])
        self.stateful = manifest["stateful"]
        self.models: dict[tuple[str, str], Any] = {}
        self.states: dict[str, Any] = {}

    def run(self, package: str, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = (package, function)
        if key not in self.models:
            self.models[key] = self.ct.models.MLModel(str(self.dir / package), compute_units=self.units,
                                                      function_name=function)
        model = self.models[key]
        if self.stateful and package == "target.mlpackage":
            if package not in self.states:
                self.states[package] = model.make_state()
            return model.predict(inputs, state=self.states[package])
        return model.predict(inputs)


class CoreMLBackend(Backend):
    def __init__(self, d: str | Path, drafter: bool = True, *, max_len: int = 2048, programs=None):
        self.dir = Path(d)
        self.manifest = m = _manifest(self.dir)
        self.config = c = GemmaConfig.from_dict(m["target_config"])
        self.context, self.k, self.stateful = m["context"], m["k"], m["stateful"]
        if max_len > self.context - self.k:
            max_len = self.context - self.k  # the context a padded verify still fits in (module docstring)
        self.vocab_size, self.max_len = c.vocab_size, max_len
        self.programs = programs if programs is not None else CoreMLPrograms(self.dir, m, m["compute"])
        self.fns = m["target"]["functions"]
        if not self.stateful:
            shape = tuple(m["cache_shape"])
            self.keys, self.values = np.zeros(shape, np.float16), np.zeros(shape, np.float16)
        self._length = 0
        self.tokenizer = None
        if (self.dir / "tokenizer.model").is_file():
            from mtpkit.tokenizer import Tokenizer
            self.tokenizer = Tokenizer.from_sentencepiece(self.dir / "tokenizer.model")
        self.dm = m["drafter"] if drafter else None
        self.dc = DrafterConfig.from_dict(m["drafter_config"]) if self.dm else None
        if self.dc is not None:
            self.dc.check_target(c)
        self.has_drafter = self.dc is not None
        self.draft_temperature = self.dc.draft_temperature if self.dc is not None else 1.0

    def info(self) -> BackendInfo:
        m, c = self.manifest, self.config
        size = _bytes(self.dir / "target.mlpackage")
        dbytes = _bytes(self.dir / self.dm["package"]) if self.dm and not self.stateful else 0
        return BackendInfo("coreml", m["compute"], m["quant"] if m["quant"] != "none" else m["precision"], None,
                           m["params"], size, c.vocab_size * c.hidden_size, c, self.dc,
                           self.dm["params"] if self.dm else 0, dbytes or (size if self.dm else 0),
                           self.dc.head if self.dc else None,
                           extra={"context": self.context, "k": self.k, "stateful": self.stateful,
                                  "programs": type(self.programs).__name__})

    # ------------------------------------------------------------------ target
    @property
    def length(self) -> int:
        return self._length

    def _call(self, fn: str, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One target function on tokens (padded to its size) at positions length.. -> logits, hidden of the real rows."""
        n, size, p = len(tokens), self.fns[fn]["tokens"], self._length
        ids = np.zeros((1, size), np.int32)
        ids[0, :n] = tokens
        inputs = {"input_ids": ids, "position": np.array([p], np.int32)}
        if not self.stateful:
            inputs.update(keys=self.keys, values=self.values)
        out = self.programs.run("target.mlpackage", fn, inputs)
        if not self.stateful:
            self.keys[:, :, p:p + n] = out["new_keys"][:, :, :n]
            self.values[:, :, p:p + n] = out["new_values"][:, :, :n]
        self._length = p + n
        return (np.asarray(out["logits"], np.float32).reshape(size, -1)[:n],
                np.asarray(out["hidden"], np.float32).reshape(size, -1)[:n])

    def _forward(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p, n = self._length, len(tokens)
        if p + n > self.max_len:
            raise MtpkitError(f"context full: {p + n} positions > {self.max_len} (the export's context "
                              f"{self.context} less {self.k} for padded verifies)")
        outs, i = [], 0
        while i < n:
            left = n - i
            fn = "prefill" if left >= self.fns["prefill"]["tokens"] else "decode" if left == 1 else "verify"
            m = min(left, self.fns[fn]["tokens"])
            outs.append(self._call(fn, tokens[i:i + m]))
            i += m
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def start(self, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if len(prompt) >= self.max_len:
            raise MtpkitError(f"prompt of {len(prompt)} tokens does not fit the context ({self.max_len})")
        self._length = 0
        logits, hidden = self._forward(np.asarray(prompt, np.int64))
        return logits[-1], hidden[-1]

    def verify(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._forward(np.asarray(tokens).reshape(-1))

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise MtpkitError(f"cannot roll back to {length}: the cache holds {self._length} positions")
        self._length = length

    # ------------------------------------------------------------------ drafter
    def draft_step(self, token: np.ndarray, h: np.ndarray) -> DraftStep:
        """One draft function call querying at position `length` (the bonus token's), reading the target's K/V."""
        if self.dc is None:
            raise MtpkitError("this backend has no drafter")
        c, dm = self.config, self.dm
        inputs = {"token": np.asarray(token, np.int32).reshape(1),
                  "h": np.asarray(h, np.float32).reshape(1, c.hidden_size),
                  "position": np.array([self._length], np.int32)}
        if not self.stateful:
            for kind in dm["kinds"]:
                layer = dm["reads_layers"][kind]
                inputs[f"keys_{kind}"], inputs[f"values_{kind}"] = self.keys[layer], self.values[layer]
        out = self.programs.run(dm["package"], "draft", inputs)
        ids = np.asarray(out["ids"]).reshape(-1).astype(np.int64) if "ids" in out else None
        return DraftStep(np.asarray(out["logits"], np.float32).reshape(-1), ids,
                         np.asarray(out["h_next"], np.float32).reshape(-1))


def _bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0
