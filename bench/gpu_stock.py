"""Stock llama-server on a GPU machine: plain vs draft-mtp with our pair, with EXACT_FLAGS and with llama-server's
defaults (bench/results/h200_stock; run there as `.stage/gpu_stock.py`, this file, from the repository root after
`bash devices/llamacpp/build.sh --cuda 90` and the pair assembled in /tmp/pair, the suites as jsonl in /tmp/st/suites).

    python bench/gpu_stock.py BIN OUT_DIR
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())
from mtpkit.bench.llama_server import LlamaServer, server_command, stock_bench  # noqa: E402
from mtpkit.bench.schema import write_json  # noqa: E402

b, out = Path(sys.argv[1]), Path(sys.argv[2])
pair = Path("/tmp/pair")
machine = {"cpu": "16 cores", "gpu": "NVIDIA H200", "platform": "Linux (lent H200)", "versions": {"llama.cpp": "0c1e570 CUDA sm_90"}}
models = {"target": {"mb": round((pair / "target.gguf").stat().st_size / 2**20, 1)},
          "drafter": {"mb": round((pair / "drafter.gguf").stat().st_size / 2**20, 1)}}
for flags in ("exact", "default"):
    kw = dict(threads=16, n_ctx=4096, k=5, gpu=True, exact=flags == "exact")
    cp = server_command(b, pair / "target.gguf", None, **kw)
    cm = server_command(b, pair / "target.gguf", pair / "drafter.gguf", **kw)
    plain, mtp = LlamaServer(cp, log=Path(f"/tmp/plain_{flags}.log")), LlamaServer(cm, log=Path(f"/tmp/mtp_{flags}.log"))
    try:
        runs = [("humaneval", 0.0), ("mtbench", 0.0), ("everyday", 0.0)] + ([("humaneval", 1.0), ("mtbench", 1.0)] if flags == "exact" else [])
        for suite, t in runs:
            settings = {"target": "target.gguf", "dtype": "GGUF", "device": "cuda", "threads": 16, "num_draft_tokens": 5,
                        "server_flags": " ".join(cp[cp.index("-ngl"):]), "command": f"python .stage/gpu_stock.py ({flags} flags)"}
            doc = stock_bench(plain, mtp, suite=f"/tmp/st/suites/{suite}.jsonl", limit=8, max_new_tokens=128,
                              temperature=t, seed=0, repeats=2, machine=machine, settings=settings, models=models, progress=False)
            name = f"gpu_{flags}_{suite}" + ("_t1" if t else "")
            write_json(doc, out / f"{name}.json")
            s = doc["summary"]
            print(name, {k: (round(v["tok_per_s"], 1), round(v["speedup"], 2), v["tau"] and round(v["tau"], 2), v.get("draft_acceptance") and round(v["draft_acceptance"], 2), v["greedy_identical"]) for k, v in s.items()}, flush=True)
    finally:
        plain.close()
        mtp.close()
