"""Block verification's gain on the same rounds: the loop runs with token-wise rejection at fixed k (gate off), and
for every sampled round both rules' expected tokens are computed from its drafts, q and the target's rows (exactly,
no sampling): token-wise 1 + sum_i prod_{j <= i} min(1, p_j / q_j); block 1 + sum_i i P(n = i) with
P(n = i) = h_i prod_{j > i} (1 - h_j) (sampling.accept_block_logits's h). The texts are the same for both, so the
ratio is the rule's own gain, without the text-to-text spread of two sampled runs.

    python bench/block_gain.py --suite mtbench --per-category 2 -k 2,3,5 --new 96 --json OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tree_tau import chosen_prompts  # noqa: E402

import mtpkit  # noqa: E402
import mtpkit.runtime.loop as loop  # noqa: E402
from mtpkit.runtime.sampling import accept_rejection_logits, scaled  # noqa: E402


def expected(ops, drafts, picks, q, ids, logits, sp) -> tuple[float, float]:
    """(token-wise, block) expected tokens of one round (accepted drafts + the next token); torch's ops."""
    x = scaled(ops, logits, sp).log_softmax(-1).double()
    p = x.exp()
    K = drafts.shape[0]
    pd = p[torch.arange(K), drafts]
    qd = q.double()[torch.arange(K), picks]
    a = (pd / qd).clamp(max=1)
    token = 1 + a.cumprod(0).sum().item()
    w = [1.0]
    for i in range(K):
        w.append(min(1.0, w[-1] * (pd[i] / qd[i]).item()))
    h = []
    for i in range(1, K + 1):
        if i == K:
            h.append(w[K])
            continue
        row = p[i]
        pc = row if ids is None else row[ids[i]]
        outside = 0.0 if ids is None else 1 - pc.sum().item()
        rho = w[i] * outside + (w[i] * pc - q[i].double()).clamp(min=0).sum().item()
        den = rho + 1 - w[i]
        h.append(rho / den if den > 0 else 0.0)
    block, stay = 1.0, 1.0
    for i in range(K, 0, -1):
        block += i * stay * h[i - 1]
        stay *= 1 - h[i - 1]
    return token, block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="mtbench")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--per-category", type=int)
    ap.add_argument("-k", default="2,3,5")
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    t0 = time.monotonic()
    s = mtpkit.load("gemma3-270m", threads=a.threads)
    prompts = chosen_prompts(a.suite, a.limit, a.per_category)
    seen: list[tuple[str, float, float]] = []
    category = [""]

    def recording(ops, drafts, picks, q, ids, logits, sp, u, k=None):
        if drafts.shape[0]:  # (k = 0: a plain step where the budget leaves no room for drafts)
            seen.append((category[0], *expected(ops, drafts, picks, q, ids, logits, sp)))
        return accept_rejection_logits(ops, drafts, picks, q, ids, logits, sp, u, k)
    loop.VERIFY["token"] = recording
    res = {"suite": a.suite, "prompts": len(prompts), "new": a.new, "temperature": a.temperature, "configs": []}
    for k in (int(x) for x in a.k.split(",")):
        seen.clear()
        for p in prompts:
            category[0] = p.category
            list(s.stream(s.tokenizer.encode(p.text), max_new_tokens=a.new, temperature=a.temperature,
                          num_draft_tokens=k, gate=False, min_confidence=None, verify="token"))
        cats = sorted({c for c, _, _ in seen})
        per = {c: [sum(x[i] for x in seen if x[0] == c) / sum(1 for x in seen if x[0] == c) for i in (1, 2)]
               for c in cats}
        tw, bl = (sum(x[i] for x in seen) / len(seen) for i in (1, 2))
        row = {"k": k, "rounds": len(seen), "token_tau": tw, "block_tau": bl, "gain": bl / tw,
               "categories": {c: {"token_tau": v[0], "block_tau": v[1], "gain": v[1] / v[0]} for c, v in per.items()}}
        res["configs"].append(row)
        print(f"k={k}: {len(seen)} rounds, expected tokens a round token-wise {tw:.3f}, block {bl:.3f} "
              f"({bl / tw:.3f}x; categories {min(v[1] / v[0] for v in per.values()):.3f}-"
              f"{max(v[1] / v[0] for v in per.values()):.3f}x) ({time.monotonic() - t0:.0f} s)", flush=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
