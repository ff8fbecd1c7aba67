"""Plain vs speculative decoding speed of our torch loop, on one machine, in one process (JSON out).

    python bench/loop_speed.py --device cpu --drafter random --out bench/results/loop_cpu.json
    python bench/loop_speed.py --device cuda --drafter DIR --hf --out bench/results/loop_h100.json

Per prompt, interleaved: plain decoding through our loop (the baseline), speculative decoding, and
optionally transformers `generate` on the same weights. Reports tok/s (median over repeats, a warm-up
round excluded), tau, acceptance per draft position, c = drafter step cost / target decode step cost
(from the loop's own timers), the verify cost of k+1 tokens relative to one, and whether greedy
outputs were identical. `--drafter random` measures costs with an untrained drafter (acceptance ~0).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mtpkit  # noqa: E402
from mtpkit.api import Stats  # noqa: E402

FALLBACK_PROMPTS = [
    "def fibonacci(n):", "The capital of France is", "import numpy as np\n\ndef softmax(x):\n",
    "Once upon a time, in a small village by the sea,",
]
RANDOM_DRAFTER = {"share_target_embedding": True, "head": "centroid", "intermediate_size": 2048}


def prompts(suite: str | None, limit: int) -> list[str]:
    if suite:
        from mtpkit.suites import load_suite
        return [p.text for p in load_suite(suite, limit)]
    return FALLBACK_PROMPTS[:limit]


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_once(s, prompt: str, use_drafter: bool, kw: dict) -> tuple[Stats, list[int]]:
    s.backend.has_drafter = use_drafter and s.drafter_path is not None
    r = s.generate(prompt, **kw)
    return r.stats, r.tokens


def hf_speed(s, prompt: str, max_new_tokens: int, model) -> tuple[float, list[int]]:
    ids = torch.tensor([s.tokenizer.encode(prompt)], device=s.backend.device)
    if ids.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    if ids.is_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    return len(new) / dt, new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--drafter", default="random", help="drafter directory, or 'random' (untrained, for costs)")
    ap.add_argument("--drafter-config", default=json.dumps(RANDOM_DRAFTER), help="JSON overrides for --drafter random")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--suite", default=None, help="humaneval | mtbench | FILE (default: 4 built-in prompts)")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("-k", "--num-draft-tokens", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--min-confidence", type=float, default=0.0, help="adaptive drafting threshold (0 = off)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--hf", action="store_true", help="also time transformers generate on the same weights")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rnd = json.loads(a.drafter_config) if a.drafter == "random" else None
    s = mtpkit.load(a.target, drafter=None if rnd else a.drafter, device=a.device, dtype=a.dtype,
                    random_drafter=rnd, cuda_graphs=False if a.no_cuda_graphs else None,
                    max_draft=max(16, a.num_draft_tokens))
    dev = s.backend.device
    kw = dict(max_new_tokens=a.max_new_tokens, num_draft_tokens=a.num_draft_tokens, temperature=a.temperature,
              min_confidence=a.min_confidence)
    hf = None
    if a.hf:
        from mtpkit.hf import hf_model
        t = s.backend.target
        hf = hf_model(t.config, t.state_dict(), dtype=t.embed_tokens.weight.dtype, device=dev,
                      attn="sdpa" if dev.type == "cuda" else "eager")
    ps = prompts(a.suite, a.limit)
    for use in (False, True):  # warm-up: first calls, graph captures
        run_once(s, ps[0], use, {**kw, "max_new_tokens": min(16, a.max_new_tokens)})
    rows = []
    for p in ps:
        plain_runs, spec_runs, hf_runs = [], [], []
        for _ in range(a.repeats):
            plain_runs.append(run_once(s, p, False, kw))
            spec_runs.append(run_once(s, p, True, kw))
            if hf is not None:
                hf_runs.append(hf_speed(s, p, a.max_new_tokens, hf))
        pl, sp = plain_runs[-1][0], spec_runs[-1][0]
        row = {
            "prompt": p[:60],
            "plain_tok_s": statistics.median(r[0].tok_per_s for r in plain_runs),
            "spec_tok_s": statistics.median(r[0].tok_per_s for r in spec_runs),
            "tau": sp.tau, "acceptance": sp.acceptance,
            "c": (sp.draft_s / sp.drafted) / (pl.verify_s / pl.target_forwards) if sp.drafted else None,
            "verify_cost_rel": (sp.verify_s / sp.target_forwards) / (pl.verify_s / pl.target_forwards),
            "identical": (plain_runs[-1][1] == spec_runs[-1][1]) if a.temperature == 0 else None,
        }
        row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]
        if hf_runs:
            row["hf_tok_s"] = statistics.median(r[0] for r in hf_runs)
            row["hf_identical"] = hf_runs[-1][1] == plain_runs[-1][1][:len(hf_runs[-1][1])] if a.temperature == 0 else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    med = lambda key: statistics.median(r[key] for r in rows if r.get(key) is not None)  # noqa: E731
    summary = {"plain": {"tok_per_s": med("plain_tok_s"), "speedup": 1.0, "tau": 1.0},
               "speculative": {"tok_per_s": med("spec_tok_s"), "speedup": med("speedup"), "tau": med("tau"),
                               "c": med("c") if any(r["c"] is not None for r in rows) else None,
                               "verify_cost_rel": med("verify_cost_rel")}}
    if hf is not None:
        summary["hf_generate"] = {"tok_per_s": med("hf_tok_s"), "speedup": med("hf_tok_s") / med("plain_tok_s"),
                                  "tau": 1.0}
    out = {"bench": "loop_speed", "machine": machine(dev), "device": str(dev), "dtype": str(s.backend.target.embed_tokens.weight.dtype),
           "target": a.target, "drafter": s.drafter_path if not rnd else {"random": rnd},
           "drafter_params": sum(p.numel() for p in s.backend.drafter.parameters()) if s.backend.drafter else 0,
           "cuda_graphs": s.backend.cuda_graphs, "settings": vars(a), "summary": summary, "prompts": rows,
           "all_greedy_identical": all(r["identical"] for r in rows) if a.temperature == 0 else None}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
