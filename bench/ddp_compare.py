"""Compare a 1-process and an N-process distillation run at the same global batch (JSON out).

    python bench/ddp_compare.py RUN_1GPU RUN_NGPU --machine "2x H200" --out bench/results/ddp_h200x2.json

Each RUN is a `mtpkit distill` output directory (log.jsonl + summary.json). Reports the train-loss
curves side by side (max / mean / final relative difference) and the throughput scaling efficiency
= (s_per_step_1 / s_per_step_N) / N.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run: Path) -> tuple[list[float], dict]:
    losses = [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines() if '"train"' in x]
    return losses, json.loads((run / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("one", type=Path)
    ap.add_argument("many", type=Path)
    ap.add_argument("--machine", required=True)
    ap.add_argument("--command", default="")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    l1, s1 = load(a.one)
    ln, sn = load(a.many)
    n = sn["world_size"]
    rel = [abs(x - y) / abs(x) for x, y in zip(l1, ln, strict=True)]
    eff = (s1["throughput"]["s_per_step"] / sn["throughput"]["s_per_step"]) / n
    out = {"bench": "ddp_compare", "machine": a.machine, "command": a.command, "world_size": n, "steps": len(l1),
           "global_batch_same": True, "loss_1": l1, f"loss_{n}": ln,
           "loss_rel_diff": {"step0": rel[0], "max": max(rel), "mean": sum(rel) / len(rel), "final": rel[-1]},
           "s_per_step": {"1": s1["throughput"]["s_per_step"], str(n): sn["throughput"]["s_per_step"]},
           "scaling_efficiency": eff,
           "final_eval": {"1": s1["final"], str(n): sn["final"]}}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("world_size", "loss_rel_diff", "s_per_step", "scaling_efficiency")}, indent=2))


if __name__ == "__main__":
    main()
