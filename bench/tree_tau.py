"""Loop tau of draft trees against one chain, and of block verification against token-wise rejection, at T > 0 and
fixed k (gate off), on the real target: tokens per target forward of the loop itself (loop-faithful), the same
prompts and seeds for every (k, w, verify). Acceptance does not depend on the device, so this CPU run says what
trees or the block rule give a GPU's rounds in tokens; their price is the GPU's to measure. A tree's accepted chain
is judged by the rule named too.

    python bench/tree_tau.py --suite humaneval --limit 10 --widths 1,2,3,4 -k 2,3,5 --new 64 --json OUT
    python bench/tree_tau.py --suite mtbench --per-category 2 ...
    python bench/tree_tau.py --widths 1,2 --verify token,block ...
"""

from __future__ import annotations

import argparse
import json
import time

import mtpkit
from mtpkit.suites import load_suite


def chosen_prompts(suite: str, limit: int, per_category: int | None) -> list:
    """The suite's first `limit` prompts, or the first `per_category` of each category."""
    prompts = load_suite(suite, None)
    if not per_category:
        return prompts[:limit]
    by: dict[str, list] = {}
    for p in prompts:
        by.setdefault(p.category, []).append(p)
    return [p for v in by.values() for p in v[:per_category]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="humaneval")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--per-category", type=int, help="the first N prompts of each category instead of --limit")
    ap.add_argument("--widths", default="1,2,3,4", help="first-draft candidates w (1 = one chain)")
    ap.add_argument("-k", default="2,3,5", help="drafts per chain")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--verify", default="token", help="rules for a chain (one a round, or a tree's accepted one): token, block, e.g. token,block")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=1, help="generations per prompt (seeds 0..)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    t0 = time.monotonic()
    s = mtpkit.load("gemma3-270m", threads=a.threads)
    prompts = chosen_prompts(a.suite, a.limit, a.per_category)
    ids = [s.tokenizer.encode(p.text) for p in prompts]
    res = {"suite": a.suite, "prompts": len(prompts), "per_category": a.per_category, "new": a.new, "temperature": a.temperature, "seeds": a.seeds,
           "configs": []}
    for k in (int(x) for x in a.k.split(",")):
        for w, verify in ((w, v) for w in (int(x) for x in a.widths.split(",")) for v in a.verify.split(",")):
            per_cat: dict[str, list[int]] = {}
            first = [0, 0]  # rounds, rounds whose first draft was accepted
            for p, x in zip(prompts, ids, strict=True):
                for seed in range(a.seeds):
                    rounds = list(s.stream(x, max_new_tokens=a.new, temperature=a.temperature, seed=seed,
                                           num_draft_tokens=k, gate=False, branches=w, min_confidence=None,
                                           verify=verify))[1:]
                    c = per_cat.setdefault(p.category, [0, 0])
                    c[0] += sum(len(r.tokens) for r in rounds)
                    c[1] += sum(r.forwards for r in rounds)
                    first[0] += sum(r.drafted > 0 for r in rounds)
                    first[1] += sum(r.accepted > 0 for r in rounds)
            tok, fwd = sum(c[0] for c in per_cat.values()), sum(c[1] for c in per_cat.values())
            row = {"w": w, "k": k, "verify": verify, "tau": tok / fwd, "first_accepted": first[1] / max(first[0], 1),
                   "categories": {c: v[0] / v[1] for c, v in per_cat.items()}, "tokens": tok, "forwards": fwd}
            res["configs"].append(row)
            print(f"k={k} w={w} {verify}: tau {row['tau']:.3f}, first draft accepted {row['first_accepted']:.3f} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    res["wall_s"] = time.monotonic() - t0
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
