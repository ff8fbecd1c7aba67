"""Our exported pair in stock llama.cpp's own programs (built by devices/llamacpp/build.sh; CI builds them before
the slow tests). Slow: the real Gemma 3 270M."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtpkit.bench.llama_server import EXACT_FLAGS, LlamaServer, find_programs, run_of, server_command
from mtpkit.bench.methods import Sampling

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def programs():
    b = find_programs()
    if b is None:
        pytest.skip("llama.cpp's programs are not built (bash devices/llamacpp/build.sh)")
    return b


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from mtpkit.export.gguf import export
    out = tmp_path_factory.mktemp("stock") / "pair"
    export("gemma3-270m", None, out)
    return out


def test_llama_bench_labels_the_exported_target_by_its_file_type(programs, pair):
    r = subprocess.run([str(programs / "llama-bench"), "-m", str(pair / "target.gguf"), "-p", "0", "-n", "8", "-r", "1",
                        "-t", "2", "-o", "json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout)[0]
    assert row["model_type"] == "gemma3 270M Q4_K - Medium", row["model_type"]  # was "all F32": no file-type key
    assert row["avg_ts"] > 0


def test_llama_server_draft_mtp_loads_our_pair_and_matches_plain_greedy(programs, pair):
    """The docs' command (EXACT_FLAGS): llama-server plain and --spec-type draft-mtp on our target.gguf +
    drafter.gguf generate the same greedy tokens, with drafts accepted; the flags are the ones docs/gguf.md shows."""
    docs = (ROOT / "docs" / "gguf.md").read_text()
    commands = "".join(docs.split("```")[1::2])  # the code blocks
    assert " ".join(EXACT_FLAGS) in commands and "--spec-draft-n-max" in commands and "--draft-max" not in commands
    import mtpkit
    tok = mtpkit.load(str(pair / "target.gguf"), backend="llamacpp", max_len=512, threads=2).tokenizer
    prompts = ["def fibonacci(n):", "Translate to French: The weather is nice today.",
               "Write a short poem about the sea."]
    sp = Sampling(0.0, 0, set())
    outs = {}
    for name, dft in (("plain", None), ("mtp", pair / "drafter.gguf")):
        srv = LlamaServer(server_command(programs, pair / "target.gguf", dft, threads=2, n_ctx=1024, k=5, gpu=False))
        try:
            outs[name] = [run_of(srv.complete(tok.encode(p), 48, sp)) for p in prompts]
        finally:
            srv.close()
        assert srv.proc is None
    for a, b in zip(outs["plain"], outs["mtp"], strict=True):
        assert len(a.tokens) == 48 and a.tokens == b.tokens
        assert a.drafted == 0 and a.forwards == 47
    assert sum(r.drafted for r in outs["mtp"]) > 0 and sum(r.accepted for r in outs["mtp"]) > 0
    assert all(r.forwards < 47 for r in outs["mtp"])


def test_bench_with_the_llama_server_baseline_writes_the_schema(programs, pair, tmp_path):
    """`mtpkit bench --backend llamacpp --baselines llama_server`: ours and stock llama.cpp in one document."""
    from mtpkit.bench.runner import BenchConfig, run_bench
    doc = run_bench(BenchConfig(target=str(pair / "target.gguf"), backend="llamacpp", suite="humaneval", limit=2,
                                max_new_tokens=24, repeats=1, threads=2, baselines="llama_server"), progress=False)
    assert {"plain", "speculative", "llama_server", "llama_server_mtp"} <= set(doc["summary"])
    s = doc["summary"]["llama_server_mtp"]
    assert s["greedy_identical"] == {"identical": 2, "prompts": 2} and 0 < s["draft_acceptance"] <= 1
    assert doc["summary"]["llama_server"]["tok_per_s"] > 0 and s["peak_rss_mb"] > 100  # the server's RSS
    assert doc["greedy_mismatch"] == []


def test_android_runner_on_this_machine(programs, pair, tmp_path):
    """devices/android/bench.sh with adb replaced by tests/fake_adb.sh (this machine plays the phone) and the
    x86 build: the script's push / start / forward / bench / cleanup path, and a bench document."""
    env = dict(os.environ, ADB=str(ROOT / "tests" / "fake_adb.sh"), LLAMACPP_BIN=str(programs),
               DEVICE_DIR=str(tmp_path / "phone"), THREADS="2", LIMIT="2", REPEATS="1", MAX_NEW_TOKENS="16",
               PORT="18431", PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "devices" / "android" / "bench.sh"), str(pair), str(tmp_path / "out"),
                        "mtbench"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "bench_mtbench.json").read_text())
    from mtpkit.bench.schema import check_document
    check_document(doc)
    assert doc["machine"]["platform"].startswith("Android") and doc["summary"]["speculative"]["draft_acceptance"] > 0
    assert doc["summary"]["speculative"]["greedy_identical"]["identical"] == 2
    # the servers the script started are gone
    assert subprocess.run(["pgrep", "-f", "llama-server.*--port 1843[12]"], capture_output=True).returncode == 1
