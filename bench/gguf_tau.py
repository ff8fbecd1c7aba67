"""tau of the same drafter on the torch reference and in llama.cpp (exported GGUFs), same prompts, greedy.

    python bench/gguf_tau.py --gguf-dir DIR [--limit 4] [--max-new-tokens 64] [-k 4] --out F.json
Issue 7 asks the GGUF drafter's tau to be within 10 % of the torch reference's."""

from __future__ import annotations

import argparse
import json
import time

import torch

import mtpkit
from mtpkit.suites import load_suite


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf-dir", required=True)
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sessions = {"torch": mtpkit.load("gemma3-270m", backend="torch", device="cpu"),
                "llamacpp_centroid": mtpkit.load(f"{a.gguf_dir}/target.gguf", backend="llamacpp",
                                                 threads=a.threads, head="centroid"),
                "llamacpp_dense": mtpkit.load(f"{a.gguf_dir}/target.gguf", backend="llamacpp",
                                              threads=a.threads, head="dense")}
    out = {"k": a.k, "max_new_tokens": a.max_new_tokens, "limit": a.limit, "results": {}}
    for suite in ("humaneval", "mtbench"):
        prompts = load_suite(suite, limit=a.limit)
        for name, s in sessions.items():
            new = fw = 0
            t0 = time.perf_counter()
            for p in prompts:
                r = s.generate(p.text, max_new_tokens=a.max_new_tokens, num_draft_tokens=a.k, min_confidence=None)
                new += r.stats.new_tokens - 1
                fw += r.stats.target_forwards
            out["results"][f"{suite}/{name}"] = {"tau": new / fw, "seconds": round(time.perf_counter() - t0, 1)}
            print(suite, name, f"tau {new / fw:.2f}", flush=True)
        ref = out["results"][f"{suite}/torch"]["tau"]
        for name in sessions:
            out["results"][f"{suite}/{name}"]["vs_torch"] = out["results"][f"{suite}/{name}"]["tau"] / ref
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
