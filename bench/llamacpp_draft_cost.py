"""Where the llama.cpp backend's drafter time goes: one draft step timed alone (steps back to back) and inside
the loop's pattern (verify k + 1 tokens, roll back, draft k), split into llama.cpp's part (the drafter blocks,
`llama_process`) and the numpy part (the centroid head: router, candidate rows, post-projection).

    mtpkit export --format gguf --out DIR
    python bench/llamacpp_draft_cost.py DIR/target.gguf [--threads 2] [--rounds 40] [--json F]

Prints one JSON object: median ms per draft step and per part, alone and in the loop, and a plain step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import mtpkit
    from mtpkit.suites import load_suite
    s = mtpkit.load(a.target, backend="llamacpp", threads=a.threads)
    be = s.backend
    ids = s.tokenizer.encode(load_suite("humaneval")[0].text)
    parts = {"process": [], "head": []}
    process = be.L.llama_process

    def timed_process(*args):  # llama.cpp's share of a draft step
        t = time.perf_counter()
        rc = process(*args)
        parts["process"].append(time.perf_counter() - t)
        return rc
    be.L.llama_process = timed_process

    def step(tok, h):
        t = time.perf_counter()
        out = be.draft_step(tok, h)
        dt = time.perf_counter() - t
        parts["head"].append(dt - parts["process"][-1])
        return out, dt

    def med(xs):
        return round(1e3 * statistics.median(xs), 3)

    logits, h = be.start(ids)
    tok = be.ops.tokens([int(np.argmax(logits))])
    alone = [step(tok, h)[1] for _ in range(a.rounds * a.k)]
    res = {"threads": be.threads, "k": a.k, "alone_ms": med(alone), "alone_process_ms": med(parts["process"]),
           "alone_head_ms": med(parts["head"])}
    for v in parts.values():
        v.clear()
    in_loop, plain = [], []
    for _ in range(a.rounds):
        p0 = be.length
        t = time.perf_counter()
        be.verify(be.ops.tokens([int(tok[0])]))
        plain.append(time.perf_counter() - t)
        be.rollback(p0)
        be.verify(be.ops.tokens([int(tok[0])] * (a.k + 1)))
        be.rollback(p0)
        x, hh = tok, h
        for _ in range(a.k):
            out, dt = step(x, hh)
            in_loop.append(dt)
            x, hh = be.ops.tokens([int(out.ids[np.argmax(out.logits)]) if out.ids is not None
                                   else int(np.argmax(out.logits))]), out.h
    res.update(in_loop_ms=med(in_loop), in_loop_process_ms=med(parts["process"]), in_loop_head_ms=med(parts["head"]),
               plain_step_ms=med(plain), ratio=round(statistics.median(in_loop) / statistics.median(alone), 2))
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
