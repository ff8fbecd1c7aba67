"""The ONNX Runtime backend: DIR/target.onnx and DIR/drafter.onnx (`mtpkit export --format onnx`) in two
onnxruntime InferenceSessions driven through I/O binding. Needs onnxruntime and numpy, not torch.

Cache: per target layer one key and one value buffer [1, KV, max_len, D] float32, allocated once. A target step at
positions p..p+n-1 binds as `past_key_values.{i}.*` the rows it may attend (full layers: 0..p-1; sliding layers the
last window - 1, the graph masks by position) as views of these buffers, and binds each `present.{i}.*` output to
the rows p..p+n-1, so ONNX Runtime reads the cache in place and writes the new K/V straight into it by index:
nothing of the cache is copied per step. (That needs the bound rows to be contiguous, true with one KV head as in
Gemma 3 270M and 1B; with several, each bound view is copied once per step.) Every position stays in the buffers,
sliding layers included: rollback is setting the length, exact at any depth past the window; forward raises.
A draft step binds the same buffers: the drafter's K/V inputs carry the target's input names (onnx.json).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtpkit.errors import MtpkitError
from mtpkit.model.config import SLIDING, DrafterConfig, GemmaConfig
from mtpkit.runtime.backend import Backend, BackendInfo, DraftStep, Loaded, read_manifest

MANIFEST = "onnx.json"  # = mtpkit.export.onnx.MANIFEST (that module is not imported here: it is the exporter)
SIBLING_DRAFTER = "drafter.onnx"  # `mtpkit export --format onnx` writes it beside target.onnx


@dataclass(frozen=True)
class Options:
    device: str | None = None  # cpu only: the PyPI onnxruntime wheel has the CPU execution provider
    threads: int | None = None  # ONNX Runtime's intra-op threads; default: the CPUs this process may use


def load(target: str, drafter: str | None, opts: Options, *, max_len: int, max_draft: int) -> Loaded:
    """`target`: DIR/target.onnx from `mtpkit export --format onnx`; `drafter`: a drafter.onnx or None."""
    if opts.device not in (None, "cpu"):
        raise MtpkitError(f"backend onnx runs on the cpu here (onnxruntime's CPU provider), got device {opts.device!r}")
    if opts.threads is not None and opts.threads < 1:
        raise MtpkitError(f"threads must be >= 1, got {opts.threads}")
    t = Path(target)
    if t.suffix != ".onnx" or not t.is_file() or not (t.parent / MANIFEST).is_file():
        raise MtpkitError(f"backend onnx needs DIR/target.onnx from `mtpkit export --format onnx --out DIR`, "
                          f"got {target!r}")
    be = ONNXBackend(t.parent, drafter, max_len=max_len, threads=opts.threads)
    m = be.manifest
    return Loaded(be, be.tokenizer, be.config, drafter, {"kind": "onnx", "path": str(t.resolve()), "quant": m["quant"],
                                                          "target_name": m.get("target_name"),
                                                          "origin": m.get("target_source")})


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MtpkitError("backend onnx needs onnxruntime (pip install -e '.[onnx]')") from None
    return onnxruntime


def _manifest(d: Path) -> dict:
    return read_manifest(d / MANIFEST, "onnx", "ONNX")


def _bind_in(io, name: str, a: np.ndarray, keep: list) -> None:
    """Bind `a` in place (a copy only if it is not contiguous); `keep` holds it until the run is over."""
    a = np.ascontiguousarray(a)
    keep.append(a)
    io.bind_input(name, "cpu", 0, a.dtype.type, list(a.shape), a.ctypes.data)


def _bind_out(io, name: str, a: np.ndarray) -> None:
    """ONNX Runtime writes output `name` into the contiguous array `a`."""
    io.bind_output(name, "cpu", 0, a.dtype.type, list(a.shape), a.ctypes.data)


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _file_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in (p, p.with_name(p.name + ".data")) if f.exists())


class ONNXBackend(Backend):
    def __init__(self, target_dir: str | Path, drafter: str | Path | None = None, *, max_len: int = 4096,
                 threads: int | None = None):
        ort = _ort()
        self.dir = Path(target_dir)
        self.manifest = m = _manifest(self.dir)
        self.config = c = GemmaConfig.from_dict(m["target_config"])
        self.vocab_size, self.max_len = c.vocab_size, max_len
        self.threads = threads or _default_threads()
        self._ort = ort
        self.target = self._session(self.dir / m["target"]["file"])
        names = m["target"]["inputs"][3:], m["target"]["outputs"][2:]
        self.past = [names[0][2 * i:2 * i + 2] for i in range(c.num_hidden_layers)]  # [(key, value) input names]
        self.present = [names[1][2 * i:2 * i + 2] for i in range(c.num_hidden_layers)]
        shape = (1, c.num_key_value_heads, max_len, c.head_dim)
        self.kv = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(c.num_hidden_layers)]
        self._length = 0
        self.tokenizer = None
        if (self.dir / "tokenizer.model").is_file():
            from mtpkit.tokenizer import Tokenizer
            self.tokenizer = Tokenizer.from_sentencepiece(self.dir / "tokenizer.model")
        self.drafter = self.dc = None
        if drafter is not None:
            self._load_drafter(Path(drafter))
        self.has_drafter = self.drafter is not None
        self.draft_temperature = self.dc.draft_temperature if self.dc is not None else 1.0

    def _session(self, path: Path, spin: bool = True):
        so = self._ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        if not spin:  # the drafter's pool must not spin after its step: the target's pool runs next on the same cores
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return self._ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for missing or damaged files
            raise MtpkitError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None

    def _load_drafter(self, path: Path) -> None:
        if path.suffix != ".onnx" or not path.is_file():
            raise MtpkitError(f"backend onnx needs a drafter.onnx file, got {str(path)!r}")
        dm = _manifest(path.parent)
        if dm.get("drafter") is None or dm["drafter"]["file"] != path.name:
            raise MtpkitError(f"{path}: its onnx.json lists no drafter of that name")
        if dm["target_sha256"] != self.manifest["target_sha256"]:
            raise MtpkitError(f"drafter {path} was exported with another target than {self.dir / 'target.onnx'}")
        self.dc = DrafterConfig.from_dict(dm["drafter_config"])
        self.dc.check_target(self.config)
        self.drafter_manifest = dm["drafter"]
        self.drafter_path = path
        self.drafter = self._session(path, spin=False)

    def close(self) -> None:
        self.target = self.drafter = None

    def info(self) -> BackendInfo:
        m, c, dm = self.manifest, self.config, getattr(self, "drafter_manifest", None)
        return BackendInfo("onnx", "cpu", "float32" if m["quant"] == "none" else m["quant"], self.threads,
                           m["target"]["params"], _file_bytes(self.dir / m["target"]["file"]),
                           c.vocab_size * c.hidden_size, c, self.dc, dm["params"] if dm else 0,
                           _file_bytes(self.drafter_path) if dm else 0, self.dc.head if self.dc else None,
                           extra={"opset": m["opset"], "quant": m["quant"], "drafter_quant": m.get("drafter_quant"),
                                  "onnxruntime": self._ort.__version__})

    # ------------------------------------------------------------------ target
    @property
    def length(self) -> int:
        return self._length

    def _first(self, layer: int, p: int) -> int:
        """First cached position a query at p (or later) may attend in `layer`."""
        c = self.config
        return max(0, p - c.sliding_window + 1) if c.layer_types[layer] == SLIDING else 0

    def _forward(self, tokens: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens [n] at positions length..length+n-1 -> (logits [len(rows), V] of those rows, hidden [n, d])."""
        c, p, n = self.config, self._length, len(tokens)
        if p + n > self.max_len:
            raise MtpkitError(f"context full: {p + n} positions > {self.max_len}")
        io, keep, copies = self.target.io_binding(), [], []
        _bind_in(io, "input_ids", tokens.astype(np.int64).reshape(1, n), keep)
        _bind_in(io, "position_ids", np.arange(p, p + n, dtype=np.int64)[None], keep)
        _bind_in(io, "logits_indices", rows, keep)
        for i, bufs in enumerate(self.kv):
            a = self._first(i, p)
            for buf, past, present in zip(bufs, self.past[i], self.present[i], strict=True):
                _bind_in(io, past, buf[:, :, a:p], keep)
                new = buf[:, :, p:p + n]
                if not new.flags.c_contiguous:  # several KV heads: through a scratch array
                    copies.append((new, np.empty(new.shape, np.float32)))
                    new = copies[-1][1]
                _bind_out(io, present, new)
        logits = np.empty((1, len(rows), c.vocab_size), np.float32)
        hidden = np.empty((1, n, c.hidden_size), np.float32)
        _bind_out(io, "logits", logits)
        _bind_out(io, "hidden_states", hidden)
        self.target.run_with_iobinding(io)
        for dst, src in copies:
            dst[...] = src
        self._length = p + n
        return logits[0], hidden[0]

    def start(self, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if len(prompt) >= self.max_len:
            raise MtpkitError(f"prompt of {len(prompt)} tokens does not fit the context ({self.max_len})")
        self._length = 0
        logits, hidden = self._forward(np.asarray(prompt), np.array([len(prompt) - 1], np.int64))
        return logits[0], hidden[-1]

    def verify(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.asarray(tokens).reshape(-1)
        return self._forward(tokens, np.arange(len(tokens), dtype=np.int64))

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise MtpkitError(f"cannot roll back to {length}: the cache holds {self._length} positions")
        self._length = length  # every position is kept: exact at any depth, sliding layers included

    # ------------------------------------------------------------------ drafter
    def draft_step(self, token: np.ndarray, h: np.ndarray) -> DraftStep:
        """One drafter forward querying at position `length` (the bonus token's), reading the target's buffers."""
        if self.drafter is None:
            raise MtpkitError("this backend has no drafter")
        c, dc, q = self.config, self.dc, self._length
        io, keep = self.drafter.io_binding(), []
        _bind_in(io, "token", np.asarray(token, np.int64).reshape(1), keep)
        _bind_in(io, "h", np.asarray(h, np.float32).reshape(1, c.hidden_size), keep)
        _bind_in(io, "position", np.array([q], np.int64), keep)
        names = self.drafter_manifest["inputs"][3:]
        for j, kind in enumerate(self.drafter_manifest["kinds"]):
            layer = self.drafter_manifest["reads_layers"][kind]
            a = self._first(layer, q)
            for buf, name in zip(self.kv[layer], names[2 * j:2 * j + 2], strict=True):
                _bind_in(io, name, buf[:, :, a:q], keep)
        n = dc.vocab_size if dc.head == "dense" else dc.centroid_top_k * dc.tokens_per_centroid
        out = {"logits": np.empty(n, np.float32), "h_next": np.empty(c.hidden_size, np.float32)}
        if dc.head == "centroid":
            out["ids"] = np.empty(n, np.int64)
        for name, a in out.items():
            _bind_out(io, name, a)
        self.drafter.run_with_iobinding(io)
        return DraftStep(out["logits"], out.get("ids"), out["h_next"])
