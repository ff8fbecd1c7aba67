"""Is greedy speculative output token-identical to plain greedy output on this backend/device/dtype?

    python bench/identity_check.py --device cuda --dtype bfloat16 --out bench/results/identity_h100_bf16.json

Uses the oracle drafter (mtpkit.runtime.oracle): it drafts the known plain continuation with 20 % of
tokens corrupted, so long runs are accepted and verified k + 1 at a time. Any difference comes from
numerics that depend on the verify width (batch-variant kernels), which this measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mtpkit  # noqa: E402
from mtpkit.bench.runner import machine_info  # noqa: E402
from mtpkit.runtime.loop import GenerationParams, generate  # noqa: E402
from mtpkit.runtime.oracle import OracleDrafter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--suite", default="humaneval", help="humaneval | mtbench | FILE.jsonl")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("-k", "--num-draft-tokens", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    s = mtpkit.load(a.target, drafter="none", device=a.device, dtype=a.dtype)
    rows = []
    from mtpkit.suites import load_suite
    for i, p in enumerate(q.text for q in load_suite(a.suite, a.limit)):
        ids = s.tokenizer.encode(p)
        plain = [t for r in generate(s.backend, ids, GenerationParams(a.max_new_tokens), s.eos) for t in r.tokens]
        be = OracleDrafter(s.backend, plain, len(ids), corrupt=0.2, seed=i)
        rounds = list(generate(be, ids, GenerationParams(a.max_new_tokens, num_draft_tokens=a.num_draft_tokens), s.eos))
        spec = [t for r in rounds for t in r.tokens]
        first = next((j for j, (x, y) in enumerate(zip(spec, plain, strict=False)) if x != y), None)
        rows.append({"prompt": p[:60], "identical": spec == plain, "first_difference": first, "tokens": len(plain),
                     "accepted": sum(r.accepted for r in rounds), "rounds": len(rounds) - 1})
        print(json.dumps(rows[-1]), flush=True)
    info = s.backend.info()
    out = {"bench": "identity_check", "machine": machine_info(info.device), "device": info.device,
           "dtype": info.dtype, "cuda_graphs": info.graphs,
           "settings": vars(a), "identical": sum(r["identical"] for r in rows), "prompts": len(rows), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"{out['identical']}/{out['prompts']} identical")


if __name__ == "__main__":
    main()
