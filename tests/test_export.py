"""The export registry (one shape per format), the --quant vocabulary of every format, and the one parity check with
its enforced tolerance, on tiny random targets. A format's own export tests are in test_mlx.py / test_gguf.py."""

from __future__ import annotations

import errno
import json
import os
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
    (["--format", "mlx", "--dtype", "float64"], "--dtype 'float64': --format mlx accepts float32, bfloat16, float16"),
    (["--format", "mlx", "--drafter-quant", "q8_0"], "--drafter-quant: not an option of --format mlx"),
    (["--format", "gguf", "--dtype", "float32"], "--dtype is for MLX"),
    (["--format", "gguf", "--drafter-quant", "q4_k_m"], "--drafter-quant 'q4_k_m': --format gguf accepts none, int8, "
                                                        "int4, f32, f16, bf16, q8_0, q5_0, q5_1, q4_0, q4_1 (K-quants"),
    (["--format", "gguf", "--drafter-quant", "source"], "accepts none, int8, int4, f32, f16, bf16, q8_0, q5_0, q5_1, "
                                                        "q4_0, q4_1 (source copies a GGUF target's own tensors; a "
                                                        "drafter has none)"),
    (["--format", "gguf", "--compute", "ane"], "--compute: not an option of --format gguf"),
    (["--format", "mlx", "--max-draft", "3"], "--max-draft: not an option of --format mlx"),
    (["--format", "onnx", "--context", "64"], "--context: not an option of --format onnx"),
    (["--format", "coreml", "--drafter-quant", "int8"], "--drafter-quant: not an option of --format coreml"),
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
    res = _export("mlx", src, out, "--dtype", "float32", "--force")  # --drafter none: the earlier drafter goes too
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "target"] and res["removed"] == [f"{out}/drafter"]
    assert res["vs_reference"]["max_abs_logit_diff"] < 1e-4  # float32: the same model
    before = _tree(out)
    monkeypatch.setitem(fmt.TOLERANCE, "float32", 1e-9)
    fails_cleanly(args + ["--out", str(out), "--force"], "beyond tolerance")
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == ["export.json", "target"]
    fails_cleanly(args + ["--out", str(tmp_path / "fresh")], "nothing written")
    assert not (tmp_path / "fresh").exists()
    monkeypatch.setitem(fmt.TOLERANCE, "int8", 1e-9)  # int8 refused in bfloat16: the hint names float32
    fails_cleanly(["export", "--format", "mlx", "--target", str(src), "--drafter", "none", "--quant", "int8",
                   "--out", str(out), "--force"],
                  "nothing written (MLX's CPU quantized matmul sums in bfloat16: try --dtype float32)")
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


# --------------------------------------------------------------------------- --out: refusals, --force, disk errors
# on the GGUF export of a tiny target (seconds); every refusal below comes before the target loads or leaves OUT as
# it was


def _gguf_pair(tmp_path) -> tuple[Path, Path]:
    """A tiny GGUF target and a drafter for it (head_dim 32: llama.cpp's backend keeps K/V in q8_0 blocks)."""
    from mtpkit.model.load import save_drafter
    from tests.conftest import tiny_drafter
    from tests.tiny_gguf import write_gguf
    t = tiny_target(5, vocab_size=288, num_hidden_layers=2, layer_types=[SLIDING, FULL], hidden_size=64,
                    intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                    query_pre_attn_scalar=32.0, final_logit_softcapping=None)
    src = write_gguf(t, tmp_path / "t64.gguf")
    save_drafter(tiny_drafter(t), tmp_path / "d")
    return src, tmp_path / "d"


def _gguf_args(src: Path, out: Path, drafter: Path | str = "none", *args: str) -> list[str]:
    return ["export", "--format", "gguf", "--target", str(src), "--drafter", str(drafter), "--quant", "f32",
            "--out", str(out), *args]


def _no_target_load(monkeypatch) -> None:
    import mtpkit.model.load
    monkeypatch.setattr(mtpkit.model.load, "load_target", lambda *a, **k: pytest.fail("the target was loaded"))


def test_non_empty_out_is_refused_without_force_and_left_alone(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    src, d = _gguf_pair(tmp_path)
    out = tmp_path / "out"
    _export("gguf", src, out, "--quant", "f32")
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    _no_target_load(monkeypatch)
    fails_cleanly(_gguf_args(src, out, d), f"--out {out} is not empty (5 entries); pass --force to replace what the "
                                           "export writes there")
    other = tmp_path / "other"
    other.mkdir()
    (other / "a").write_text("")
    fails_cleanly(_gguf_args(src, other), f"--out {other} is not empty (1 entry); pass --force")
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary either


def test_force_replaces_the_exports_entries_and_says_what_it_removed(tmp_path):
    """--force: the export's own entries are replaced, other files stay; --drafter none removes the drafter of an
    earlier export (llama.cpp's backend would load it beside this target) and the result says so."""
    pytest.importorskip("llama_cpp")
    src, d = _gguf_pair(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, _gguf_args(src, out, d))
    assert res.exit_code == 0 and "removed" not in res.stdout, res.output
    (out / "notes.txt").write_text("mine")
    res = CliRunner().invoke(app, _gguf_args(src, out, "none", "--force"), env={"MTPKIT_QUIET": "1"})
    assert res.exit_code == 0, res.output
    assert res.stdout.rstrip().endswith(f"; removed {out}/drafter.gguf (an earlier export's); "
                                        f"{json.loads((out / 'export.json').read_text())['seconds']} s")
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "notes.txt", "target.gguf", "target.json",
                                                     "tokenizer.model"]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "export.json").read_text())["removed"] == [f"{out}/drafter.gguf"]
    res = _export("gguf", src, out, "--quant", "f32", "--force")  # nothing stale now: nothing removed
    assert res["removed"] == []


def test_out_that_cannot_be_created_is_refused_before_the_target_loads(tmp_path, monkeypatch):
    _no_target_load(monkeypatch)
    (tmp_path / "a_file").write_text("x")
    fails_cleanly(["export", "--format", "gguf", "--target", "t", "--out", str(tmp_path / "a_file" / "sub")],
                  f"--out {tmp_path / 'a_file' / 'sub'}: {tmp_path / 'a_file'} is not a directory")
    fails_cleanly(["export", "--format", "onnx", "--target", "t", "--out", str(tmp_path / "a_file")],
                  "exists and is not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_read_only_out_is_refused_before_the_target_loads(tmp_path, monkeypatch):
    _no_target_load(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: mode bits do not stop writes (the simulated case below covers it)")
        fails_cleanly(["export", "--format", "gguf", "--target", "t", "--out", str(ro / "new" / "dir")],
                      f"--out {ro / 'new' / 'dir'}: cannot write in {ro} (Permission denied)")
        fails_cleanly(["export", "--format", "gguf", "--target", "t", "--out", str(ro)],
                      f"--out {ro}: cannot write in {ro} (Permission denied)")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_read_only_file_system_is_refused_before_the_target_loads(tmp_path, monkeypatch):
    """Root writes through mode bits, but not onto a read-only mount: simulated where the check tries to write."""
    import mtpkit.paths
    _no_target_load(monkeypatch)

    def erofs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(mtpkit.paths.tempfile, "mkstemp", erofs)
    out = tmp_path / "new" / "out"
    fails_cleanly(["export", "--format", "gguf", "--target", "t", "--out", str(out)],
                  f"--out {out}: cannot write in {tmp_path} (Read-only file system)")
    assert not (tmp_path / "new").exists()


def test_full_disk_mid_export_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC while writing target.gguf (after a part of it is on disk): one line naming the file and the cause;
    a new OUT is gone again, an existing one (--force) is as it was, with no temporary left."""
    pytest.importorskip("llama_cpp")
    import mtpkit.export.gguf as fmt
    src, _ = _gguf_pair(tmp_path)
    out = tmp_path / "out"
    _export("gguf", src, out, "--quant", "f32")
    before = _tree(out)

    def disk_full(path, *a, **k):
        Path(path).write_bytes(b"GGUF partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(fmt, "write_gguf", disk_full)
    fails_cleanly(_gguf_args(src, tmp_path / "new"), f"cannot write {tmp_path / 'new'}/target.gguf: No space left on "
                                                     f"device; nothing written to {tmp_path / 'new'}")
    assert not (tmp_path / "new").exists()
    fails_cleanly(_gguf_args(src, out, "none", "--force"), f"cannot write {out}/target.gguf: No space left on device")
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)

    def disk_full_unnamed(*a, **k):  # a file object's write names no path
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fmt, "write_gguf", disk_full_unnamed)
    fails_cleanly(_gguf_args(src, out, "none", "--force"), f"cannot write {out}: No space left on device; nothing "
                                                           f"written to {out}")
    assert _tree(out) == before


def test_staging_left_by_a_killed_export_does_not_count_and_is_swept(tmp_path):
    """A staging directory of a process that is gone (kill -9) is not a reason to ask for --force, and the next
    export removes it (mtpkit.paths.sweep)."""
    pytest.importorskip("llama_cpp")
    src, _ = _gguf_pair(tmp_path)
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".staging-{int(dead.stdout)}-abc123"
    stale.mkdir(parents=True)
    (stale / "target.gguf").write_bytes(b"half")
    _export("gguf", src, out, "--quant", "f32")
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "target.gguf", "target.json", "tokenizer.model"]
