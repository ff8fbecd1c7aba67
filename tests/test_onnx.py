"""ONNX export + the ONNX Runtime backend on tiny random models (parity, losslessness and sampling of the backend are in
tests/test_backend_contract.py), and on the real Gemma 3 270M (slow): logits and hidden states vs the reference per
--quant, and greedy speculative == plain ONNX Runtime greedy, token for token."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mtpkit.cli import app
from mtpkit.errors import MtpkitError
from mtpkit.model.config import FULL, SLIDING
from tests.conftest import export_target, fails_cleanly, tiny_drafter, tiny_target
from tests.tiny_gguf import write_gguf

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


pytestmark = pytest.mark.usefixtures("private_cache")
_target = export_target


def _export(*args: str) -> dict:
    res = CliRunner().invoke(app, ["export", "--format", "onnx", "--json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def _tree(d) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_run_and_bad_input(tmp_path):
    """The CLI end to end: the files and their I/O names, the check against the reference, `mtpkit run` on them
    (greedy speculative == plain), then refusals that write nothing. The float32 drafter (`--drafter-quant none`):
    the default int8 one is checked on the real target (test_real_target_logits_and_hidden_match_the_reference);
    the tiny random drafter's near-tied logits flip under 8 bits."""
    from mtpkit.model.load import save_drafter
    t = _target()
    src = write_gguf(t, tmp_path / "t.gguf")
    save_drafter(tiny_drafter(t, 5, head="centroid", num_centroids=16, centroid_top_k=4, share_target_embedding=True,
                              hidden_size=64), tmp_path / "d")  # as the shipped drafter: the target's embedding
    out = tmp_path / "x"
    res = _export("--target", str(src), "--drafter", str(tmp_path / "d"), "--out", str(out), "--drafter-quant", "none")
    assert sorted(p.name for p in out.iterdir()) == ["drafter.onnx", "drafter.onnx.data", "export.json", "onnx.json",
                                                     "target.onnx", "target.onnx.data", "tokenizer.model"]
    assert res["vs_reference"]["max_abs_logit_diff"] < 1e-4 and res["vs_reference"]["argmax_agreement"] == 1.0
    assert res["drafter_check"]["max_abs_logit_diff"] < 1e-4 and res["drafter_check"]["steps"] >= 2
    m = json.loads((out / "onnx.json").read_text())
    assert m["opset"] == res["opset"] and m["quant"] == "none" and m["drafter_quant"] == "none"
    assert m["target"]["inputs"][:4] == ["input_ids", "position_ids", "logits_indices", "past_key_values.0.key"]
    assert m["target"]["outputs"][:4] == ["logits", "hidden_states", "present.0.key", "present.0.value"]
    assert m["drafter"]["inputs"] == ["token", "h", "position", "past_key_values.2.key", "past_key_values.2.value",
                                      "past_key_values.3.key", "past_key_values.3.value"]  # last sliding, last full
    r = CliRunner().invoke(app, ["run", "abc", "--backend", "onnx", "--target", str(out / "target.onnx"),
                                 "--max-new-tokens", "24", "--compare", "--json", "--threads", "1"])
    assert r.exit_code == 0, r.output
    run = json.loads(r.output.strip().splitlines()[-1])
    assert run["plain"]["identical"] and run["drafter"].endswith("drafter.onnx") and len(run["tokens"]) == 24

    before = _tree(out)
    base = ["export", "--format", "onnx", "--target", str(src), "--out", str(out), "--force"]
    fails_cleanly(base + ["--quant", "q4_0"], "'q4_0' is not accepted by --format onnx (accepted: none, int8, int4)")
    fails_cleanly(base + ["--dtype", "bfloat16"], "--format onnx computes in float32")
    other = tiny_target(1, vocab_size=96, hidden_size=64, num_hidden_layers=2, layer_types=[SLIDING, FULL])
    save_drafter(tiny_drafter(other, 1), tmp_path / "d-other")
    fails_cleanly(base + ["--drafter", str(tmp_path / "d-other")], "drafter does not match the target")
    odd = write_gguf(_target(hidden_size=48), tmp_path / "odd.gguf")  # 4-bit embedding rows come in blocks of 32
    fails_cleanly(["export", "--format", "onnx", "--target", str(odd), "--drafter", "none", "--quant", "int4",
                   "--out", str(out), "--force"], "blocks of 32")
    assert _tree(out) == before
    fails_cleanly(["run", "x", "--backend", "onnx", "--target", str(src)], "needs DIR/target.onnx")


def test_export_beyond_tolerance_writes_nothing(tmp_path, monkeypatch):
    import mtpkit.export.onnx as fmt
    src = write_gguf(_target(), tmp_path / "t.gguf")
    monkeypatch.setitem(fmt.TOLERANCE, "none", 1e-12)
    fails_cleanly(["export", "--format", "onnx", "--target", str(src), "--drafter", "none",
                   "--out", str(tmp_path / "fresh")], "nothing written")
    assert not (tmp_path / "fresh").exists()


def test_quantized_files_use_onnxruntime_operators(tmp_path, monkeypatch):
    """int8: every matrix multiply is MatMulNBits with 8 bits; int4: 4 bits but the tied head's 8, and the embedding
    rows GatherBlockQuantized. Checked against the reference with each quant's tolerance; the tiny random targets have
    near-tied logits that 4 bits flip, so the argmax gate is off here (it is on in the real-target tests)."""
    import onnx

    import mtpkit.export.onnx as fmt
    from mtpkit.export.parity import probe_tokens
    t = _target(7, hidden_size=64, intermediate_size=128)
    monkeypatch.setattr(fmt, "MIN_ARGMAX", dict.fromkeys(fmt.MIN_ARGMAX, 0.0))
    for quant, bits in (("int8", 8), ("int4", 4)):
        out = tmp_path / quant
        out.mkdir()
        fmt.write_files(t, None, None, out, quant)
        g = onnx.load(str(out / "target.onnx"), load_external_data=False).graph
        ops = [n.op_type for n in g.node]
        consts = {t.name for t in g.initializer}
        nbits = {a.i for n in g.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
        assert not [n for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in consts]  # all quantized
        assert "Gemm" not in ops and nbits == {bits, 8}
        assert ("GatherBlockQuantized" in ops) == (quant == "int4")
        res = fmt.check_target(t, out, probe_tokens(None), fmt.TOLERANCE[quant], quant, 0.0)
        assert 0 < res["max_abs_logit_diff"] <= fmt.TOLERANCE[quant]


def test_several_kv_heads_and_the_cache_written_in_place(tmp_path):
    """present.* outputs land in the backend's buffers at their positions (through a scratch array when the rows
    are not contiguous: 2 KV heads); verify and rollback past the sliding window match a full forward."""
    from mtpkit.export.onnx import write_files
    from mtpkit.runtime.onnx_backend import ONNXBackend
    t = _target(9, num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16.0)
    write_files(t, None, None, tmp_path, "none")
    be = ONNXBackend(tmp_path, max_len=40, threads=1)
    prompt = list(range(3, 17))
    be.start(prompt)
    lv, hv = be.verify(np.array([20, 21, 22]))
    be.rollback(len(prompt) + 1)
    lw, hw = be.verify(np.array([30, 31]))
    with torch.no_grad():
        cache = t.new_cache(40)
        want = t(torch.tensor([prompt + [20, 30, 31]]), cache)
        v = t(torch.tensor([prompt + [20, 21, 22]]))
    np.testing.assert_allclose(lv, v.logits[0, -3:].numpy(), atol=1e-5)
    np.testing.assert_allclose(lw, want.logits[0, -2:].numpy(), atol=1e-5)
    np.testing.assert_allclose(hw, want.hidden[0, -2:].numpy(), atol=1e-5)
    n = len(prompt) + 3
    for i, (k, vv) in enumerate(be.kv):
        np.testing.assert_allclose(k[:, :, :n], cache.k[i][:, :, :n].numpy(), atol=1e-5)
        np.testing.assert_allclose(vv[:, :, :n], cache.v[i][:, :, :n].numpy(), atol=1e-5)
    with pytest.raises(MtpkitError, match="roll back"):
        be.rollback(n + 1)


def test_a_drafter_from_another_export_is_refused(tmp_path):
    from mtpkit.export.onnx import write_files
    from mtpkit.runtime.onnx_backend import ONNXBackend
    a, b = _target(2), _target(3)
    for name, t in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        write_files(t, tiny_drafter(t, 2) if name == "b" else None, None, tmp_path / name, "none")
    with pytest.raises(MtpkitError, match="exported with another target"):
        ONNXBackend(tmp_path / "a", tmp_path / "b" / "drafter.onnx")


# ------------------------------------------------------------------ the real Gemma 3 270M (slow)

PROMPTS = ["def fibonacci(n):", "import numpy as np\n\ndef softmax(x):\n", "The capital of France is"]


@pytest.fixture(scope="module", params=["none", "int8", "int4"])
def real_export(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"onnx-{request.param}")
    res = CliRunner().invoke(app, ["export", "--format", "onnx", "--quant", request.param, "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    return request.param, out, json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_real_target_logits_and_hidden_match_the_reference(real_export):
    import mtpkit.export.onnx as fmt
    from mtpkit.model.load import load_target
    from mtpkit.runtime.onnx_backend import ONNXBackend
    quant, out, res = real_export
    print(quant, res["vs_reference"], res["drafter_check"], res["target_mb"], res["drafter_mb"])
    assert res["drafter_quant"] == ("int8" if quant == "none" else quant)  # the default under a float32 target
    assert res["vs_reference"]["max_abs_logit_diff"] <= fmt.TOLERANCE[quant]
    t = load_target("gemma3-270m")
    ids = t.tokenizer.encode(PROMPTS[1])
    be = ONNXBackend(out, max_len=64)
    logits, h = be.start(ids[:-4])
    lv, hv = be.verify(np.array(ids[-4:]))
    with torch.no_grad():
        o = t.model(torch.tensor([ids]))
    want_h = o.hidden[0, -4:].numpy()
    h_err = float(np.abs(hv - want_h).max() / np.abs(want_h).max())
    print(quant, "hidden rel err", h_err)
    assert h_err <= fmt.DRAFTER_TOLERANCE[quant][1]  # the drafter's input: as close as the drafter's own next h
    assert np.abs(lv - o.logits[0, -4:].numpy()).max() <= fmt.TOLERANCE[quant]


# int4: ONNX Runtime's 4-bit MatMulNBits does not compute a row of a k + 1-row verify bitwise as a one-row step, so
# greedy speculative output may leave plain output at a near-tie. Measured: "The capital of France is", token 34, the
# two candidates 0.19 apart (logits ~21.7); float32 and int8 were identical on every prompt.
NEAR_TIE = 0.5


@pytest.mark.slow
def test_real_greedy_speculative_equals_plain_onnx(real_export):
    import mtpkit
    quant, out, _ = real_export
    s = mtpkit.load(str(out / "target.onnx"), backend="onnx", max_len=512)
    assert s.drafter_path is not None
    for p in PROMPTS:
        plain = s.generate(p, max_new_tokens=64, use_drafter=False).tokens
        spec = s.generate(p, max_new_tokens=64, num_draft_tokens=5, gate=False)
        assert spec.stats.tau > 1.2, (quant, p, spec.stats.tau)
        if quant != "int4":
            assert spec.tokens == plain, (quant, p)
        elif spec.tokens != plain:  # only at a near-tie of the two paths
            j = next(i for i, (a, b) in enumerate(zip(plain, spec.tokens, strict=True)) if a != b)
            logits, _ = s.backend.start(s.tokenizer.encode(p) + plain[:j])
            margin = abs(float(logits[plain[j]] - logits[spec.tokens[j]]))
            print(quant, p, "diverges at", j, "margin", margin)
            assert margin < NEAR_TIE, (p, j, margin)
