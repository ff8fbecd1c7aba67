"""Shared fixtures: tiny random Gemma targets and drafters (seconds, no downloads)."""

from __future__ import annotations

import random

import pytest
import torch

from mtpkit.model.config import FULL, SLIDING, DrafterConfig, GemmaConfig
from mtpkit.model.drafter import DrafterModel
from mtpkit.model.gemma import GemmaModel


def tiny_config(seed: int = 0, **overrides) -> GemmaConfig:
    """A random small Gemma config: GQA, sliding + full layers, small window."""
    rng = random.Random(seed)
    n_kv = rng.choice([1, 2])
    kw = dict(
        vocab_size=rng.choice([64, 96, 128]), hidden_size=rng.choice([32, 48, 64]),
        intermediate_size=rng.choice([64, 96]), num_hidden_layers=rng.choice([2, 3, 4]),
        num_attention_heads=n_kv * rng.choice([1, 2]), num_key_value_heads=n_kv, head_dim=rng.choice([8, 16]),
        query_pre_attn_scalar=rng.choice([8.0, 16.0]), sliding_window=rng.choice([4, 6, 8]),
        rope_theta=10_000.0, rope_local_base_freq=100.0, max_position_embeddings=512,
        final_logit_softcapping=rng.choice([None, 30.0]))
    kw.update(overrides)
    n = kw["num_hidden_layers"]
    kw.setdefault("layer_types", [FULL if (i + 1) % 2 == 0 or i == n - 1 else SLIDING for i in range(n)])
    if SLIDING not in kw["layer_types"] and kw["sliding_window"]:
        kw["layer_types"][0] = SLIDING
    return GemmaConfig(**kw)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights, norms included (so the (1 + w) convention is exercised).

    Small embeddings and gain-2 matrices keep the tied head from just echoing the input token, so
    greedy text from a tiny random model is varied (tens of distinct tokens), not one token repeated.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scalar"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(2.0 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def tiny_target(seed: int = 0, **overrides) -> GemmaModel:
    torch.manual_seed(seed)
    return randomize_(GemmaModel(tiny_config(seed, **overrides)), seed).eval()


def export_target(seed: int = 5, **overrides) -> GemmaModel:
    """The tiny target the exporters' tests use: one KV head, sliding + full layers, softcapping."""
    cfg = dict(vocab_size=288, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32.0, sliding_window=6,
               layer_types=[SLIDING, FULL, SLIDING, FULL], final_logit_softcapping=30.0)
    return tiny_target(seed, **{**cfg, **overrides})


@pytest.fixture(autouse=True)
def _no_progress_lines(monkeypatch):
    """Progress lines go to stderr, which typer's CliRunner mixes into `output`: tests that parse output run with
    MTPKIT_QUIET=1; a test of the progress lines themselves deletes it."""
    monkeypatch.setenv("MTPKIT_QUIET", "1")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """MTPKIT_CACHE in the test's tmp_path: imported targets do not touch the user's cache."""
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))


def tiny_drafter(target: GemmaModel, seed: int = 0, **overrides) -> DrafterModel:
    c = target.config
    kw = dict(hidden_size=32, intermediate_size=64, layer_types=[SLIDING, FULL])
    kw.update(overrides)
    return randomize_(DrafterModel(DrafterConfig.for_target(c, **kw)), seed + 1000).eval()


@pytest.hookimpl(tryfirst=True)  # before `-m 'not slow'` deselects
def pytest_collection_modifyitems(config, items):
    """A test module's SLOW_IDS (substrings of test ids) marks those parametrizations slow."""
    for item in items:
        if any(s in item.nodeid for s in getattr(item.module, "SLOW_IDS", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def target() -> GemmaModel:
    return tiny_target(0)


def fails_cleanly(args: list[str], match: str, app=None) -> None:
    """The CLI (`mtpkit`, or another typer `app`) refuses `args` the way users are promised: exit 2, one
    `error: ...` line containing `match`, no traceback. Progress lines (stderr) are silenced: MTPKIT_QUIET=1."""
    from typer.testing import CliRunner

    if app is None:
        from mtpkit.cli import app
    res = CliRunner().invoke(app, args, env={"MTPKIT_QUIET": "1"})
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    assert match in lines[0], lines[0]


class ReplayedCall:
    """A CUDA graph's stand-in on a CPU: replay() calls the captured function again and copies what it returns into the
    tensors capture returned, as replaying a graph rewrites its static outputs in place."""

    def __init__(self, fn, inputs, out):
        self.fn, self.inputs, self.out = fn, inputs, out

    def replay(self) -> None:
        _copy_into(self.out, self.fn(*self.inputs))


def _copy_into(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for a, b in zip(dst, src, strict=True):
            _copy_into(a, b)
    elif isinstance(dst, dict):
        for key in dst:
            _copy_into(dst[key], src[key])


def with_cpu_graphs(be):
    """The torch backend `be` (on a CPU) running its CUDA-graph paths (runtime/torch_backend._Graphs: fused drafts,
    plain chunks, acceptance, draft trees) with each graph a ReplayedCall: the graphs' buffer plumbing, tested without
    a GPU. Returns be."""
    from mtpkit.runtime.torch_backend import _Graphs

    class CpuGraphs(_Graphs):
        def _capture(self, fn, inputs):
            for _ in range(2):  # the warm-up runs, as on CUDA
                fn(*inputs)
            out = fn(*inputs)
            return ReplayedCall(fn, inputs, out), out
    be._set_graphs(CpuGraphs(be))
    return be
