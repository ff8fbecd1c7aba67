"""GGUF export + the llama.cpp backend on tiny random models (llama-cpp-python runs them on the CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtpkit.errors import MtpkitError
from mtpkit.model.config import FULL, SLIDING
from tests.conftest import fails_cleanly, tiny_drafter, tiny_target
from tests.tiny_gguf import write_gguf

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))


def _target(**kw):
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32.0, sliding_window=8,
               layer_types=[SLIDING, FULL, SLIDING, FULL], final_logit_softcapping=None)
    cfg.update(kw)
    return tiny_target(5, **cfg)


def _export(tmp_path, t, drafter_kw: dict | None = None, quant: str = "f32", name: str = "out"):
    from typer.testing import CliRunner

    from mtpkit.cli import app
    from mtpkit.model.load import save_drafter
    src = write_gguf(t, tmp_path / f"{name}-src.gguf")
    args = ["export", "--format", "gguf", "--target", str(src), "--out", str(tmp_path / name), "--quant", quant, "--json"]
    if drafter_kw is not None:
        d = tiny_drafter(t, **drafter_kw)
        save_drafter(d, tmp_path / f"{name}-drafter")
        args += ["--drafter", str(tmp_path / f"{name}-drafter")]
    else:
        args += ["--drafter", "none"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1]), tmp_path / name


CENTROID = dict(head="centroid", num_centroids=30, centroid_top_k=3)


def test_export_target_and_drafter_match_the_reference(tmp_path):
    t = _target()
    res, out = _export(tmp_path, t, dict(hidden_size=64, intermediate_size=64, **CENTROID))  # as wide as the target
    assert {p.name for p in out.iterdir()} >= {"target.gguf", "drafter.gguf", "tokenizer.model", "target.json", "export.json"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind
    v = res["vs_reference"]
    assert v["argmax_agreement"] == 1.0 and v["max_abs_logit_diff"] < v["tolerance"] == 0.1
    assert res["drafter"]["embedding_length"] == 96 and res["drafter"]["padded_from"] == 64  # llama.cpp needs d != d_target
    dc = res["drafter_check"]  # llama.cpp's own dense head over the exported drafter vs the reference
    assert dc["argmax_equal"] and dc["max_abs_logit_diff"] < 0.05 and dc["max_abs_h_diff"] < 0.03 * dc["h_scale"]
    # general.file_type: llama.cpp's tools label a file by it (llama-bench said "all F32" without it)
    import gguf
    for f, want in (("target.gguf", 0), ("drafter.gguf", 7)):  # f32 target, q8_0 drafter (the default)
        fields = gguf.GGUFReader(str(out / f)).fields
        assert fields["general.file_type"].contents() == want and fields["general.quantization_version"].contents() == 2


@pytest.mark.parametrize("head", ["dense", "centroid"])
def test_llamacpp_loads_the_sibling_drafter_and_its_calibration(tmp_path, head):
    """Parity, losslessness and sampling are in tests/test_backend_contract.py; this checks the loader."""
    import mtpkit
    t = _target()
    _, out = _export(tmp_path, t, dict(**CENTROID, draft_temperature=0.7))
    s = mtpkit.load(str(out / "target.gguf"), backend="llamacpp", max_len=128, threads=1, head=head)
    assert s.drafter_path == str(out / "drafter.gguf")  # the sibling drafter.gguf
    assert s.draft_temperature == pytest.approx(0.7)  # the drafter's calibration travels in the GGUF
    info = s.backend.info()
    assert info.name == "llamacpp" and info.threads == 1 and info.drafter_head == head
    assert s.backend.verify_rows is not None, s.backend.row_head_off  # the head per row (runtime/ggml_head.py)
    assert s.backend.auto_adaptive == (True, False)  # with it, adaptive drafting pays at T = 0 only
    plain = s.generate([2, 270, 271], max_new_tokens=20, use_drafter=False)
    assert s.generate([2, 270, 271], max_new_tokens=20, num_draft_tokens=3).tokens == plain.tokens
    with pytest.raises(MtpkitError, match="no option 'dtype'"):
        mtpkit.load(str(out / "target.gguf"), backend="llamacpp", dtype="float32")


def test_our_gguf_reader_reads_what_ggufs_reads(tmp_path):
    """model/files.open_gguf reads arrays in one go (gguf 0.19 parses them element by element: 25-40 s for the real
    drafter): every field's contents and types, and every tensor, as gguf's own reader gives them."""
    import gguf

    from mtpkit.model.files import open_gguf
    _, out = _export(tmp_path, _target(), dict(**CENTROID))
    for f in ("target.gguf", "drafter.gguf"):
        ours, theirs = open_gguf(out / f), gguf.GGUFReader(str(out / f))
        assert list(ours.fields) == list(theirs.fields)
        kinds = set()
        for k, want in theirs.fields.items():
            assert ours.fields[k].contents() == want.contents() and ours.fields[k].types == want.types, k
            kinds.add(tuple(want.types))
        T = gguf.GGUFValueType
        assert {(T.ARRAY, T.STRING), (T.ARRAY, T.FLOAT32)} <= kinds or f == "target.gguf"  # both fast paths ran
        assert [(t.name, t.tensor_type, np.asarray(t.data).tobytes()) for t in ours.tensors] == \
            [(t.name, t.tensor_type, np.asarray(t.data).tobytes()) for t in theirs.tensors]


def test_run_cli_on_llamacpp(tmp_path):
    from typer.testing import CliRunner

    from mtpkit.cli import app
    t = _target()
    _, out = _export(tmp_path, t, dict(**CENTROID))
    res = CliRunner().invoke(app, ["run", "abc", "--backend", "llamacpp", "--target", str(out / "target.gguf"),
                                   "--max-new-tokens", "12", "--compare", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output.strip().splitlines()[-1])
    assert doc["plain"]["identical"] and len(doc["tokens"]) == 12


def test_gguf_bad_input_writes_nothing(tmp_path):
    from mtpkit.model.load import save_drafter
    # rows of 48 values cannot be split into q8_0 blocks of 32
    t = _target(hidden_size=48)
    src = write_gguf(t, tmp_path / "t48.gguf")
    fails_cleanly(["export", "--format", "gguf", "--target", str(src), "--drafter", "none", "--quant", "q8_0",
                   "--out", str(tmp_path / "o1")], "needs a multiple of 32")
    assert not (tmp_path / "o1").exists()
    # llama.cpp's assistant reads target layers n-2 (sliding) and n-1 (full)
    t = _target(layer_types=[SLIDING, SLIDING, FULL, SLIDING])
    src = write_gguf(t, tmp_path / "tsf.gguf")
    save_drafter(tiny_drafter(t), tmp_path / "d")
    fails_cleanly(["export", "--format", "gguf", "--target", str(src), "--drafter", str(tmp_path / "d"),
                   "--out", str(tmp_path / "o2")], "last two layers")
    assert not (tmp_path / "o2").exists()
    # a drafter whose KV heads do not match the target's
    t1, t2 = _target(), _target(num_key_value_heads=2, num_attention_heads=2)
    save_drafter(tiny_drafter(t2), tmp_path / "d2")
    src = write_gguf(t1, tmp_path / "t1.gguf")
    fails_cleanly(["export", "--format", "gguf", "--target", str(src), "--drafter", str(tmp_path / "d2"),
                   "--out", str(tmp_path / "o3")], "key_value_heads")
    fails_cleanly(["export", "--format", "gguf", "--target", str(src), "--quant", "q3_x", "--drafter", "none",
                   "--out", str(tmp_path / "o4")], "not accepted by --format gguf")
    fails_cleanly(["run", "x", "--backend", "llamacpp", "--target", str(tmp_path / "nope.gguf")], "needs a target .gguf")
