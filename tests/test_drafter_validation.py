"""Broken drafters are refused on load with one line (NaN/Inf weights, a centroid head whose token_ordering is out of
range or not a permutation, missing or bad files, another target's shape); a drafter trained for another target of
the same shape loads with a warning; a run whose drafts are almost never accepted gets a warning (api.Stats)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mtpkit.api import Stats, acceptance_warning
from mtpkit.errors import MtpkitError
from mtpkit.model.config import FULL, SLIDING, DrafterConfig
from mtpkit.model.load import fingerprint_mismatch, load_drafter, load_target, save_drafter, target_fingerprint
from tests.conftest import fails_cleanly, tiny_drafter, tiny_target

CENTROID = dict(head="centroid", num_centroids=30, centroid_top_k=3)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))


def _target(seed: int = 5, **kw):
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32.0, sliding_window=8,
               layer_types=[SLIDING, FULL, SLIDING, FULL], final_logit_softcapping=None)
    return tiny_target(seed, **{**cfg, **kw})


def _hf_dir(model, d):
    """A target directory the CLI reads (config.json + model.safetensors, no tokenizer)."""
    from safetensors.torch import save_file
    d.mkdir()
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    return d


def _drafter(t, **kw):
    return tiny_drafter(t, **{**CENTROID, **kw})


def _run(tdir, ddir, *extra):
    return ["run", "x", "--target", str(tdir), "--drafter", str(ddir), "--max-new-tokens", "4", *extra]


@pytest.fixture
def tdir(tmp_path):
    return _hf_dir(_target(), tmp_path / "target")


def test_nan_weight(tmp_path, tdir):
    d = _drafter(_target())
    with torch.no_grad():
        d.layers[0].mlp.up_proj.weight[3, 2] = float("nan")
    save_drafter(d, tmp_path / "d")
    fails_cleanly(_run(tdir, tmp_path / "d"), f"drafter {tmp_path / 'd'}: tensor 'layers.0.mlp.up_proj.weight' holds "
                                              "NaN values (damaged weights or a diverged training run)")
    save_drafter(d, tmp_path / "d8", int8=True)  # int8-stored: the NaN ends up in the row scales
    fails_cleanly(_run(tdir, tmp_path / "d8"), "tensor 'layers.0.mlp.up_proj.weight.int8_scale' holds NaN values")


def test_inf_weight(tmp_path, tdir):
    d = _drafter(_target())
    with torch.no_grad():
        d.norm.weight[0] = -float("inf")
    save_drafter(d, tmp_path / "d", dtype=torch.bfloat16)  # bfloat16 files are checked too
    fails_cleanly(_run(tdir, tmp_path / "d"), "tensor 'norm.weight' holds Inf values")


@pytest.mark.parametrize("bad", [300, -1])
def test_token_ordering_out_of_range(tmp_path, tdir, bad):
    d = _drafter(_target())
    d.token_ordering[5] = bad
    save_drafter(d, tmp_path / "d")
    fails_cleanly(_run(tdir, tmp_path / "d"), f"drafter {tmp_path / 'd'}: the centroid head's token_ordering holds "
                                              f"token id {bad}, outside the vocabulary (0..299)")


def test_token_ordering_not_a_permutation(tmp_path, tdir):
    d = _drafter(_target())
    d.token_ordering[5] = 6  # the default ordering is arange: 6 twice, 5 nowhere
    save_drafter(d, tmp_path / "d")
    fails_cleanly(_run(tdir, tmp_path / "d"), "the centroid head's token_ordering is not a permutation of the "
                                              "vocabulary: token id 6 is listed 2 times and 1 ids not at all")


def test_config_json_missing_or_not_json(tmp_path, tdir):
    save_drafter(_drafter(_target()), tmp_path / "d")
    cfg = tmp_path / "d" / "config.json"
    good = cfg.read_text()
    cfg.unlink()
    with pytest.raises(MtpkitError, match=f"^missing config.json in {tmp_path / 'd'}$"):
        load_drafter(tmp_path / "d")
    fails_cleanly(_run(tdir, tmp_path / "d"), "config.json")
    cfg.write_text(good[:40])
    with pytest.raises(MtpkitError, match="config.json is not valid JSON"):
        load_drafter(tmp_path / "d")
    fails_cleanly(_run(tdir, tmp_path / "d"), "config.json")
    cfg.write_text(json.dumps({**json.loads(good), "hidden_size": "64"}))  # JSON, but not a number
    fails_cleanly(_run(tdir, tmp_path / "d"), "drafter config: hidden_size must be a positive integer, got '64'")
    cfg.write_text("[1, 2]")
    with pytest.raises(MtpkitError, match="must be a JSON object"):
        load_drafter(tmp_path / "d")


def test_config_values_checked():
    t = _target()
    for field, value in [("draft_temperature", float("nan")), ("attn_scale", 0.0), ("rope_theta", "1e6")]:
        with pytest.raises(MtpkitError, match=f"^drafter config: {field} must be a positive finite number"):
            DrafterConfig.for_target(t.config, **{field: value})
    with pytest.raises(MtpkitError, match="sliding layers need a positive integer sliding_window"):
        DrafterConfig.for_target(t.config, sliding_window=None)


def test_safetensors_truncated(tmp_path, tdir):
    save_drafter(_drafter(_target()), tmp_path / "d")
    f = tmp_path / "d" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    fails_cleanly(_run(tdir, tmp_path / "d"), f"cannot read {f}")


def test_wrong_target_shape(tmp_path, tdir):
    save_drafter(_drafter(_target(hidden_size=48)), tmp_path / "d")
    fails_cleanly(_run(tdir, tmp_path / "d"), "drafter does not match the target: target_hidden_size is 48 in the "
                                              "drafter, 64 in the target")


def test_fingerprint_mismatch_warns_and_still_generates(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf")
    from tests.tiny_gguf import write_gguf
    t, other = _target(5), _target(6)  # same shape, other weights
    src = write_gguf(t, tmp_path / "t.gguf")
    d = _drafter(t)
    save_drafter(d, tmp_path / "other", meta={"target": "other", "target_fingerprint": target_fingerprint(other)})
    save_drafter(d, tmp_path / "same", meta={"target": "t", "target_fingerprint": target_fingerprint(load_target(src))})
    res = CliRunner().invoke(_app(), _run(src, tmp_path / "other", "--json"), env={"MTPKIT_QUIET": ""})
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert (f"warning: drafter {tmp_path / 'other'} was trained for another target (this target's weights differ "
            "from the target_fingerprint in its meta.json): acceptance may be low") in lines
    assert len(json.loads(lines[-1])["tokens"]) == 4  # and it generated
    res = CliRunner().invoke(_app(), _run(src, tmp_path / "same", "--json"), env={"MTPKIT_QUIET": ""})
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    # from Python, with a target model: another config of the same drafter-visible shape is named too
    monkeypatch.delenv("MTPKIT_QUIET", raising=False)
    load_drafter(tmp_path / "other", _target(6, rope_theta=500.0))
    assert "(this target's config differs from" in capsys.readouterr().err
    load_drafter(tmp_path / "same", t)
    assert capsys.readouterr().err == ""


def test_fingerprint_survives_dtypes_and_tells_targets_apart():
    t = _target(5)
    fp = target_fingerprint(t)
    assert set(fp) == {"config_sha256", "weights_probe"} and len(fp["weights_probe"]) == 64
    json.dumps(fp)  # meta.json material
    for dt in (torch.bfloat16, torch.float16):  # the same weights loaded in another dtype are the same target
        assert fingerprint_mismatch(fp, target_fingerprint(_target(5).to(dt))) is None
    assert fingerprint_mismatch(fp, target_fingerprint(_target(6))) == "weights"
    assert fingerprint_mismatch(fp, target_fingerprint(_target(5, max_position_embeddings=64))) is None  # no logit sees it
    assert fingerprint_mismatch(fp, target_fingerprint(_target(5, rms_norm_eps=1e-5))) == "config"
    assert fingerprint_mismatch({**fp, "gguf_sha256": "ab"}, {**target_fingerprint(_target(6)), "gguf_sha256": "ab"}) is None
    assert fingerprint_mismatch({"weights_probe": ["x"]}, fp) == "malformed"
    assert fingerprint_mismatch([1], fp) == "malformed"
    assert fingerprint_mismatch({}, fp) is None  # nothing recorded: nothing to compare


def test_shipped_meta_records_the_default_targets_fingerprint():
    from mtpkit.api import DEFAULT_DRAFTERS
    fp = json.loads((DEFAULT_DRAFTERS / "gemma3-270m" / "meta.json").read_text())["target_fingerprint"]
    assert len(fp["weights_probe"]) == 64 and len(fp["config_sha256"]) == 16
    assert fp["gguf_sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_acceptance_warning():
    broken = Stats(new_tokens=100, target_forwards=90, drafted=200, accepted=1)  # a random drafter's run
    w = acceptance_warning(broken)
    assert w == ("warning: the target accepted 1 of 200 drafted tokens (0.5%): the drafter is broken or was trained "
                 "for another target; plain decoding (drafter 'none') would be faster")
    assert "\n" not in w
    assert acceptance_warning(Stats(drafted=200, accepted=0)) is not None
    assert acceptance_warning(Stats(drafted=200, accepted=120)) is None  # a good drafter
    assert acceptance_warning(Stats(drafted=200, accepted=4)) is None  # 2 %: not "almost never"
    assert acceptance_warning(Stats(drafted=19, accepted=0)) is None  # too few drafts to tell
    assert acceptance_warning(Stats()) is None  # plain decoding


def test_mlx_backend_checks_the_drafter_it_reads(tmp_path):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    import mtpkit
    from mtpkit.export.mlx import write_target
    t = _target(hidden_size=64, sliding_window=4)
    write_target(t, None, tmp_path / "target", dtype="float32")
    d = _drafter(t, share_target_embedding=True, hidden_size=64)
    d.token_ordering[7] = 8
    save_drafter(d, tmp_path / "perm", int8=True)
    with pytest.raises(MtpkitError, match="token id 8 is listed 2 times and 1 ids not at all"):
        mtpkit.load(str(tmp_path / "target"), drafter=str(tmp_path / "perm"), backend="mlx")
    d.token_ordering[7] = 7
    with torch.no_grad():
        d.centroids.weight[0, 0] = float("nan")
    save_drafter(d, tmp_path / "nan", int8=True)
    with pytest.raises(MtpkitError, match="tensor 'centroids.weight.int8_scale' holds NaN values"):
        mtpkit.load(str(tmp_path / "target"), drafter=str(tmp_path / "nan"), backend="mlx")


def test_llamacpp_backend_checks_the_centroid_head_it_reads(tmp_path, monkeypatch):
    """An export made while the checks were off (as an old mtpkit could) is refused by the backend that reads it."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from tests.tiny_gguf import write_gguf
    t = _target()
    src = write_gguf(t, tmp_path / "t.gguf")
    d = _drafter(t, hidden_size=64, intermediate_size=64)
    d.token_ordering[7] = 8
    save_drafter(d, tmp_path / "d")
    with monkeypatch.context() as m:
        m.setattr(DrafterConfig, "check_tensors", lambda self, tensors, what: None)
        res = CliRunner().invoke(_app(), ["export", "--format", "gguf", "--target", str(src), "--drafter",
                                          str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--quant", "f32"])
    assert res.exit_code == 0, res.output
    fails_cleanly(_run(tmp_path / "out" / "target.gguf", tmp_path / "out" / "drafter.gguf", "--backend", "llamacpp"),
                  "drafter drafter.gguf: the centroid head's token_ordering is not a permutation of the vocabulary")


def _app():
    from mtpkit.cli import app
    return app
