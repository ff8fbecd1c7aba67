"""Two settings of the speculative loop, A and B, against plain decoding with their order swapped per prompt.

`mtpkit bench` runs its methods in a fixed order per prompt (plain, speculative, then the extra ones), so the method
right after plain decoding meets a cold drafter (its weights and the centroid head's cached clusters evicted by the
plain run) and a comparison of two methods carries the order. Here every prompt runs plain, A, B and plain, B, A;
the speedups are reported by position, and the order-free figure of each setting is the mean over its positions.

    python bench/ab_order.py --target DIR/target.gguf --backend llamacpp --threads 2 --suite mtbench --limit 16 \
        --a '{"lazy_rows": true}' --b '{"lazy_rows": false}' [--temperature 0] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def tok_per_s(session, ids: list[int], n: int, **kw) -> float:
    """Decode speed after the first token, as `mtpkit bench` measures it."""
    t0, tokens = None, 0
    for r in session.stream(ids, max_new_tokens=n, **kw):
        if r.prefill:
            t0 = time.perf_counter()
            continue
        tokens += len(r.tokens)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    import mtpkit
    from mtpkit.bench.runner import spread
    from mtpkit.suites import load_suite
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--suite", default="mtbench")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--a", default="{}", help="JSON: Session.stream keyword arguments of setting A")
    ap.add_argument("--b", default="{}", help="... of setting B")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    opts = {} if a.threads is None else {"threads": a.threads}
    s = mtpkit.load(a.target, backend=a.backend, **opts)
    kw = {"A": json.loads(a.a), "B": json.loads(a.b)}
    res: dict[str, list[float]] = {"A 2nd": [], "B 3rd": [], "B 2nd": [], "A 3rd": []}
    for p in spread(load_suite(a.suite), a.limit):
        ids = s.tokenizer.encode(p.text)
        for name in ("plain", "A", "B"):  # warm-up
            tok_per_s(s, ids, a.max_new_tokens, temperature=a.temperature, use_drafter=name != "plain", **kw.get(name, {}))
        for first, second in (("A", "B"), ("B", "A")):
            base = tok_per_s(s, ids, a.max_new_tokens, temperature=a.temperature, use_drafter=False)
            for name, pos in ((first, "2nd"), (second, "3rd")):
                res[f"{name} {pos}"].append(tok_per_s(s, ids, a.max_new_tokens, temperature=a.temperature,
                                                      **kw[name]) / base)
    out = {"settings": vars(a), "median": {k: round(statistics.median(v), 4) for k, v in res.items()},
           "mean": {k: round(statistics.fmean(v), 4) for k, v in res.items()}}
    for x in ("A", "B"):
        out[x] = {"median_over_positions": round((out["median"][f"{x} 2nd"] + out["median"][f"{x} 3rd"]) / 2, 4),
                  "mean_over_positions": round((out["mean"][f"{x} 2nd"] + out["mean"][f"{x} 3rd"]) / 2, 4)}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
