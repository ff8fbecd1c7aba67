"""Target import (GGUF and HF directories) and `mtpkit info`, including the bad-input contract:
one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from mtpkit.cli import app
from mtpkit.model.load import load_target
from tests.conftest import fails_cleanly, tiny_target
from tests.tiny_gguf import write_gguf

runner = CliRunner()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny():
    return tiny_target(3, vocab_size=300)


def _hf_dir(model, d, prefix="model."):
    from safetensors.torch import save_file
    d.mkdir()
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))
    sd = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd[prefix + "embed_tokens.weight"].clone()
    save_file(sd, str(d / "model.safetensors"))
    return d


def _same_weights(a, b):
    for k, v in a.state_dict().items():
        # GGUF stores norms as 1 + w in f32, so w comes back within float rounding
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=1e-6 if "norm" in k else 0, msg=k)


def test_gguf_import_roundtrip_and_cache(tiny, tmp_path):
    path = write_gguf(tiny, tmp_path / "tiny.gguf")
    t = load_target(path)
    assert t.config == tiny.config
    _same_weights(tiny, t.model)  # the (1 + w) norms and the name table invert exactly
    x = torch.randint(0, 300, (1, 9))
    torch.testing.assert_close(t.model(x).logits, tiny(x).logits)
    assert t.tokenizer.vocab_size == 300 and t.tokenizer.encode("abc")[0] == 2
    again = load_target(path)  # second load comes from the cache
    assert again.source["cache"] == t.source["cache"]
    _same_weights(tiny, again.model)


def test_hf_dir_import(tiny, tmp_path):
    t = load_target(_hf_dir(tiny, tmp_path / "hf"))
    _same_weights(tiny, t.model)
    assert t.tokenizer is None and t.source["kind"] == "hf-dir"


def test_info_json(tiny, tmp_path):
    path = write_gguf(tiny, tmp_path / "tiny.gguf")
    res = runner.invoke(app, ["info", "--target", str(path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    n = sum(p.numel() for p in tiny.parameters())
    assert out["parameters"]["total"] == n
    assert out["config"]["hidden_size"] == tiny.config.hidden_size
    assert out["source"]["kind"] == "gguf" and out["tokenizer"]["vocab_size"] == 300
    res = runner.invoke(app, ["info", "--target", str(path)])
    assert res.exit_code == 0 and "parameters" in res.output


def test_bad_targets(tiny, tmp_path):
    fails_cleanly(["info", "--target", "no-such-model"], "unknown target")
    good = write_gguf(tiny, tmp_path / "good.gguf").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(good[: len(good) // 2])
    fails_cleanly(["info", "--target", str(tmp_path / "trunc.gguf")], "cannot read GGUF")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    fails_cleanly(["info", "--target", str(tmp_path / "junk.gguf")], "cannot read GGUF")
    (tmp_path / "weights.bin").write_bytes(b"x")
    fails_cleanly(["info", "--target", str(tmp_path / "weights.bin")], "neither")
    # GGUF metadata that does not match its tensors
    write_gguf(tiny, tmp_path / "more_layers.gguf", block_count=tiny.config.num_hidden_layers + 1)
    fails_cleanly(["info", "--target", str(tmp_path / "more_layers.gguf")], "lacks tensor")


def test_bad_hf_dirs(tiny, tmp_path):
    d = _hf_dir(tiny, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": cfg["hidden_size"] * 2}))
    fails_cleanly(["info", "--target", str(d)], "shape")
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] - 1,
                                               "layer_types": cfg["layer_types"][:-1]}))
    fails_cleanly(["info", "--target", str(d)], "does not")
    (d / "config.json").write_text("{not json")
    fails_cleanly(["info", "--target", str(d)], "not valid JSON")
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    fails_cleanly(["info", "--target", str(d)], "cannot read")
    (d / "config.json").unlink()
    fails_cleanly(["info", "--target", str(d)], "missing config.json")


def test_cli_imports_no_heavy_optional_dependencies():
    code = ("import sys, mtpkit.cli\n"
            "heavy = [m for m in ('mlx', 'coremltools', 'llama_cpp', 'onnxruntime', 'transformers', 'torch')"
            " if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    helped = subprocess.run([sys.executable, "-m", "mtpkit", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "info" in helped.stdout


@pytest.mark.parametrize("args,match", [
    (["run", ""], "empty prompt"), (["run", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    (["run", "x", "--temperature", "-1"], "temperature"), (["run", "x", "--top-p", "0"], "top_p"),
    (["run", "x", "--top-p", "1.5"], "top_p"), (["run", "x", "-k", "0"], "num_draft_tokens"),
    (["run", "x", "--target", "nope"], "unknown target"),
])
def test_run_bad_input(args, match):
    fails_cleanly(args, match)


def test_run_json_and_drafter_mismatch(tiny, tmp_path):
    from mtpkit.model.load import save_drafter
    from tests.conftest import tiny_drafter
    path = write_gguf(tiny, tmp_path / "tiny.gguf")
    save_drafter(tiny_drafter(tiny), tmp_path / "d")
    res = runner.invoke(app, ["run", "abc", "--target", str(path), "--drafter", str(tmp_path / "d"),
                              "--max-new-tokens", "12", "--json", "--compare", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert len(out["tokens"]) == 12 and out["plain"]["identical"] and out["stats"]["tau"] >= 1.0
    other = tiny_target(0, vocab_size=300, hidden_size=tiny.config.hidden_size + 16)
    save_drafter(tiny_drafter(other), tmp_path / "bad")
    fails_cleanly(["run", "abc", "--target", str(path), "--drafter", str(tmp_path / "bad")], "does not match")
