"""MLX export + backend vs the torch reference on tiny random targets (mlx[cpu] on Linux): logits, drafts,
greedy speculative == plain past the sliding window, rollback, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import mtpkit
from mtpkit.cli import app
from mtpkit.model.config import FULL, SLIDING
from mtpkit.runtime.sampling import SamplingParams
from mtpkit.runtime.torch_backend import TorchBackend
from tests.conftest import fails_cleanly, tiny_drafter, tiny_target

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

LAYERS = [SLIDING, FULL, SLIDING, FULL]  # mlx-lm's gemma3_text pattern p = 2


def _pair(seed: int, head: str):
    t = tiny_target(seed, vocab_size=288, num_hidden_layers=4, layer_types=LAYERS, final_logit_softcapping=None,
                    sliding_window=4)
    kw = dict(head=head, share_target_embedding=True, hidden_size=t.config.hidden_size)
    if head == "centroid":
        kw.update(num_centroids=16, centroid_top_k=4)
    return t, tiny_drafter(t, seed, **kw)


def _export(t, d, tmp_path, int8=False):
    from mtpkit.export.mlx import write_target
    from mtpkit.model.load import save_drafter
    write_target(t, None, tmp_path / "target", dtype="float32")
    save_drafter(d, tmp_path / "drafter", int8=int8)
    return tmp_path / "target", tmp_path / "drafter"


def test_mlx_reads_an_int8_drafter_and_its_calibration(tmp_path):
    """Parity, losslessness and sampling are in tests/test_backend_contract.py; this checks an int8-stored drafter
    (like the shipped one) read directly by the MLX backend: its drafts equal the reference's on the same weights."""
    from mtpkit.model.load import load_drafter
    from mtpkit.runtime.draft import draft
    t, d = _pair(3, "centroid")
    _export(t, d, tmp_path, int8=True)
    d = load_drafter(tmp_path / "drafter", t)  # the reference runs the same dequantized weights
    d.config.draft_temperature = 0.7
    _export(t, d, tmp_path, int8=True)
    s = mtpkit.load(str(tmp_path / "target"), backend="mlx")
    assert s.draft_temperature == pytest.approx(0.7)
    mb, tb = s.backend, TorchBackend(t, d, max_len=64)
    prompt = list(range(5, 17))  # 12 tokens: past the window of 4
    _, hb = tb.start(prompt)
    mb.start(prompt)
    for bonus in (7, 100):
        got = draft(mb, mb.ops.tokens([bonus]), hb.numpy(), 4, SamplingParams()).tokens.tolist()
        assert got == draft(tb, tb.ops.tokens([bonus]), hb, 4, SamplingParams()).tokens.tolist()


def test_export_and_run_cli(tmp_path):
    from mtpkit.model.load import save_drafter
    from tests.tiny_gguf import write_gguf
    t, d = _pair(4, "centroid")
    gguf = write_gguf(t, tmp_path / "t.gguf")
    save_drafter(d, tmp_path / "d")
    r = CliRunner()
    res = r.invoke(app, ["export", "--format", "mlx", "--target", str(gguf), "--drafter", str(tmp_path / "d"),
                         "--out", str(tmp_path / "x"), "--dtype", "float32", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["vs_reference"]["max_abs_logit_diff"] < 1e-3 and info["vs_reference"]["argmax_agreement"] == 1.0
    assert (tmp_path / "x" / "target" / "tokenizer.model").is_file()
    import mlx_lm
    model, tok = mlx_lm.load(str(tmp_path / "x" / "target"))  # loadable by mlx-lm itself, tokenizer included
    from mtpkit.tokenizer import Tokenizer
    ours = Tokenizer.from_sentencepiece(tmp_path / "x" / "target" / "tokenizer.model")
    assert tok.encode("abc ab") == ours.encode("abc ab")
    res = r.invoke(app, ["run", "abc", "--backend", "mlx", "--target", str(tmp_path / "x" / "target"),
                         "--max-new-tokens", "12", "--compare", "--json", "--min-confidence", "0"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["plain"]["identical"] and out["drafter"].endswith("drafter") and len(out["tokens"]) == 12
    # mlx-lm's own CLI generates from the exported target (on the real target its greedy text equals our loop's, see
    # README; this tiny vocabulary decodes to byte soup, so the tokens are counted here); it cannot load our drafter as
    # its --draft-model (a whole causal LM there; ours reads the target's cache)
    import subprocess
    import sys
    cli = [sys.executable, "-m", "mlx_lm", "generate", "--model", str(tmp_path / "x" / "target"), "--prompt", "abc",
           "--max-tokens", "12", "--temp", "0", "--ignore-chat-template"]
    p = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Generation: 12 tokens" in p.stdout, p.stdout[-500:]
    p = subprocess.run(cli + ["--draft-model", str(tmp_path / "x" / "drafter")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and "mtpkit_assistant not supported" in p.stderr
    if t.config.hidden_size % 64:
        fails_cleanly(["export", "--format", "mlx", "--target", str(gguf), "--drafter", "none",
                        "--out", str(tmp_path / "q"), "--quant", "int8"], "not a multiple")
        assert not (tmp_path / "q").exists()
    # quantized export of a target whose matrices fit MLX's groups of 64; mlx-lm loads it
    t64 = tiny_target(5, vocab_size=288, num_hidden_layers=2, layer_types=[SLIDING, FULL], hidden_size=64,
                      intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      final_logit_softcapping=None)
    res = r.invoke(app, ["export", "--format", "mlx", "--target", str(write_gguf(t64, tmp_path / "t64.gguf")),
                         "--drafter", "none", "--out", str(tmp_path / "q"), "--quant", "int8", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "q" / "target" / "config.json").read_text())["quantization"]["bits"] == 8
    assert json.loads(res.stdout.strip().splitlines()[-1])["vs_reference"]["argmax_agreement"] >= 0.5
    mlx_lm.load(str(tmp_path / "q" / "target"))


def test_export_bad_input(tmp_path):
    from tests.tiny_gguf import write_gguf
    t, _ = _pair(0, "dense")
    gguf = write_gguf(t, tmp_path / "t.gguf")
    base = ["export", "--target", str(gguf), "--drafter", "none", "--out", str(tmp_path / "o")]
    fails_cleanly(base + ["--format", "tflite"], "not available")
    fails_cleanly(base + ["--format", "mlx", "--quant", "3"], "accepted: none, int8, int4")
    odd = tiny_target(0, vocab_size=288, num_hidden_layers=3, layer_types=[FULL, SLIDING, FULL],
                      final_logit_softcapping=None)
    fails_cleanly(["export", "--format", "mlx", "--target", str(write_gguf(odd, tmp_path / "odd.gguf")),
                    "--drafter", "none", "--out", str(tmp_path / "o")], "every 1-th layer full")
    assert not (tmp_path / "o").exists()
    fails_cleanly(["run", "x", "--backend", "mlx", "--target", str(gguf)], "exported target directory")


def test_export_write_error_is_one_line(tmp_path, monkeypatch):
    """MLX reports a file it cannot write (a full disk, a vanished directory) as a RuntimeError: one line naming the
    entry of OUT, nothing written."""
    from tests.tiny_gguf import write_gguf
    t, _ = _pair(0, "dense")
    gguf = write_gguf(t, tmp_path / "t.gguf")

    def fails(path, *a, **k):
        raise RuntimeError(f"[save_safetensors] Failed to open file {path}")
    monkeypatch.setattr(mx, "save_safetensors", fails)
    out = tmp_path / "o"
    fails_cleanly(["export", "--format", "mlx", "--target", str(gguf), "--drafter", "none", "--out", str(out)],
                  f"cannot write {out}/target/model.safetensors: [save_safetensors] Failed to open file; nothing "
                  f"written to {out}")
    assert not out.exists()


def test_linux_mlx_matmuls_go_through_openblas(tmp_path):
    """A fresh process: mtpkit's loader routes MLX's cblas_sgemm to OpenBLAS (mlx_blas.py), with equal results."""
    import os
    import subprocess
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("the shim is for MLX's Linux CPU wheel")
    code = ("import mtpkit.runtime.mlx_backend as b, numpy as np; from mtpkit.runtime.mlx_blas import sgemm_calls;"
            "mx = b._mx(); a = mx.random.normal((7, 64)); w = mx.random.normal((64, 33)); c = a @ w; mx.eval(c);"
            "print(sgemm_calls(), float(np.abs(np.array(c) - np.array(a) @ np.array(w)).max()))")
    env = {**os.environ, "MTPKIT_CACHE": str(tmp_path)}  # builds the shim from nothing
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    calls, diff = r.stdout.split()
    assert int(calls) >= 1 and float(diff) < 1e-4, r.stdout
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**env, "MTPKIT_MLX_BLAS": "0"})
    assert r.returncode == 0 and r.stdout.split()[0] == "None", r.stdout + r.stderr  # opted out: not loaded
