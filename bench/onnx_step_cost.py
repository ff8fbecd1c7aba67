"""The ONNX Runtime backend's step costs, each timed alone: a plain target step, verifies of 2..k + 1 tokens (rolled
back each time) and one draft step, after a prefill, as medians; verify_rel and c are relative to the plain step.
Also how far a verify of k + 1 tokens is from the same tokens run one step at a time (logits, hidden).

    mtpkit export --format onnx --out DIR
    python bench/onnx_step_cost.py DIR/target.onnx [--threads 2] [--prompt-len 150] [--repeats 10] [--json F]
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
    ap.add_argument("--prompt-len", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import mtpkit
    be = mtpkit.load(a.target, backend="onnx", threads=a.threads, max_len=a.prompt_len + a.k + 8).backend
    _, h = be.start(list(range(1000, 1000 + a.prompt_len)))
    p = be.length

    def median_ms(f) -> float:
        f()  # warm-up
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return 1000 * statistics.median(ts)

    def verify(n: int) -> None:
        be.rollback(p)
        be.verify(np.arange(5, 5 + n))

    out = {"target": a.target, "threads": be.threads, "prompt_len": a.prompt_len, "dtype": be.info().dtype,
           "verify_ms": {n: median_ms(lambda n=n: verify(n)) for n in range(1, a.k + 2)}}
    toks = np.arange(5, 5 + a.k + 1)
    single = []
    for i, t in enumerate(toks):  # one token at a time, then all of them in one verify: same positions, same cache
        be.rollback(p + i)
        lg, hs = be.verify(np.array([t]))
        single.append((lg[0].copy(), hs[0].copy()))
    be.rollback(p)
    lg, hs = be.verify(toks)
    # not bitwise in ONNX Runtime (MLAS picks kernels by row count); int8 activations amplify it
    out["verify_vs_single_steps"] = {
        "max_abs_logit_diff": max(float(np.abs(lg[i] - s[0]).max()) for i, s in enumerate(single)),
        "max_abs_hidden_diff": max(float(np.abs(hs[i] - s[1]).max()) for i, s in enumerate(single))}
    plain = out["verify_ms"][1]
    out["verify_rel"] = {n: t / plain for n, t in out["verify_ms"].items()}
    if be.has_drafter:
        be.rollback(p)
        out["draft_step_ms"] = median_ms(lambda: be.draft_step(np.array([5]), h))
        out["c"] = out["draft_step_ms"] / plain
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
