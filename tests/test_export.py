"""The export registry (one shape per format), the --quant vocabulary of every format, and the one parity check with
its enforced tolerance, on tiny random targets. A format's own export tests are in test_mlx.py / test_gguf.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mtpkit.cli import app
from mtpkit.errors import MtpkitError
from mtpkit.export import COMMON_QUANTS, FORMATS
from mtpkit.export.parity import compare_logits
from mtpkit.model.config import FULL, SLIDING
from tests.conftest import fails_cleanly, tiny_target

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))


def _t64(seed: int = 5):
    """Every matrix a multiple of MLX's quantization groups (64); layers (sliding, full) for both formats."""
    return tiny_target(seed, vocab_size=288, num_hidden_layers=2, layer_types=[SLIDING, FULL], hidden_size=64,
                       intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       query_pre_attn_scalar=16.0, final_logit_softcapping=None)


def _export(fmt: str, target: Path, out: Path, *args: str) -> dict:
    res = CliRunner().invoke(app, ["export", "--format", fmt, "--target", str(target), "--drafter", "none",
                                   "--out", str(out), "--json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_unknown_format_is_one_line(tmp_path):
    fails_cleanly(["export", "--format", "tflite", "--out", str(tmp_path / "o")], "not available (have: mlx, gguf")
    assert not (tmp_path / "o").exists()


def test_every_format_has_one_shape_and_imports_without_torch():
    """The MLX backend (and an app running an exported model) imports the format modules where torch is absent."""
    code = ("import inspect, sys; sys.modules['torch'] = None\n"
            "from mtpkit.export import COMMON_QUANTS, FORMATS, export_module\n"
            "for name in FORMATS:\n"
            "    m = export_module(name)\n"
            "    assert m.QUANTS[:3] == COMMON_QUANTS, name\n"
            "    p = inspect.signature(m.export).parameters\n"
            "    assert list(p)[:3] == ['target', 'drafter', 'out'], name\n"
            "    assert all(p[k].kind is p[k].KEYWORD_ONLY for k in ('quant', 'dtype')), name\n"
            "    assert any(v.kind is v.VAR_KEYWORD for v in p.values()), name\n"
            "    assert list(inspect.signature(m.check_target).parameters)[:5] == "
            "['ref', 'path', 'tokens', 'tolerance', 'what'], name\n"
            "from mtpkit.export.mlx import load_target\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert set(FORMATS) == {"mlx", "gguf", "onnx", "coreml"} and COMMON_QUANTS == ("none", "int8", "int4")


def test_compare_logits_enforces_the_tolerance():
    want = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]], np.float32)
    res = compare_logits(want, want + 0.05, 0.1, 0.8, "exported target (f32)")
    assert res == {"max_abs_logit_diff": pytest.approx(0.05), "argmax_agreement": 1.0, "tolerance": 0.1,
                   "min_argmax": 0.8}
    with pytest.raises(MtpkitError, match=r"^exported target \(f32\) differs from the reference beyond tolerance: "
                                          r"max \|logit diff\| 0.5 .*; nothing written$"):
        compare_logits(want, want + 0.5, 0.1, 0.8, "exported target (f32)")
    swapped = want.copy()
    swapped[0] = [2.0, 1.0, 0.0]  # within 1.0 everywhere, but one argmax of two differs
    with pytest.raises(MtpkitError, match="argmax agreement 0.50"):
        compare_logits(want, swapped, 10.0, 0.8, "x")
    nan = want.copy()
    nan[1, 2] = np.nan  # a NaN compares False with everything: it must not pass as "within tolerance"
    with pytest.raises(MtpkitError, match="beyond tolerance"):
        compare_logits(want, nan, 10.0, 0.0, "x")


@pytest.mark.parametrize("args,match", [
    (["--format", "mlx", "--quant", "8"], "write --quant int8 (--format mlx accepts: none, int8, int4)"),
    (["--format", "mlx", "--quant", "4"], "write --quant int4"),
    (["--format", "mlx", "--quant", "q8_0"], "'q8_0' is not accepted by --format mlx (accepted: none, int8, int4)"),
    (["--format", "gguf", "--quant", "q3_x"], "not accepted by --format gguf (accepted: none, int8, int4, source, f32,"),
    (["--format", "gguf", "--quant", "int2"], "q4_k_m"),
    (["--format", "mlx", "--dtype", "float64"], "unknown dtype 'float64'"),
    (["--format", "mlx", "--drafter-quant", "q8_0"], "--drafter-quant: not an option of --format mlx"),
    (["--format", "gguf", "--dtype", "float32"], "--dtype is for MLX"),
    (["--format", "gguf", "--drafter-quant", "q4_k_m"], "--drafter-quant must be one of"),
    (["--format", "onnx", "--quant", "q4_0"], "'q4_0' is not accepted by --format onnx (accepted: none, int8, int4)"),
    (["--format", "onnx", "--dtype", "bfloat16"], "--format onnx computes in float32"),
    (["--format", "onnx", "--drafter-quant", "q8_0"], "--drafter-quant 'q8_0': --format onnx accepts none, int8, int4"),
])
def test_bad_arguments_are_refused_before_the_target_loads(args, match, tmp_path, monkeypatch):
    import mtpkit.model.load
    monkeypatch.setattr(mtpkit.model.load, "load_target", lambda *a, **k: pytest.fail("the target was loaded"))
    fails_cleanly(["export", "--target", "no-such-target", "--drafter", "none", "--out", str(tmp_path / "o"), *args],
                  match)
    assert not (tmp_path / "o").exists()


def test_mlx_quant_vocabulary(tmp_path, monkeypatch):
    pytest.importorskip("mlx_lm")
    import mtpkit.export.mlx as fmt
    from tests.tiny_gguf import write_gguf
    src = write_gguf(_t64(), tmp_path / "t64.gguf")
    res = _export("mlx", src, tmp_path / "none")
    cfg = json.loads((tmp_path / "none" / "target" / "config.json").read_text())
    assert res["quant"] == "none" and res["dtype"] == "bfloat16" and "quantization" not in cfg
    assert res["vs_reference"]["tolerance"] == fmt.TOLERANCE["bfloat16"]
    # tiny random targets have near-tied logits: 4 bits flip argmaxes the real target keeps, so here the argmax
    # gate is off (the tolerance gate is exercised below)
    monkeypatch.setattr(fmt, "MIN_ARGMAX", 0.0)
    for quant, bits in (("int8", 8), ("int4", 4)):
        res = _export("mlx", src, tmp_path / quant, "--quant", quant)
        cfg = json.loads((tmp_path / quant / "target" / "config.json").read_text())
        assert cfg["quantization"] == {"group_size": 64, "bits": bits} and res["quant"] == quant
        assert res["vs_reference"]["tolerance"] == fmt.TOLERANCE[quant]


def test_mlx_export_beyond_tolerance_writes_nothing(tmp_path, monkeypatch):
    pytest.importorskip("mlx_lm")
    import mtpkit.export.mlx as fmt
    from mtpkit.model.load import save_drafter
    from tests.conftest import tiny_drafter
    from tests.tiny_gguf import write_gguf
    t = _t64()
    src = write_gguf(t, tmp_path / "t64.gguf")
    save_drafter(tiny_drafter(t), tmp_path / "d")
    out = tmp_path / "out"
    args = ["export", "--format", "mlx", "--target", str(src), "--drafter", str(tmp_path / "d"), "--dtype", "float32"]
    assert CliRunner().invoke(app, args + ["--out", str(out)]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["drafter", "export.json", "target"]
    res = _export("mlx", src, out, "--dtype", "float32")  # --drafter none: the earlier drafter goes too
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "target"]
    assert res["vs_reference"]["max_abs_logit_diff"] < 1e-4  # float32: the same model
    before = _tree(out)
    monkeypatch.setitem(fmt.TOLERANCE, "float32", 1e-9)
    fails_cleanly(args + ["--out", str(out)], "beyond tolerance")
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == ["export.json", "target"]
    fails_cleanly(args + ["--out", str(tmp_path / "fresh")], "nothing written")
    assert not (tmp_path / "fresh").exists()
    monkeypatch.setitem(fmt.TOLERANCE, "int8", 1e-9)  # int8 refused in bfloat16: the hint names float32
    fails_cleanly(["export", "--format", "mlx", "--target", str(src), "--drafter", "none", "--quant", "int8",
                   "--out", str(out)], "nothing written (MLX's CPU quantized matmul sums in bfloat16: try --dtype float32)")
    assert _tree(out) == before


def test_gguf_quant_vocabulary(tmp_path):
    pytest.importorskip("llama_cpp")
    import shutil

    from mtpkit.model.load import load_target
    from tests.tiny_gguf import write_gguf
    t = _t64()
    src = write_gguf(t, tmp_path / "t64.gguf")
    for quant, gtype in (("none", "source"), ("int8", "q8_0"), ("int4", "q4_k_m")):
        res = _export("gguf", src, tmp_path / quant, "--quant", quant)
        assert (res["quant_requested"], res["quant"]) == (quant, gtype)
        assert json.loads((tmp_path / quant / "target.json").read_text())["quant"] == gtype
    # none for a target that is not a GGUF file: f32 (its source tensors are float)
    hf = tmp_path / "hf"
    hf.mkdir()
    from safetensors.torch import save_file
    (hf / "config.json").write_text(json.dumps(t.config.to_dict()))
    save_file({"model." + k: v.contiguous() for k, v in t.state_dict().items()}, str(hf / "model.safetensors"))
    shutil.copyfile(load_target(str(src)).tokenizer.model_path, hf / "tokenizer.model")
    res = _export("gguf", hf, tmp_path / "hf-none")
    assert (res["quant_requested"], res["quant"]) == ("none", "f32")
    assert res["vs_reference"]["tolerance"] == 0.1 and res["vs_reference"]["argmax_agreement"] == 1.0
