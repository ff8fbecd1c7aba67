"""The online gate on simulated rounds with adaptive drafting: tokens per second relative to plain decoding.

    python bench/gate_sim.py [--seeds 24] [--old FILE]

A round that chose k runs draft steps until one is unsure (probability `stop` each) or k are proposed; each proposed
draft is accepted with probability `rate` (until the first rejection). It costs, in plain steps, 1 + verify per
proposed draft + draft per step run, times 5 % lognormal jitter, and 5x for 1 % of rounds. Plain decoding under
the same jitter is 1.0. `--old FILE`: another gate.py (e.g. `git show f875cb8:mtpkit/runtime/gate.py > FILE`)
run beside the committed one (bench/results/cpu_gate_outcomes/NOTES.md).
"""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np

from mtpkit.runtime import gate as committed

COSTS = {"llama-like": (0.9, 0.14), "gpu-like": (0.05, 0.12), "torch-cpu-like": (0.3, 0.15), "mlx-like": (0.35, 0.2)}
STOP_RATE = [(0.0, 0.3), (0.0, 0.6), (0.0, 0.9), (0.5, 0.3), (0.5, 0.7), (0.7, 0.35), (0.3, 0.5), (0.9, 0.5),
             (0.2, 0.85), (0.0, 0.0)]


def run(mod, stop: float, rate: float, verify: float, draft: float, seed: int, rounds: int = 400, max_k: int = 5) -> float:
    rng = np.random.default_rng(seed)
    g = mod.Gate(max_k, mod.RoundCosts())
    tokens = seconds = 0.0
    for _ in range(rounds):
        k = g.choose(max_k)
        drafted = 0
        while drafted < k and rng.random() >= stop:
            drafted += 1
        n = 0
        while n < drafted and rng.random() < rate:
            n += 1
        cost = (1.0 + verify * drafted + draft * (drafted + (drafted < k))) * rng.lognormal(0, 0.05)
        cost *= 5.0 if rng.random() < 0.01 else 1.0
        g.observe(drafted, n, cost, chose=k)
        tokens, seconds = tokens + n + 1, seconds + cost
    return tokens / seconds


def table(mod, label: str, seeds: int) -> None:
    plain = np.mean([run(mod, 0, 0, 0, 0, s, max_k=0) for s in range(seeds)])
    print(f"{label}: stop/rate " + " ".join(f"{s}/{r}" for s, r in STOP_RATE))
    for name, (verify, draft) in COSTS.items():
        vals = [np.mean([run(mod, s, r, verify, draft, seed) for seed in range(seeds)]) / plain for s, r in STOP_RATE]
        print(f"  {name:15s}", " ".join(f"{v:.3f}" for v in vals), f"min {min(vals):.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=24)
    ap.add_argument("--old", help="another gate.py to run beside the committed one")
    a = ap.parse_args()
    if a.old:
        spec = importlib.util.spec_from_file_location("gate_old", a.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        table(old, a.old, a.seeds)
    table(committed, "committed", a.seeds)


if __name__ == "__main__":
    main()
