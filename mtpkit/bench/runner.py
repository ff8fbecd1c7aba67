"""`mtpkit bench`: every method on every prompt, interleaved in one process, into one JSON document.

Per prompt and repeat the methods run back to back (their order rotates each repeat), after one
warm-up run per method that is not counted. The document's layout is `docs/bench.md`.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mtpkit.api import Stats, acceptance_warning
from mtpkit.bench.methods import (
    LOOKUP_TOKENS,
    Method,
    Run,
    Sampling,
    hf_methods,
    llamacpp_methods,
    mlx_lm_methods,
    our_methods,
    torch_methods,
)
from mtpkit.bench.schema import SCHEMA, check_document
from mtpkit.errors import MtpkitError

BASELINES = ("hf", "llamacpp", "llama_server", "mlx_lm", "torch")
GATE = ("on", "off", "both")
ROWS = ("lazy", "all", "both")
PIPELINE = ("on", "off", "both")
VERIFY = ("block", "token", "both")


@dataclass
class BenchConfig:
    target: str = "gemma3-270m"
    drafter: str | None = None  # None = the shipped default
    backend: str = "torch"
    device: str | None = None
    dtype: str | None = None
    suite: str = "humaneval"
    limit: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.0
    num_draft_tokens: int = 5
    min_confidence: float | str | None = "auto"  # as `mtpkit run`: per backend (Backend.auto_adaptive)
    repeats: int = 3
    seed: int = 0
    threads: int | None = None  # CPU threads for torch and llama.cpp (None = torch's current setting)
    baselines: str = "auto"  # auto (all installed) | none | comma list of hf, llamacpp, mlx_lm, torch
    lookup_tokens: int = LOOKUP_TOKENS
    compile: str | None = None  # torch on CUDA: torch.compile none | drafter | all captured steps (default all)
    gate: str = "on"  # on | off (fixed k) | both (speculative with the gate + speculative_fixed_k)
    branches: int = 1  # sampling: speculative drafts trees of this many branches, `speculative_chain` beside it
    verify_rows: str = "lazy"  # lazy (the backend's verify_rows where it has one) | all | both (+ speculative_all_rows)
    pipeline: str = "on"  # on (rounds queued ahead of the host where the backend can) | off | both (+ speculative_sync)
    verify: str = "block"  # sampling, a chain (a tree's too): block verification | token | both (+ speculative_token)
    llamacpp_bin: str | None = None  # llama.cpp's programs (llama_server baseline); None = MTPKIT_LLAMACPP_BIN / build cache

    def check(self) -> None:
        if self.repeats < 1:
            raise MtpkitError(f"--repeats must be >= 1, got {self.repeats}")
        if self.limit < 1:
            raise MtpkitError(f"--limit must be >= 1, got {self.limit}")
        if self.threads is not None and self.threads < 1:
            raise MtpkitError(f"--threads must be >= 1, got {self.threads}")
        if self.lookup_tokens < 1:
            raise MtpkitError(f"--lookup-tokens must be >= 1, got {self.lookup_tokens}")
        if self.branches < 1:
            raise MtpkitError(f"--branches must be >= 1, got {self.branches}")
        if self.branches > 1 and self.temperature == 0:
            raise MtpkitError("--branches applies to sampling (--temperature > 0): greedy decoding drafts one chain")
        if self.verify_rows not in ROWS:
            raise MtpkitError(f"--verify-rows must be one of {', '.join(ROWS)}, got {self.verify_rows!r}")
        if self.pipeline not in PIPELINE:
            raise MtpkitError(f"--pipeline must be one of {', '.join(PIPELINE)}, got {self.pipeline!r}")
        if self.verify not in VERIFY:
            raise MtpkitError(f"--verify must be one of {', '.join(VERIFY)}, got {self.verify!r}")
        if self.gate not in GATE:
            raise MtpkitError(f"--gate must be one of {', '.join(GATE)}, got {self.gate!r}")
        if self.llamacpp_bin is not None:
            from mtpkit.bench.llama_server import find_programs
            find_programs(self.llamacpp_bin)
        self.baseline_set()

    def baseline_set(self) -> tuple[set[str], bool]:
        """(requested baselines, whether they were asked for by name: then a missing one is an error)."""
        if self.baselines == "auto":
            return set(BASELINES), False
        if self.baselines == "none":
            return set(), True
        names = {b.strip() for b in self.baselines.split(",") if b.strip()}
        bad = names - set(BASELINES)
        if bad or not names:
            raise MtpkitError(f"unknown baselines {sorted(bad) or self.baselines!r}: use auto, none or a comma list of "
                              f"{', '.join(BASELINES)}")
        return names, True


class PeakRSS:
    """Samples this process's resident set size every `every` s while active (Linux /proc; else ru_maxrss)."""

    def __init__(self, every: float = 0.005, pid: int | None = None):
        self.every, self.peak, self._stop, self.pid = every, 0, threading.Event(), pid
        self._thread: threading.Thread | None = None

    def now(self) -> int:
        """Resident bytes of this process, or of `pid` (a server the bench drives)."""
        try:
            with open(f"/proc/{self.pid or 'self'}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            if self.pid is not None:
                return 0
            import resource
            r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return r if platform.system() == "Darwin" else r * 1024

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.now()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def machine_info(device: str) -> dict[str, Any]:
    """What produced the numbers: never compare documents whose `machine` differs."""
    import importlib.metadata as md
    torch = sys.modules.get("torch")  # the torch backend's threads and GPU, if torch is in use

    def ver(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info = {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "memory_gb": mem, "torch_threads": torch.get_num_threads() if torch else None, "device": device,
            "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
            "versions": {p: ver(p) for p in ("mtpkit", "torch", "transformers", "llama_cpp_python", "numpy")}}
    info["versions"]["python"] = platform.python_version()
    return info


def spread(prompts: list, limit: int) -> list:
    """The first `limit` prompts, taken in turn from each category when there are several (MT-Bench lists
    its 8 categories one after another: the first 8 questions would all be `writing`)."""
    cats: dict[str, list] = {}
    for p in prompts:
        cats.setdefault(p.category, []).append(p)
    if len(cats) <= 1 or limit >= len(prompts):
        return prompts[:limit]
    out: list = []
    for i in range(max(len(v) for v in cats.values())):
        out += [v[i] for v in cats.values() if i < len(v)]
    return out[:limit]


def model_info(info: dict[str, Any]) -> dict[str, Any]:
    """Sizes the predictor needs to carry per-token costs to other devices (info = backend.info())."""
    c, dc = info.target_config, info.drafter_config
    out: dict[str, Any] = {"target": {"params": info.target_params, "embedding_params": info.embedding_params,
                                      "layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
                                      "vocab_size": c.vocab_size, "tied_head": True}, "drafter": None}
    if dc is not None:
        # weights one drafter step reads: its own, plus the embedding rows its head scores
        # (dense head shared with the target: every row; centroid head: top_k clusters of vocab/centroids rows)
        if dc.head == "centroid":
            rows = dc.centroid_top_k * -(-dc.vocab_size // dc.num_centroids)
        else:
            rows = dc.vocab_size if dc.share_target_embedding else 0
        out["drafter"] = {"params": info.drafter_params, "blocks": len(dc.layer_types), "head": dc.head,
                          "params_read_per_step": info.drafter_params + rows * dc.hidden_size}
    return out


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _sum_lists(lists: list[list[int]]) -> list[int]:
    out: list[int] = []
    for li in lists:
        out += [0] * (len(li) - len(out))
        for i, v in enumerate(li):
            out[i] += v
    return out


def _build_methods(cfg: BenchConfig, session, prompts_len: int, note: Callable[[str], None]
                   ) -> tuple[list[Method], dict[str, str]]:
    gen = dict(temperature=cfg.temperature, seed=cfg.seed, num_draft_tokens=cfg.num_draft_tokens,
               min_confidence=cfg.min_confidence)
    info = session.backend.info()
    methods = our_methods(session, gen, info, gate=cfg.gate, branches=cfg.branches, rows=cfg.verify_rows,
                          pipeline=cfg.pipeline, verify=cfg.verify)
    if cfg.pipeline != "on" and session.backend.pipeline is None:
        note(f"backend {info.name} has no pipelined rounds (CUDA graphs only): --pipeline {cfg.pipeline} runs the same "
             "loop as on")
    if cfg.verify_rows != "lazy" and session.backend.verify_rows is None:
        note(f"backend {info.name} has no verify_rows (the head per row read): --verify-rows {cfg.verify_rows} runs "
             "the same verify as lazy")
    skipped: dict[str, str] = {}
    wanted, explicit = cfg.baseline_set()
    sampling = Sampling(cfg.temperature, cfg.seed, session.eos)

    def unavailable(name: str, why: str) -> None:
        if explicit:
            raise MtpkitError(f"baseline {name}: {why}")
        skipped[name] = why
        note(f"skipping baseline {name}: {why}")

    if "hf" in wanted and info.name != "torch":
        unavailable("hf", "transformers runs the torch backend's weights; this run uses another backend")
    elif "hf" in wanted:
        try:
            import transformers  # noqa: F401
        except ImportError:
            unavailable("hf", "transformers is not installed (pip install -e '.[bench]')")
        else:
            methods += hf_methods(session, sampling, cfg.lookup_tokens)
    source = getattr(session, "source", {}) or {}
    origin = source.get("origin") or source  # an exported pair's: what it was exported from
    if "torch" in wanted and info.name != "torch":  # on the torch backend `plain` is that figure
        if not source.get("target_name"):
            unavailable("torch", "the reference of this target is not known (torch_plain runs with --backend onnx)")
        else:
            try:
                import torch  # noqa: F401
            except ImportError:
                unavailable("torch", "torch is not installed (pip install -e '.[torch]')")
            else:
                methods += torch_methods(source["target_name"], gen, cfg.threads or info.threads)
    if "llamacpp" in wanted:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            unavailable("llamacpp", "llama-cpp-python is not installed (pip install -e '.[bench]')")
        else:
            if origin.get("kind") != "gguf":
                unavailable("llamacpp", "the target was not loaded from a GGUF file (nor exported from one)")
            else:
                from mtpkit.runtime.llamacpp_backend import default_threads
                n_ctx = prompts_len + cfg.max_new_tokens + cfg.lookup_tokens + 16
                methods += llamacpp_methods(origin["path"], cfg.threads or info.threads or default_threads(), n_ctx, sampling,
                                            cfg.lookup_tokens,
                                            # on a Mac llama.cpp runs on Metal: the baseline a Mac user would pick
                                            gpu=not info.on_cpu or platform.system() == "Darwin")
    if "llama_server" in wanted:
        from mtpkit.bench.llama_server import find_programs, llama_server_methods
        gpu = not info.on_cpu
        bin_dir = find_programs(cfg.llamacpp_bin, gpu=gpu)
        if bin_dir is None:
            unavailable("llama_server", "llama.cpp's programs are not built (devices/llamacpp/build.sh, or set "
                                        "MTPKIT_LLAMACPP_BIN / --llamacpp-bin)")
        elif origin.get("kind") != "gguf":
            unavailable("llama_server", "the target was not loaded from a GGUF file (nor exported from one)")
        else:
            dpath = Path(session.drafter_path) if session.drafter_path else None
            if dpath is None or dpath.suffix != ".gguf":
                dpath = None
                note("llama_server_mtp needs an exported drafter.gguf (run with --backend llamacpp on an export)")
            from mtpkit.runtime.llamacpp_backend import default_threads
            methods += llama_server_methods(bin_dir, Path(origin["path"]), dpath, threads=cfg.threads or info.threads or
                                            default_threads(), n_ctx=prompts_len + cfg.max_new_tokens + 64,
                                            k=cfg.num_draft_tokens, sampling=sampling, gpu=gpu)
    if "mlx_lm" in wanted:
        if info.name != "mlx":
            unavailable("mlx_lm", "mlx-lm baselines run with --backend mlx (an exported MLX target)")
        else:
            # the draft keeps the target's first sliding-pattern period (mlx-lm's gemma3_text needs one full layer)
            from mtpkit.export.mlx import layer_pattern
            methods += mlx_lm_methods(session.source["path"], sampling, cfg.num_draft_tokens,
                                      layer_pattern(session.config))
    return methods, skipped


def _measure(m: Method, ids: list[int], n: int, cuda: bool) -> tuple[Run, dict[str, float]]:
    """One run with its memory: the process's peak RSS, and how far it rose above where the run started
    (the method's working memory: cache, activations, logits; its weights are `weights_mb`)."""
    if cuda:
        import torch
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS(pid=getattr(m, "pid", None)) as rss:
        run = m.run(ids, n)
    mem = {"peak_rss_mb": rss.peak / 2**20, "rss_growth_mb": (rss.peak - rss.start) / 2**20}
    if cuda:
        mem["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        mem["cuda_growth_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return run, mem


def _prompt_result(m: Method, runs: list[Run], mems: list[dict[str, float]], ref: list[Run] | None,
                   plain: list[Run] | None, greedy: bool) -> dict[str, Any]:
    """One method on one prompt, over its repeats."""
    fw = [r.forwards for r in runs]
    res: dict[str, Any] = {
        "tok_per_s": _median([r.tok_per_s for r in runs]),
        "tok_per_s_runs": [r.tok_per_s for r in runs],
        "new_tokens": [len(r.tokens) for r in runs],
        "forwards": sum(fw) if None not in fw else None,  # target decode forwards over the repeats
        "tau": sum(len(r.tokens) - 1 for r in runs) / sum(fw) if None not in fw and sum(fw) else None,
        "drafted_per_position": _sum_lists([r.drafted_per_position for r in runs]),
        "accepted_per_position": _sum_lists([r.accepted_per_position for r in runs]),
        "c": None, "verify_rel": None, "identical_to_reference": None,
        **{k: max(x[k] for x in mems) if k in mems[0] else None
           for k in ("peak_rss_mb", "rss_growth_mb", "peak_cuda_mb", "cuda_growth_mb")},
    }
    if plain is not None and any(r.drafted for r in runs) and all(r.draft_s is not None for r in runs):
        # c = seconds per drafted token / seconds per plain target decode step (both measured here)
        step = sum(r.decode_s for r in plain) / max(sum(len(r.tokens) - 1 for r in plain), 1)
        res["c"] = sum(r.draft_s for r in runs) / sum(r.drafted for r in runs) / step
        # verify_rel = seconds per verify forward (k + 1 tokens) / seconds per plain decode forward (loop timers)
        plain_fwd = sum(r.verify_s for r in plain) / max(sum(r.forwards for r in plain), 1)
        res["verify_rel"] = sum(r.verify_s for r in runs) / max(sum(r.forwards for r in runs), 1) / plain_fwd
        res["draft_steps_per_forward"] = sum(r.drafted for r in runs) / max(sum(r.forwards for r in runs), 1)
    if any(r.drafted for r in runs) and all(r.draft_s is None for r in runs):  # totals only (llama-server)
        res["drafted"], res["accepted"] = sum(r.drafted for r in runs), sum(r.accepted for r in runs)
        res["draft_acceptance"] = res["accepted"] / max(res["drafted"], 1)
    if greedy and ref is not None:
        res["identical_to_reference"] = all(r.tokens == ref[0].tokens for r in runs)
    return res


def _aggregate(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Summary of one method over prompts: medians of per-prompt values, tau and acceptance from pooled counts."""
    rs = [r["results"][name] for r in rows]
    drafted = _sum_lists([r["drafted_per_position"] for r in rs])
    accepted = _sum_lists([r["accepted_per_position"] for r in rs])
    toks = sum(sum(n - 1 for n in r["new_tokens"]) for r in rs)
    # pooled tau: tokens after the first / decode forwards, over every prompt and repeat
    fw = None if any(r["forwards"] is None for r in rs) else sum(r["forwards"] for r in rs)
    ident = [r["identical_to_reference"] for r in rs if r["identical_to_reference"] is not None]
    totals = [r for r in rs if "draft_acceptance" in r]  # methods that report only totals (llama-server)
    extra = {"draft_acceptance": sum(r["accepted"] for r in totals) / max(sum(r["drafted"] for r in totals), 1)
             } if totals else {}
    return {
        "tok_per_s": _median([r["tok_per_s"] for r in rs]),
        "speedup": _median([r["speedup"] for r in rs]),
        "tau": toks / fw if fw else None,
        "acceptance": [a / d if d else 0.0 for a, d in zip(accepted, drafted, strict=True)],
        "c": _median([r["c"] for r in rs]),
        "verify_rel": _median([r["verify_rel"] for r in rs]),
        "draft_steps_per_forward": _median([r.get("draft_steps_per_forward") for r in rs]),
        **{k: max((r[k] for r in rs if r[k] is not None), default=None)
           for k in ("peak_rss_mb", "rss_growth_mb", "peak_cuda_mb", "cuda_growth_mb")},
        "greedy_identical": {"identical": sum(ident), "prompts": len(ident)} if ident else None,
        "acceptance_warning": acceptance_warning(Stats(drafted=sum(drafted), accepted=sum(accepted))),
        "prompts": len(rs),
        **extra,
    }


def measure(methods: list[Method], prompts: list, ids: list[list[int]], max_new_tokens: int, repeats: int,
            greedy: bool, cuda: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Every method on every prompt, `repeats` times in rotating order after one warm-up run each; one row per
    prompt with each method's result and its speedup over `plain`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    total = len(methods) * (1 + len(prompts) * repeats)
    bar = Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), disable=not progress, transient=True)
    rows = []
    with bar:
        task = bar.add_task("warm-up", total=total)
        for m in methods:  # warm-up (first calls, CUDA graph captures, allocator growth): not counted
            bar.update(task, description=f"warm-up {m.name}")
            m.run(ids[0], min(16, max_new_tokens))
            bar.advance(task)
        for p, x in zip(prompts, ids, strict=True):
            runs: dict[str, list[Run]] = {m.name: [] for m in methods}
            mems: dict[str, list[dict[str, float]]] = {m.name: [] for m in methods}
            for rep in range(repeats):
                order = methods[rep % len(methods):] + methods[:rep % len(methods)]
                for m in order:
                    bar.update(task, description=f"{p.id} {m.name}")
                    run, mem = _measure(m, x, max_new_tokens, cuda)
                    runs[m.name].append(run)
                    mems[m.name].append(mem)
                    bar.advance(task)
            results = {m.name: _prompt_result(m, runs[m.name], mems[m.name], runs.get(m.reference) if m.reference
                                              else None, runs["plain"], greedy) for m in methods}
            base = results["plain"]["tok_per_s"]
            for r in results.values():
                r["speedup"] = r["tok_per_s"] / base if base else None
            rows.append({"id": p.id, "category": p.category or "uncategorized", "prompt": p.text[:200],
                         "prompt_tokens": len(x), "results": results})
    return rows


def document(methods: list[Method], rows: list[dict[str, Any]], greedy: bool, *, skipped: dict[str, str],
             settings: dict[str, Any], machine: dict[str, Any], models: dict[str, Any], wall_s: float
             ) -> dict[str, Any]:
    """The result document (docs/bench.md) of `measure`'s rows: summaries overall and per category, and the
    methods whose greedy output had to match their reference and did not."""
    summary = {m.name: _aggregate(rows, m.name) for m in methods}
    cats = sorted({r["category"] for r in rows})
    by_cat = {c: {m.name: _aggregate([r for r in rows if r["category"] == c], m.name) for m in methods} for c in cats}
    for c in by_cat.values():  # keep the per-category view small: speed, speedup, tau
        for k, v in c.items():
            c[k] = {f: v[f] for f in ("tok_per_s", "speedup", "tau", "acceptance", "draft_acceptance", "prompts")
                    if f in v}
    failed = [m.name for m in methods if m.must_match and greedy and summary[m.name]["greedy_identical"]
              and summary[m.name]["greedy_identical"]["identical"] < summary[m.name]["greedy_identical"]["prompts"]]
    doc = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": settings,
        "models": models,
        "methods": {m.name: {"description": m.description, "weights": m.weights, "weights_mb": round(m.weights_mb, 1),
                             "reference": m.reference, "must_match_reference": m.must_match} for m in methods},
        "skipped": skipped,
        "summary": summary,
        "by_category": by_cat,
        "greedy_mismatch": failed,
        "prompts": rows,
        "wall_s": round(wall_s, 1),
    }
    check_document(doc)
    return doc


def run_bench(cfg: BenchConfig, note: Callable[[str], None] = lambda s: None, progress: bool = True) -> dict[str, Any]:
    """Run the bench and return the result document (see docs/bench.md)."""
    import mtpkit
    from mtpkit.runtime.loop import GenerationParams
    from mtpkit.runtime.sampling import SamplingParams
    from mtpkit.suites import load_suite
    cfg.check()
    GenerationParams(cfg.max_new_tokens, SamplingParams(cfg.temperature), cfg.num_draft_tokens)
    prompts = spread(load_suite(cfg.suite), cfg.limit)
    session = mtpkit.load(cfg.target, drafter=cfg.drafter, backend=cfg.backend, max_draft=max(16, cfg.num_draft_tokens),
                          device=cfg.device, dtype=cfg.dtype, threads=cfg.threads, compile=cfg.compile)
    if session.drafter_path is None:
        raise MtpkitError(f"no drafter for target {cfg.target!r}: pass --drafter DIR (train one with `mtpkit distill`)")
    if session.tokenizer is None:
        raise MtpkitError("this target has no tokenizer: the bench needs text prompts")
    ids = [session.tokenizer.encode(p.text) for p in prompts]
    longest = max(len(i) for i in ids)
    if longest + cfg.max_new_tokens + cfg.num_draft_tokens + 1 > session.backend.max_len:
        raise MtpkitError(f"a prompt of {longest} tokens + {cfg.max_new_tokens} new does not fit the context "
                          f"of {session.backend.max_len}")
    methods, skipped = _build_methods(cfg, session, longest, note)
    try:
        info = session.backend.info()
        greedy = cfg.temperature <= 0
        t_start = time.perf_counter()
        rows = measure(methods, prompts, ids, cfg.max_new_tokens, cfg.repeats, greedy,
                       cuda=info.device.startswith("cuda"), progress=progress)
    finally:
        for m in methods:  # servers the bench started (llama_server)
            if hasattr(m, "close"):
                m.close()
    settings = asdict(cfg)
    settings.update(threads=info.threads, resolved_drafter=session.drafter_path, device=info.device, dtype=info.dtype,
                    cuda_graphs=info.graphs, draft_temperature=session.draft_temperature,
                    compile=info.compile or cfg.compile)  # the default resolved (all on CUDA)
    doc = document(methods, rows, greedy, skipped=skipped, settings=settings, machine=machine_info(info.device),
                   models=model_info(info), wall_s=time.perf_counter() - t_start)
    return doc
