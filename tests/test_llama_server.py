"""The llama-server driver of the bench (mtpkit/bench/llama_server.py, bench/stock_llamacpp.py) against a stand-in
HTTP server that answers like llama-server: request bodies, timings -> Run, the stock-only document, one-line
errors. The real programs are exercised in tests/test_stock_llamacpp.py (slow)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mtpkit.bench.llama_server import EXACT_FLAGS, LlamaServer, find_programs, run_of, server_command, stock_bench
from mtpkit.bench.methods import Sampling
from mtpkit.errors import MtpkitError


class _Fake(BaseHTTPRequestHandler):
    """/health, /tokenize (one id per byte + BOS), /completion (counts up from the last prompt id; `mtp` servers
    report drafts: 2 accepted of every 3)."""
    mtp = False
    bodies: list = []

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"status": "ok"}) if self.path == "/health" else self._send(404, {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append((self.path, body))
        if self.path == "/tokenize":
            return self._send(200, {"tokens": [2] + list(body["content"].encode())[:20]})
        if body.get("n_predict", 0) > 1000:
            return self._send(400, {"error": {"message": "context exceeded"}})
        n = body["n_predict"]
        toks = [(body["prompt"][-1] + i + 1) % 1000 for i in range(n)]
        tm = {"predicted_n": n, "predicted_ms": 10.0 * (n - 1)}
        if self.mtp:
            tm.update(draft_n=3 * (n // 4), draft_n_accepted=2 * (n // 4))
            tm["predicted_ms"] /= 2
        self._send(200, {"tokens": toks, "timings": tm, "stop_type": "limit"})


@pytest.fixture
def fake():
    servers = []

    def start(mtp=False):
        handler = type("H", (_Fake,), {"mtp": mtp, "bodies": []})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}", handler
    yield start
    for s in servers:
        s.shutdown()


def test_completion_request_and_run(fake):
    url, h = fake()
    srv = LlamaServer(url=url)
    r = run_of(srv.complete([2, 5, 7], 9, Sampling(0.0, 3, set())))
    path, body = h.bodies[-1]
    assert path == "/completion" and body["prompt"] == [2, 5, 7] and body["n_predict"] == 9
    assert body["temperature"] == 0 and body["top_k"] == 1 and body["cache_prompt"] is False and body["return_tokens"]
    assert r.tokens == list(range(8, 17)) and r.decode_s == pytest.approx(0.08) and r.forwards == 8
    assert r.tok_per_s == pytest.approx(100.0)
    srv.complete([2], 4, Sampling(1.0, 3, set()))  # sampling: the target's distribution, no truncation
    body = h.bodies[-1][1]
    assert body["temperature"] == 1.0 and body["top_k"] == 0 and body["top_p"] == 1.0 and body["min_p"] == 0.0
    with pytest.raises(MtpkitError, match="HTTP 400.*context exceeded"):
        srv.complete([2], 5000, Sampling(0.0, 0, set()))


def test_forwards_from_the_draft_counters(fake):
    url, _ = fake(mtp=True)
    r = run_of(LlamaServer(url=url).complete([2], 17, Sampling(0.0, 0, set())))
    # 17 tokens, 4 rounds of 3 drafts, 8 accepted: every forward yields one token + its accepted drafts
    assert (r.drafted, r.accepted, r.forwards) == (12, 8, 16 - 8)


def test_stock_bench_document(fake, tmp_path):
    (p_url, _), (m_url, _) = fake(), fake(mtp=True)
    doc = stock_bench(LlamaServer(url=p_url), LlamaServer(url=m_url), suite="mtbench", limit=3, max_new_tokens=17,
                      temperature=0.0, seed=0, repeats=2, progress=False,
                      machine={"cpu": "test", "gpu": None, "platform": "Android 15", "versions": {}},
                      settings={"target": "t.gguf", "dtype": "GGUF", "threads": 4, "num_draft_tokens": 5,
                                "command": "python bench/stock_llamacpp.py pair"},
                      models={"target": {"mb": 10.0}, "drafter": {"mb": 2.0}})
    s = doc["summary"]
    assert s["speculative"]["tau"] == pytest.approx(16 / 8) and s["speculative"]["speedup"] == pytest.approx(2.0)
    assert s["speculative"]["greedy_identical"] == {"identical": 3, "prompts": 3}
    assert s["speculative"]["draft_acceptance"] == pytest.approx(8 / 12) and "draft_acceptance" not in s["plain"]
    assert len(doc["by_category"]) == 3 and doc["methods"]["speculative"]["weights_mb"] == 12.0
    from mtpkit.bench.report import markdown
    md = markdown(doc)
    assert "Reproduce: `python bench/stock_llamacpp.py pair`" in md and "speculative 0.67" in md and "torch" not in md


def test_server_command_and_programs(tmp_path, monkeypatch):
    cmd = server_command(tmp_path, tmp_path / "t.gguf", tmp_path / "d.gguf", threads=3, n_ctx=512, k=4, gpu=False)
    s = " ".join(cmd)
    assert " ".join(EXACT_FLAGS) in s and "--spec-type draft-mtp --spec-draft-n-max 4" in s and "-t 3 -tb 3" in s
    assert "--spec-type" not in " ".join(server_command(tmp_path, tmp_path / "t.gguf", None, threads=1, n_ctx=64,
                                                        k=4, gpu=False))
    # on a GPU llama-server's defaults (the flags neither give identity there nor come free), unless asked for
    g = " ".join(server_command(tmp_path, tmp_path / "t.gguf", None, threads=1, n_ctx=64, k=4, gpu=True))
    assert "-ngl all" in g and "-ctk" not in g
    assert " ".join(EXACT_FLAGS) in " ".join(server_command(tmp_path, tmp_path / "t.gguf", None, threads=1, n_ctx=64,
                                                            k=4, gpu=True, exact=True))
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MTPKIT_LLAMACPP_BIN", raising=False)
    assert find_programs() is None
    b = tmp_path / "cache" / "llamacpp" / "0.3.36-cpu" / "bin"
    b.mkdir(parents=True)
    (b / "llama-server").write_text("")
    assert find_programs() == b
    monkeypatch.setenv("MTPKIT_LLAMACPP_BIN", str(tmp_path / "nowhere"))
    with pytest.raises(MtpkitError, match="nowhere/llama-server not found"):
        find_programs()


def test_the_android_runner_uses_the_exact_flags():
    from pathlib import Path
    script = (Path(__file__).resolve().parents[1] / "devices" / "android" / "bench.sh").read_text()
    assert f'FLAGS="{" ".join(EXACT_FLAGS)}"' in script


def test_server_that_dies_while_loading_is_one_line(tmp_path):
    log = tmp_path / "srv.log"
    with pytest.raises(MtpkitError, match="exited with code 3 while loading: boom"):
        LlamaServer(["sh", "-c", "echo boom; exit 3", "--"], log=log, timeout=20)


def test_bench_cli_refuses_a_wrong_llamacpp_bin(tmp_path):
    from typer.testing import CliRunner

    from mtpkit.cli import app
    r = CliRunner().invoke(app, ["bench", "--llamacpp-bin", str(tmp_path)])
    assert r.exit_code == 2 and "llama-server not found" in r.output and "Traceback" not in r.output
