"""The Python API: `mtpkit.load(...)` -> Session with `generate` and `stream`.

    import mtpkit
    s = mtpkit.load(target="gemma3-270m", drafter=None)   # None = the shipped default drafter, if any
    r = s.generate("def fibonacci(n):", max_new_tokens=64)
    print(r.text, r.stats.tau, r.stats.tok_per_s)

`drafter="none"` decodes without a drafter through the same loop: that is the baseline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtpkit.errors import MtpkitError
from mtpkit.runtime.loop import GenerationParams, Round, generate
from mtpkit.runtime.sampling import SamplingParams

DEFAULT_DRAFTERS = Path(__file__).parent / "drafters"  # shipped drafters: <target name>/ (config.json + safetensors)
# adaptive drafting threshold used by default on CPU: with the default drafter on this repo's 2-core CPU it
# raised the speedup from 1.37x to 1.58x on HumanEval and from 0.68x to 1.02x on MT-Bench (bench/results/v0_loop_speed/loop_cpu_*)
AUTO_MIN_CONFIDENCE = 0.3


@dataclass
class Stats:
    new_tokens: int = 0
    target_forwards: int = 0  # decode forwards (the prefill not counted)
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # accepted[i]: rounds whose draft i was accepted
    drafted_per_position: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    finish: str | None = None

    @property
    def tau(self) -> float:
        """Tokens per target forward, the bonus included (1.0 for plain decoding)."""
        return (self.new_tokens - 1) / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position, strict=True)]

    @property
    def tok_per_s(self) -> float:
        """Decode speed: tokens after the first / time after the prefill."""
        decode = self.wall_s - self.prefill_s
        return (self.new_tokens - 1) / decode if decode > 0 and self.new_tokens > 1 else 0.0

    def add(self, r: Round) -> None:
        self.new_tokens += len(r.tokens)
        if r.prefill:
            self.prefill_s += r.verify_s
        elif r.drafted or r.tokens:
            self.target_forwards += 1
            self.drafted += r.drafted
            self.accepted += r.accepted
            self.draft_s += r.draft_s
            self.verify_s += r.verify_s
            while len(self.drafted_per_position) < r.drafted:
                self.drafted_per_position.append(0)
                self.accepted_per_position.append(0)
            for i in range(r.drafted):
                self.drafted_per_position[i] += 1
                self.accepted_per_position[i] += i < r.accepted
        self.finish = r.finish or self.finish

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(tau=self.tau, acceptance=self.acceptance, tok_per_s=self.tok_per_s)
        return d


@dataclass
class Result:
    text: str
    tokens: list[int]
    stats: Stats


class Session:
    def __init__(self, backend, tokenizer, target_config, drafter_path: str | None,
                 source: dict[str, Any] | None = None, draft_temperature: float = 1.0):
        self.backend = backend
        self.draft_temperature = draft_temperature  # the drafter's calibrated factor (DrafterConfig.draft_temperature)
        self.source = source or {}  # where the target's weights came from (load_target's `source`)
        self.tokenizer = tokenizer
        self.config = target_config
        self.drafter_path = drafter_path
        self.eos = {target_config.eos_token_id}
        if tokenizer is not None:
            self.eos.add(tokenizer.eos_id)
            eot = tokenizer.sp.piece_to_id("<end_of_turn>") if hasattr(tokenizer, "sp") else -1
            if eot > 0 and tokenizer.sp.id_to_piece(eot) == "<end_of_turn>":
                self.eos.add(eot)

    def _ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise MtpkitError("empty prompt")
            if self.tokenizer is None:
                raise MtpkitError("this target has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def stream(self, prompt: str | list[int], max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int = 0, num_draft_tokens: int = 4,
               min_confidence: float | str | None = "auto", stats: Stats | None = None,
               use_drafter: bool = True, draft_temperature: float | None = None) -> Iterator[Round]:
        """Yield one Round per target forward; pass a Stats to have it filled as you go.

        use_drafter=False decodes plainly through the same loop (the baseline of every speedup).
        min_confidence (adaptive drafting): stop a draft once the drafter's top probability falls below it.
        "auto" = AUTO_MIN_CONFIDENCE on CPU, off on GPUs (there the k-step draft is one CUDA graph, and
        stopping early would need a host sync per step); None or 0 = off.
        draft_temperature (sampling only): drafts are drawn at temperature * this; None = the drafter's own
        calibrated factor. The output distribution is the target's either way.
        """
        if min_confidence == "auto":
            min_confidence = AUTO_MIN_CONFIDENCE if self.backend.device.type == "cpu" else None
        params = GenerationParams(max_new_tokens, SamplingParams(temperature, top_p, top_k), num_draft_tokens, seed,
                                  min_confidence or None,
                                  self.draft_temperature if draft_temperature is None else draft_temperature)
        ids = self._ids(prompt)
        st = stats if stats is not None else Stats()
        t0 = time.perf_counter()
        for r in generate(self.backend, ids, params, self.eos, use_drafter=use_drafter):
            st.add(r)
            st.wall_s = time.perf_counter() - t0
            yield r

    def generate(self, prompt: str | list[int], **kw: Any) -> Result:
        st = Stats()
        toks: list[int] = []
        for r in self.stream(prompt, stats=st, **kw):
            toks += r.tokens
        text = self.tokenizer.decode(toks) if self.tokenizer is not None else ""
        return Result(text, toks, st)


BACKENDS = ("torch", "mlx", "llamacpp")


def resolve_drafter(target: str, drafter: str | None) -> str | None:
    """None -> the shipped default for `target` (or no drafter if none ships); "none" -> no drafter."""
    if drafter is None:
        d = DEFAULT_DRAFTERS / str(target)
        return str(d) if (d / "config.json").exists() else None
    if drafter == "none":
        return None
    return drafter


def torch_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """--device / --dtype -> torch's: CUDA if available, bfloat16 on GPUs and float32 on CPUs by default."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MtpkitError("device cuda requested but torch sees no CUDA GPU")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          None: torch.bfloat16 if dev.type == "cuda" else torch.float32}.get(dtype)
    if dt is None:
        raise MtpkitError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    return dev, dt


def load(target: str = "gemma3-270m", drafter: str | None = None, backend: str = "torch", device: str | None = None,
         dtype: str | None = None, max_len: int = 4096, max_draft: int = 16, cuda_graphs: bool | None = None,
         random_drafter: dict[str, Any] | None = None, llamacpp: dict[str, Any] | None = None) -> Session:
    """Load target + drafter on a backend. `random_drafter` (config overrides) builds an untrained drafter
    for cost measurements; it is never used unless asked for."""
    if backend == "mlx":
        return _load_mlx(target, drafter, device, dtype, max_len, random_drafter)
    if backend == "llamacpp":
        return _load_llamacpp(target, drafter, device, dtype, max_len, max_draft, random_drafter, **(llamacpp or {}))
    from mtpkit.model.load import load_drafter, load_target
    if backend not in BACKENDS:
        raise MtpkitError(f"unknown backend {backend!r} (have: {', '.join(BACKENDS)})")
    dev, dt = torch_device_dtype(device, dtype)
    t = load_target(target, dtype=dt, device=dev)
    path = resolve_drafter(target, drafter)
    d = None
    if random_drafter is not None:
        from mtpkit.model.config import DrafterConfig
        from mtpkit.model.drafter import DrafterModel
        torch.manual_seed(0)
        d = DrafterModel(DrafterConfig.for_target(t.config, **random_drafter)).to(device=dev, dtype=dt).eval()
        path = "random"
    elif path is not None:
        d = load_drafter(path, t.config, dtype=dt, device=dev)
    from mtpkit.runtime.torch_backend import TorchBackend
    be = TorchBackend(t.model, d, max_len=max_len, max_draft=max_draft, cuda_graphs=cuda_graphs)
    return Session(be, t.tokenizer, t.config, path, t.source, d.config.draft_temperature if d is not None else 1.0)


def _load_llamacpp(target: str, drafter: str | None, device: str | None, dtype: str | None, max_len: int,
                   max_draft: int, random_drafter: dict[str, Any] | None, threads: int | None = None,
                   head: str = "auto") -> Session:
    """llama.cpp: `target` is a gemma3 .gguf (e.g. DIR/target.gguf from `mtpkit export --format gguf`);
    drafter None = its sibling `drafter.gguf` if there is one."""
    if device not in (None, "cpu"):
        raise MtpkitError(f"backend llamacpp runs on llama-cpp-python's CPU build here; --device {device} is for torch")
    if dtype is not None or random_drafter is not None:
        raise MtpkitError("backend llamacpp runs the exported GGUF weights as they are: dtype and random drafters are torch-only")
    from mtpkit.runtime.llamacpp_backend import LlamaCppBackend
    t = Path(target)
    if t.suffix != ".gguf" or not t.is_file():
        raise MtpkitError(f"backend llamacpp needs a target .gguf file, got {target!r} "
                          f"(make one with `mtpkit export --format gguf --out DIR`, then pass DIR/target.gguf)")
    if drafter is None:
        drafter = str(t.parent / "drafter.gguf") if (t.parent / "drafter.gguf").is_file() else None
    elif drafter == "none":
        drafter = None
    be = LlamaCppBackend(t, drafter, max_len=max_len, threads=threads, head=head, max_draft=max_draft)
    return Session(be, be.tokenizer, be.config, drafter, {"kind": "gguf", "path": str(t.resolve())}, be.draft_temperature)


def _load_mlx(target: str, drafter: str | None, device: str | None, dtype: str | None, max_len: int,
              random_drafter: dict[str, Any] | None) -> Session:
    """MLX: `target` is a directory from `mtpkit export --format mlx`; drafter None = its sibling `drafter/`."""
    if device not in (None, "cpu", "gpu"):
        raise MtpkitError(f"backend mlx picks its own device (MLX's default); --device {device} is for the torch backend")
    if dtype is not None or random_drafter is not None:
        raise MtpkitError("backend mlx runs the exported weights as they are: dtype and random drafters are torch-only")
    from mtpkit.runtime.mlx_blas import use_openblas
    use_openblas()  # Linux: MLX's float32 matmuls through OpenBLAS (must precede the first `import mlx`)
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError:
        raise MtpkitError("backend mlx needs mlx and mlx-lm (pip install -e '.[mlx]')") from None
    from mtpkit.runtime.mlx_backend import MLXBackend
    t = Path(target)
    if not t.is_dir():
        raise MtpkitError(f"backend mlx needs an exported target directory, got {target!r} "
                          f"(make one with `mtpkit export --format mlx --out DIR`, then pass DIR/target)")
    if drafter is None:
        drafter = str(t.parent / "drafter") if (t.parent / "drafter" / "config.json").is_file() else None
    elif drafter == "none":
        drafter = None
    be = MLXBackend(t, drafter, max_len=max_len)
    return Session(be, be.tokenizer, be.config, drafter, {"kind": "mlx-dir", "path": str(t.resolve())},
                   be.drafter.c.draft_temperature if be.drafter is not None else 1.0)
