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

from mtpkit.errors import MtpkitError
from mtpkit.runtime.gate import Gate, RoundCosts
from mtpkit.runtime.loop import GenerationParams, Round, generate
from mtpkit.runtime.sampling import SamplingParams

DEFAULT_DRAFTERS = Path(__file__).parent / "drafters"  # shipped drafters: <target name>/ (config.json + safetensors)
# adaptive drafting threshold used by default on a CPU where the backend asks for it (Backend.auto_adaptive): with the
# v0 loop (no gate) on this repo's 2-core CPU it raised the speedup from 1.37x to 1.58x on HumanEval and from 0.68x to
# 1.02x on MT-Bench (bench/results/v0_loop_speed/loop_cpu_*); with the gate it pays on llama.cpp only
# (bench/results/cpu_adaptive/)
AUTO_MIN_CONFIDENCE = 0.3
DEFAULT_CONTEXT = 4096  # positions a session's cache holds unless max_len says (at most the target's)


def check_text(text: str, what: str = "the prompt") -> None:
    """Text must be valid Unicode: a command-line argument that was not UTF-8 arrives with lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f" (byte 0x{ord(bad) - 0xDC00:02x})" if 0xDC80 <= ord(bad) <= 0xDCFF else ""
        raise MtpkitError(f"{what} is not valid UTF-8 text{byte} at character {e.start}") from None


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
            self.target_forwards += r.forwards
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


# a drafter whose drafts are (almost) never accepted only costs time: NaN weights measured 0.27x plain decoding,
# random weights 0.82x; a trained one accepts tens of percent. Below this, after enough drafts, say so.
LOW_ACCEPTANCE = 0.02
LOW_ACCEPTANCE_MIN_DRAFTED = 20


def acceptance_warning(stats: Stats) -> str | None:
    """A one-line warning when at least 20 tokens were drafted and under 2 % accepted (a broken drafter, or one
    trained for another target); None otherwise."""
    if stats.drafted < LOW_ACCEPTANCE_MIN_DRAFTED or stats.accepted >= LOW_ACCEPTANCE * stats.drafted:
        return None
    return (f"warning: the target accepted {stats.accepted} of {stats.drafted} drafted tokens "
            f"({100 * stats.accepted / stats.drafted:.1f}%): the drafter is broken or was trained for another target; "
            "plain decoding (drafter 'none') would be faster")


@dataclass
class Result:
    text: str
    tokens: list[int]
    stats: Stats


class Session:
    def __init__(self, backend, tokenizer, target_config, drafter_path: str | None,
                 source: dict[str, Any] | None = None):
        self.backend = backend
        self.draft_temperature = backend.draft_temperature  # the drafter's calibrated factor
        self.source = source or {}  # where the target's weights came from (load_target's `source`)
        self.tokenizer = tokenizer
        self.config = target_config
        self.drafter_path = drafter_path
        # the online gate's state per (greedy, branches, lazy_rows, pipeline, verify): round costs and acceptance, kept
        # from one generation to the next
        self.gates: dict[tuple[bool, int, bool, bool, str], Gate] = {}
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
            check_text(prompt)
            if self.tokenizer is None:
                raise MtpkitError("this target has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def stream(self, prompt: str | list[int], max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int = 0, num_draft_tokens: int = 5,
               min_confidence: float | str | None = "auto", stats: Stats | None = None,
               use_drafter: bool = True, draft_temperature: float | None = None, gate: bool = True,
               branches: int = 1, lazy_rows: bool = True, pipeline: bool = True, verify: str = "block"
               ) -> Iterator[Round]:
        """Yield one Round per target forward; pass a Stats to have it filled as you go.

        use_drafter=False decodes plainly through the same loop (the baseline of every speedup).
        gate (default): each round drafts the k in 0..num_draft_tokens that the online gate expects to be fastest
        (runtime/gate.py; k = 0 is a plain step); gate=False drafts num_draft_tokens every round.
        min_confidence (adaptive drafting): stop a draft once the drafter's top probability falls below it.
        "auto" = AUTO_MIN_CONFIDENCE on a CPU where the backend's `auto_adaptive` asks for it at this temperature
        (llama.cpp, ONNX, Core ML; MLX at T = 0: where a verified token costs nearly a plain step, stopping a draft
        early saves verifying it), off on GPUs (there each draft step is a CUDA graph, and stopping early would need a
        host sync per step); None or 0 = off.
        draft_temperature (sampling only): drafts are drawn at temperature * this; None = the drafter's own
        calibrated factor. The output distribution is the target's either way.
        branches (sampling, the torch backend): w first-draft candidates a round, each followed by its chain, verified
        as one tree (runtime/tree.py); 1 = one chain. Greedy decoding always drafts one chain.
        lazy_rows (default): where the backend has `verify_rows` (llama.cpp on a CPU) every step (plain ones too,
        use_drafter=False included) computes the target's head only for the rows acceptance reads, by the backend's
        row head (q8_head.c); False: the backend's own step, every row (llama.cpp's decode: the bench's baseline).
        pipeline (default): where the backend can (torch on CUDA: Backend.pipeline) drafting rounds are queued ahead
        of the host, round r + 1 launched before round r is read (loop.pipelined); False: one round at a time.
        verify (sampling: a round's chain, or a draft tree's accepted one, every verify row computed): "block"
        (default) = block verification, which accepts at least as many drafts in expectation as "token" = token-wise
        rejection (sampling.accept_block_logits); both keep the target's distribution. verify_rows (llama.cpp)
        judges token-wise.
        """
        if min_confidence == "auto":
            tree = branches > 1 and temperature > 0  # a tree drafts every chain to k
            wanted = self.backend.auto_adaptive[0 if temperature == 0 else 1]
            min_confidence = AUTO_MIN_CONFIDENCE if wanted and self.backend.info().on_cpu and not tree else None
        params = GenerationParams(max_new_tokens, SamplingParams(temperature, top_p, top_k), num_draft_tokens, seed,
                                  min_confidence or None,
                                  self.draft_temperature if draft_temperature is None else draft_temperature, gate,
                                  branches, lazy_rows, pipeline, verify)
        ids = self._ids(prompt)
        st = stats if stats is not None else Stats()
        t0 = time.perf_counter()
        for r in generate(self.backend, ids, params, self.eos, use_drafter=use_drafter,
                          gate=self._gate(params)):
            st.add(r)
            st.wall_s = time.perf_counter() - t0
            yield r

    def _gate(self, params: GenerationParams) -> Gate:
        greedy = params.sampling.greedy
        # a tree's rounds cost and yield other than a chain's; a verify of every head row costs more than verify_rows;
        # a pipelined round costs less than one the host waits for; the block rule accepts more than the token-wise one
        key = (greedy, 1 if greedy else params.branches, params.lazy_rows, params.pipeline,
               "" if greedy else params.verify)
        if key not in self.gates:
            self.gates[key] = Gate(1, RoundCosts(), greedy)
        self.gates[key] = self.gates[key].for_k(params.num_draft_tokens)  # a new K keeps the round costs
        return self.gates[key]

    def generate(self, prompt: str | list[int], **kw: Any) -> Result:
        st = Stats()
        toks: list[int] = []
        for r in self.stream(prompt, stats=st, **kw):
            toks += r.tokens
        text = self.tokenizer.decode(toks) if self.tokenizer is not None else ""
        return Result(text, toks, st)


def resolve_drafter(target: str, drafter: str | None, sibling: str | None = None) -> str | None:
    """"none" -> no drafter; a path -> itself; None -> `sibling` beside an exported target file/directory if it
    exists (backends that run exports), else the drafter shipped for `target` (or no drafter if none ships)."""
    if drafter == "none":
        return None
    if drafter is not None:
        return drafter
    if sibling is not None:
        p = Path(target).parent / sibling
        return str(p) if p.is_file() or (p / "config.json").is_file() else None
    if Path(str(target)).name != str(target) or str(target) in ("", ".", ".."):
        return None  # a path, not a target's name: only names have shipped drafters
    d = DEFAULT_DRAFTERS / str(target)
    return str(d) if (d / "config.json").exists() else None


def check_drafter_dir(path: str, what: str = "drafter"):
    """A drafter directory, checked cheaply before anything slow: a config.json that parses as a drafter config,
    and *.safetensors weights (whether it fits the target is checked once it is loaded). Returns its DrafterConfig."""
    import json

    from mtpkit.model.config import DrafterConfig
    d = Path(path).expanduser()
    if not d.is_dir():
        raise MtpkitError(f"{what} {path!r} is not a directory (a drafter: config.json + *.safetensors)")
    try:
        config = DrafterConfig.from_dict(json.loads((d / "config.json").read_text()))
    except FileNotFoundError:
        raise MtpkitError(f"{what} {path!r} has no config.json (a drafter directory holds config.json + "
                          "*.safetensors)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise MtpkitError(f"{what} {path}/config.json is not valid JSON ({e})") from None
    if not any(d.glob("*.safetensors")):
        raise MtpkitError(f"{what} {path!r} has no *.safetensors weights")
    return config


def check_drafter_path(path: str) -> None:
    """The drafter a user named exists (a file for the exported formats), and a drafter directory passes
    `check_drafter_dir`: run before the target loads."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MtpkitError(f"drafter {path!r} not found ('none' = plain decoding)")
    if p.is_dir():
        check_drafter_dir(path)


def load(target: str = "gemma3-270m", drafter: str | None = None, backend: str = "torch", *,
         max_len: int | None = None, max_draft: int = 16, **options: Any) -> Session:
    """Load target + drafter on a backend (runtime/__init__.py lists them). `options` are the backend's own
    (its `Options` dataclass): torch: device, dtype, threads, cuda_graphs, compile, random_drafter (an untrained
    drafter for cost measurements, never used unless asked for); llamacpp: threads, head; mlx: device; onnx: threads.
    max_len: positions the cache holds (prompt + new tokens); default DEFAULT_CONTEXT, or the target's maximum if
    that is smaller (a larger max_len than the target's is an error)."""
    from mtpkit.runtime import backend_module, backend_options
    mod = backend_module(backend)
    opts = backend_options(mod, backend, options)
    explicit = max_len is not None
    max_len = DEFAULT_CONTEXT if max_len is None else max_len
    if max_len < 2:
        raise MtpkitError(f"the context (max_len) must be at least 2 positions, got {max_len}")
    dpath = resolve_drafter(target, drafter, mod.SIBLING_DRAFTER)
    if dpath is not None:
        check_drafter_path(dpath)  # before the target's load, which can take a while
    loaded = mod.load(target, dpath, opts, max_len=max_len, max_draft=max_draft)
    limit = loaded.config.max_position_embeddings
    if max_len > limit:
        if explicit:
            raise MtpkitError(f"a context of {max_len} positions is more than the target's {limit} "
                              "(--context / max_len)")
        loaded.backend.max_len = limit  # the default context, on a target that holds fewer positions
    return Session(loaded.backend, loaded.tokenizer, loaded.config, loaded.drafter_path, loaded.source)
