"""Calibrate a drafter's `draft_temperature`: simulated T=1 acceptance when drafts are drawn at T * s.

Rejection sampling returns the target's distribution for any draft distribution q, so s is free to choose;
the acceptance of one draft step is 1 - TV(p, q_s), and this script measures it over the same sampled target
continuations for every s (teacher-forced, k-step unrolled exactly as `mtpkit eval-drafter` does).

    python bench/draft_temperature.py --suite humaneval --limit 8 --out bench/results/cpu/draft_temperature_humaneval.json
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch

import mtpkit.distill.objective as objective
from mtpkit.api import resolve_drafter
from mtpkit.distill.data import generate_rows
from mtpkit.model.load import load_drafter, load_target
from mtpkit.suites import load_suite


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--drafter", default=None, help="drafter directory (default: the shipped one)")
    ap.add_argument("--suite", default="humaneval")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--gen-len", type=int, default=96)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--scales", default="0.6,0.7,0.8,0.9,1.0,1.15")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.monotonic()
    tgt = load_target(a.target)
    path = resolve_drafter(a.target, a.drafter)
    dr = load_drafter(path, tgt.model)
    tok = tgt.tokenizer
    ids = [tok.encode(p.text, add_bos=False)[-1024:] for p in load_suite(a.suite, a.limit)]
    pad = max(tok.pad_id, 0)
    rows = generate_rows(tgt.model, [(x, True) for x in ids], a.gen_len, batch=8, bos_id=tok.bos_id,
                         eos_id=tok.eos_id, pad_id=pad, seed=0, truncate=False)  # sampled at T=1
    accept = objective.accept_from_logits
    results = {}
    for s in [float(x) for x in a.scales.split(",")]:
        sums = torch.zeros(4 + 2 * a.k)
        with torch.no_grad(), mock.patch.object(objective, "accept_from_logits",
                                                lambda t, d, ids=None, p=None, s=s: accept(t, d / s, ids, p)):
            for i in range(0, len(rows), 8):
                b = rows.batch(torch.arange(i, min(i + 8, len(rows))), "cpu", extra=a.k + 1, pad=pad)
                res = objective.distill_step(tgt.model, dr, b, objective.Objective(k=a.k), backward=False)
                sums += objective.acceptance_sums(res, b.sampled)
        sm = objective.summarize(sums, a.k)
        results[str(s)] = {"tau1": round(sm["tau1"], 4), "accept1": sm["accept1"]}
        print(s, results[str(s)], flush=True)
    best = max(results, key=lambda s: results[s]["tau1"])
    doc = {"target": a.target, "drafter": path, "suite": a.suite, "prompts": len(ids), "gen_len": a.gen_len, "k": a.k,
           "configured_draft_temperature": dr.config.draft_temperature, "by_scale": results, "best": float(best),
           "seconds": round(time.monotonic() - t0, 1)}
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"best draft_temperature {best}: tau1 {results[best]['tau1']} (1.0: {results.get('1.0', {}).get('tau1')})")


if __name__ == "__main__":
    main()
