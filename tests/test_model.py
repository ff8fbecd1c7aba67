"""Reference target + KV cache on tiny random configs: shapes, cached == uncached, rollback, sliding rings."""

from __future__ import annotations

import pytest
import torch

from mtpkit.errors import MtpkitError
from mtpkit.model.config import FULL, SLIDING, GemmaConfig
from tests.conftest import tiny_config, tiny_target

SEEDS = range(8)


def _tokens(model, T, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


def _close(a, b, tol=1e-4):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(1.0, scale), f"max abs diff {err:.3e} (scale {scale:.3e})"


def test_shapes_and_dtypes(target):
    c = target.config
    x = _tokens(target, 7, B=2)
    out = target(x)
    assert out.logits.shape == (2, 7, c.vocab_size) and out.logits.dtype == torch.float32
    assert out.hidden.shape == (2, 7, c.hidden_size)
    bf = tiny_target(0).to(torch.bfloat16)
    out16 = bf(x)
    assert out16.logits.dtype == torch.float32 and out16.hidden.dtype == torch.bfloat16
    assert torch.isfinite(out16.logits).all()
    assert (out16.logits.argmax(-1) == out.logits.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("seed", SEEDS)
def test_cached_decode_matches_full_forward(seed):
    model = tiny_target(seed)
    T = 3 * model.config.sliding_window + 5  # well past the window
    x = _tokens(model, T, B=2, seed=seed)
    full = model(x)
    # small slack so the sliding layers really are rings
    cache = model.new_cache(max_len=T + 4, batch=2, slack=3)
    assert cache.has_ring
    pre = 5
    outs = [model(x[:, :pre], cache)]
    for t in range(pre, T, 2):  # decode 2 tokens per forward
        outs.append(model(x[:, t:t + 2], cache))
    logits = torch.cat([o.logits for o in outs], 1)
    hidden = torch.cat([o.hidden for o in outs], 1)
    _close(logits, full.logits)
    _close(hidden, full.hidden)
    assert cache.length == T


def test_long_prefill_is_chunked_on_rings():
    model = tiny_target(1)
    T = 40
    x = _tokens(model, T)
    cache = model.new_cache(max_len=64, slack=2)
    assert cache.max_chunk == 3
    _close(model(x, cache).logits, model(x).logits)


@pytest.mark.parametrize("seed", SEEDS)
def test_rollback_then_redecode_matches_never_drafted(seed):
    model = tiny_target(seed)
    w = model.config.sliding_window
    T = 4 * w
    x = _tokens(model, T, seed=seed)
    ref = model(x).logits
    slack = 5
    cache = model.new_cache(max_len=T + slack + 1, slack=slack)
    g = torch.Generator().manual_seed(seed + 7)
    model(x[:, :3], cache)
    pos = 3
    outs = [ref[:, :3]]
    while pos < T:
        # draft some garbage tokens (a rejected speculation), verify them together with the true token
        k = int(torch.randint(1, slack, (1,), generator=g))
        junk = torch.randint(0, model.config.vocab_size, (1, k), generator=g)
        o = model(torch.cat([x[:, pos:pos + 1], junk], 1), cache)
        outs.append(o.logits[:, :1])  # the true token's logits are valid; the junk is rejected
        cache.rollback(pos + 1)
        pos += 1
    _close(torch.cat(outs, 1), ref)


def test_rollback_past_slack_raises_and_within_window_works():
    model = tiny_target(2)
    cache = model.new_cache(max_len=100, slack=4)
    x = _tokens(model, 30)
    model(x[:, :20], cache)
    model(x[:, 20:24], cache)
    cache.rollback(20)  # 4 = slack: fine
    with pytest.raises(MtpkitError, match="slack"):
        model(x[:, 20:21], cache)
        cache.rollback(15)
    with pytest.raises(MtpkitError):
        cache.rollback(cache.length + 1)


def test_full_cache_rollback_unbounded():
    model = tiny_target(3, sliding_window=None, layer_types=[FULL, FULL, FULL], num_hidden_layers=3)
    x = _tokens(model, 30)
    cache = model.new_cache(max_len=32)
    assert not cache.has_ring
    model(x[:, :30], cache)
    cache.rollback(5)
    _close(model(x[:, 5:30], cache).logits, model(x).logits[:, 5:])


def test_context_full_and_gap_errors(target):
    cache = target.new_cache(max_len=8, slack=2)
    x = _tokens(target, 9)
    with pytest.raises(MtpkitError, match="context full"):
        target(x, cache)
    cache.reset()
    target(x[:, :2], cache)
    with pytest.raises(ValueError):
        target(x[:, 2:3], cache, start=5)


def test_sliding_window_really_limits_attention():
    """Tokens older than the window must not influence a sliding-only model."""
    model = tiny_target(4, layer_types=[SLIDING, SLIDING], num_hidden_layers=2, sliding_window=4)
    x = _tokens(model, 12)
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % model.config.vocab_size
    a, b = model(x).logits, model(y).logits
    # receptive field of 2 sliding layers with window 4 is 2 * 3 = 6 positions back
    _close(a[:, 7:], b[:, 7:], tol=0)
    assert (a[:, 0] - b[:, 0]).abs().max() > 0


def test_config_roundtrip_and_hf_dict():
    c = tiny_config(5)
    assert GemmaConfig.from_dict(c.to_dict()) == c
    hf = {  # the Gemma 3 270M config.json, as Hugging Face ships it
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-06,
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 32768, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5
        + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"],
    }
    c = GemmaConfig.from_dict(hf)
    assert c == GemmaConfig()
    assert [i for i, t in enumerate(c.layer_types) if t == FULL] == [5, 11, 17]
    assert c.last_layer_of(SLIDING) == 16 and c.last_layer_of(FULL) == 17
    # transformers >= 5 spelling and the old pattern key
    hf5 = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_local_base_freq", "layer_types")}
    hf5["sliding_window_pattern"] = 6
    hf5["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    c5 = GemmaConfig.from_dict({"model_type": "gemma3", "text_config": hf5})
    assert c5.layer_types == c.layer_types and c5.rope_scaling_factor == 8.0 and c5.rope_local_base_freq == 1e4


@pytest.mark.parametrize("bad", [{"model_type": "llama"}, {"num_hidden_layers": 2, "layer_types": ["x", "y"]},
                                 {"hidden_activation": "relu"}, {"hidden_size": 0}])
def test_bad_configs_raise_one_line_errors(bad):
    with pytest.raises(MtpkitError):
        GemmaConfig.from_dict(bad)


def test_hf_transformers_parity_tiny():
    """The reference equals transformers' Gemma3ForCausalLM on the same random weights."""
    pytest.importorskip("transformers")
    model = tiny_target(6)
    c = model.config
    from mtpkit.hf import hf_logits
    x = _tokens(model, 3 * c.sliding_window)
    theirs = hf_logits(c, model.state_dict(), x)
    _close(model(x).logits, theirs, tol=1e-4)
