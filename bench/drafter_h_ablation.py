"""What the drafter loses without the target's hidden state (stock llama.cpp's draft-mtp on a gemma3 target feeds it
a buffer nothing writes: h = 0; docs/gguf.md). On the reference: along the target's greedy continuation, one draft
step per position with the target's h and with h = 0; top-1 agreement of the drafter's dense head with the target's
next token.

    python bench/drafter_h_ablation.py [--prompts 4] [--positions 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    import torch

    from mtpkit.api import resolve_drafter
    from mtpkit.model.drafter import target_kv
    from mtpkit.model.load import load_drafter, load_target
    from mtpkit.suites import load_suite
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--positions", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t = load_target("gemma3-270m")
    m = t.model
    d = load_drafter(resolve_drafter("gemma3-270m", None), m)
    res = {}
    with torch.no_grad():
        for suite in ("humaneval", "mtbench", "everyday"):
            hit, n = {"target_h": 0, "zero_h": 0}, 0
            for p in load_suite(suite)[:a.prompts]:
                ids = t.tokenizer.encode(p.text)[-1500:]
                cache = m.new_cache(len(ids) + a.positions + 8)
                o = m(torch.tensor([ids]), cache)
                tok, h = int(o.logits[0, -1].argmax()), o.hidden[:, -1:]
                for _ in range(a.positions):
                    preds = {}
                    for name, hh in (("target_h", h), ("zero_h", torch.zeros_like(h))):
                        x, _ = d.body(m.embed(torch.tensor([[tok]])), hh, torch.tensor([cache.length]),
                                      target_kv(cache, m.config))
                        preds[name] = int(d.dense_logits(x[0, 0]).argmax())
                    o = m(torch.tensor([[tok]]), cache)
                    nxt = int(o.logits[0, -1].argmax())
                    for k, v in preds.items():
                        hit[k] += v == nxt
                    n += 1
                    tok, h = nxt, o.hidden[:, -1:]
            res[suite] = {"positions": n, **{k: round(v / n, 3) for k, v in hit.items()}}
            print(suite, res[suite], flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
