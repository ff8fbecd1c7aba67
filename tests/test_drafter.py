"""Reference drafter on tiny configs: shared-cache reads without copies, masking, heads, save/load."""

from __future__ import annotations

import pytest
import torch

from mtpkit.errors import MtpkitError
from mtpkit.model.config import FULL, SLIDING, DrafterConfig
from mtpkit.model.drafter import DrafterModel, draft_step, target_kv
from mtpkit.model.load import load_drafter, save_drafter
from tests.conftest import randomize_, tiny_drafter, tiny_target


def _prefill(target, T, seed=0, slack=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, target.config.vocab_size, (1, T), generator=g)
    cache = target.new_cache(max_len=T + 16, slack=slack)
    out = target(x, cache)
    return x, cache, out


def test_drafter_reads_target_kv_without_copy(target):
    drafter = tiny_drafter(target)
    x, cache, out = _prefill(target, 10)
    kv = target_kv(cache, target.config)
    for kind, layer in ((SLIDING, target.config.last_layer_of(SLIDING)), (FULL, target.config.last_layer_of(FULL))):
        assert kv[kind][0].data_ptr() == cache.k[layer].data_ptr()
        assert kv[kind][1].data_ptr() == cache.v[layer].data_ptr()
    step = draft_step(target, drafter, x[:, -1], out.hidden[:, -1], cache)
    assert step.logits.shape == (1, 1, target.config.vocab_size)
    assert step.hidden.shape == (1, 1, target.config.hidden_size)
    # the drafter really reads the shared buffers: changing them in place changes its output
    cache.k[target.config.last_layer_of(FULL)].mul_(-1)
    again = draft_step(target, drafter, x[:, -1], out.hidden[:, -1], cache)
    assert not torch.allclose(step.logits, again.logits)


def test_drafter_never_sees_the_bonus_position_or_rolled_back_keys(target):
    """A query at q = cache.length sees keys < q only: K/V written past it (rejected drafts) are invisible."""
    drafter = tiny_drafter(target)
    x, cache, out = _prefill(target, 9, slack=6)
    ref = draft_step(target, drafter, x[:, -1], out.hidden[:, -1], cache)
    target(torch.randint(0, target.config.vocab_size, (1, 5)), cache)  # junk at positions 9..13
    cache.rollback(9)
    again = draft_step(target, drafter, x[:, -1], out.hidden[:, -1], cache)
    torch.testing.assert_close(again.logits, ref.logits, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_parallel_positions_equal_per_step_calls(seed):
    """Training runs all positions at once (T > 1, one q_pos each); it must equal the runtime's T = 1 steps."""
    target = tiny_target(seed)
    drafter = tiny_drafter(target, seed)
    T = 3 * target.config.sliding_window
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, target.config.vocab_size, (1, T), generator=g)
    full_cache = target.new_cache(max_len=T, slack=T)  # no ring: every position stays
    out = target(x, full_cache)
    q_pos = torch.arange(1, T)  # draft the token after x[t] at query position t + 1
    emb = target.embed(x[:, 1:])
    par = drafter(emb, out.hidden[:, :-1], q_pos, target_kv(full_cache, target.config))
    ring_cache = target.new_cache(max_len=T + 4, slack=3)
    for t in range(T - 1):
        target(x[:, t:t + 1], ring_cache)  # cache holds positions 0..t, query at t + 1
        one = draft_step(target, drafter, x[:, t + 1], out.hidden[:, t], ring_cache)
        torch.testing.assert_close(one.logits[:, 0], par.logits[:, t], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(one.hidden[:, 0], par.hidden[:, t], rtol=1e-4, atol=1e-4)


def test_centroid_head_candidates_and_dense_view(target):
    c = target.config
    drafter = tiny_drafter(target, head="centroid", num_centroids=8, centroid_top_k=2)
    g = torch.Generator().manual_seed(0)
    drafter.token_ordering.copy_(torch.randperm(c.vocab_size, generator=g))
    x, cache, out = _prefill(target, 6)
    step = draft_step(target, drafter, x[:, -1], out.hidden[:, -1], cache)
    n = 2 * c.vocab_size // 8
    assert step.ids.shape == (1, 1, n) and step.logits.shape == (1, 1, n)
    assert step.ids.unique().numel() == n  # disjoint clusters
    chosen = step.centroid_logits.topk(2, -1).indices[0, 0]
    clusters = drafter.token_ordering.view(8, -1)[chosen].flatten()
    assert set(clusters.tolist()) == set(step.ids[0, 0].tolist())
    dense = step.dense_logits(c.vocab_size)
    assert torch.isinf(dense).sum() == c.vocab_size - n
    # candidate logits equal the dense head's logits on the same ids
    dense_drafter = DrafterModel(DrafterConfig(**{**drafter.config.__dict__, "head": "dense"}))
    sd = {k: v for k, v in drafter.state_dict().items() if k not in ("centroids.weight", "token_ordering")}
    dense_drafter.load_state_dict(sd)
    d_out = draft_step(target, dense_drafter, x[:, -1], out.hidden[:, -1], cache)
    torch.testing.assert_close(d_out.logits[0, 0, step.ids[0, 0]], step.logits[0, 0])


def test_save_load_roundtrip_and_mismatch(tmp_path, target):
    drafter = tiny_drafter(target, head="centroid", num_centroids=4, centroid_top_k=1)
    save_drafter(drafter, tmp_path / "d", meta={"note": "test"})
    back = load_drafter(tmp_path / "d", target.config)
    for k, v in drafter.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    other = tiny_target(0, hidden_size=target.config.hidden_size + 16)
    with pytest.raises(MtpkitError, match="target_hidden_size"):
        load_drafter(tmp_path / "d", other.config)
    (tmp_path / "d" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(MtpkitError, match="cannot read"):
        load_drafter(tmp_path / "d")
    with pytest.raises(MtpkitError, match="not a directory"):
        load_drafter(tmp_path / "nope")


def test_int8_storage_roundtrip_and_errors(tmp_path, target):
    """int8 + per-row scales: half the bytes, each weight within half a quantization step, bad files refused."""
    from safetensors.torch import load_file, save_file

    from mtpkit.model.load import INT8_SCALE
    drafter = randomize_(tiny_drafter(target, head="centroid", num_centroids=4, centroid_top_k=1), 3)
    save_drafter(drafter, tmp_path / "d", int8=True)
    raw = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert raw["pre_projection.weight"].dtype == torch.int8 and raw["token_ordering"].dtype == torch.int32
    assert raw["norm.weight"].dtype == torch.float32  # vectors are kept as they are
    back = load_drafter(tmp_path / "d", target)
    for k, v in drafter.state_dict().items():
        got = back.state_dict()[k]
        if k + INT8_SCALE in raw:
            step = raw[k + INT8_SCALE][:, None]
            assert ((got - v).abs() <= step / 2 + 1e-6).all(), k
            assert not torch.equal(got, v), k  # really rounded
        else:
            assert torch.equal(got, v), k
    x, cache, out = _prefill(target, 6)
    a = draft_step(target, drafter, x[:, -1], out.hidden[:, -1], cache).logits
    b = draft_step(target, back, x[:, -1], out.hidden[:, -1], cache).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    # an int8 matrix without its scales, or scales of the wrong shape, is refused with one line
    bad = dict(raw)
    del bad["pre_projection.weight" + INT8_SCALE]
    save_file(bad, str(tmp_path / "d" / "model.safetensors"))
    with pytest.raises(MtpkitError, match="has no '.int8_scale' scales"):
        load_drafter(tmp_path / "d")
    bad = dict(raw)
    bad["pre_projection.weight" + INT8_SCALE] = torch.ones(3)
    save_file(bad, str(tmp_path / "d" / "model.safetensors"))
    with pytest.raises(MtpkitError, match="does not scale an int8 matrix"):
        load_drafter(tmp_path / "d")


def test_drafter_config_validation(target):
    with pytest.raises(MtpkitError):
        DrafterConfig.for_target(target.config, head="sparse")
    with pytest.raises(MtpkitError):
        DrafterConfig.for_target(target.config, head="centroid", num_centroids=7)
    bad = DrafterConfig.for_target(target.config, head_dim=target.config.head_dim * 2)
    with pytest.raises(MtpkitError, match="head_dim"):
        bad.check_target(target.config)
    cfg = DrafterConfig.for_target(target.config, layer_types=[SLIDING, FULL, FULL])
    assert DrafterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(MtpkitError, match="unknown drafter config"):
        DrafterConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_layer_scalar_scales_block_output(target):
    drafter = randomize_(DrafterModel(DrafterConfig.for_target(target.config, hidden_size=16,
                                                               intermediate_size=32, layer_types=[FULL])), 3)
    x, cache, out = _prefill(target, 5)
    a = draft_step(target, drafter, x[:, -1], out.hidden[:, -1], cache)
    with torch.no_grad():
        drafter.layers[0].layer_scalar.mul_(0)
    b = draft_step(target, drafter, x[:, -1], out.hidden[:, -1], cache)
    # a zero scalar leaves only the final norm's bias-free output of zeros -> all-equal logits
    assert not torch.allclose(a.logits, b.logits)
    assert torch.allclose(b.logits, torch.zeros_like(b.logits))


def _shared(target, **kw):
    c = target.config
    return tiny_drafter(target, hidden_size=c.hidden_size, share_target_embedding=True, **kw)


@pytest.mark.parametrize("head", ["dense", "centroid"])
def test_shared_target_embedding_equals_a_copied_own_embedding(target, head):
    """share_target_embedding: the head reads the target's matrix; same outputs as an own copy of it."""
    kw = dict(head="centroid", num_centroids=8, centroid_top_k=2) if head == "centroid" else {}
    shared = _shared(target, **kw)
    assert "embed_tokens.weight" not in shared.state_dict()
    own = DrafterModel(DrafterConfig(**{**shared.config.__dict__, "share_target_embedding": False}))
    own.load_state_dict({**shared.state_dict(), "embed_tokens.weight": target.embed_tokens.weight.detach().clone()})
    emb_rows = target.config.vocab_size * target.config.hidden_size
    assert shared.num_parameters() == own.num_parameters() - emb_rows  # the target's tensor is not counted
    x, cache, out = _prefill(target, 7)
    with pytest.raises(MtpkitError, match="bind_target"):
        shared(target.embed(x[:, -1:]), out.hidden[:, -1:], torch.tensor([7]), target_kv(cache, target.config))
    a = draft_step(target, shared, x[:, -1], out.hidden[:, -1], cache)  # binds to the target it is given
    assert shared.head_weight is target.embed_tokens.weight
    b = draft_step(target, own, x[:, -1], out.hidden[:, -1], cache)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.hidden, b.hidden)


def test_shared_embedding_save_load_and_validation(tmp_path, target):
    shared = _shared(target)
    save_drafter(shared, tmp_path / "d")
    from safetensors.torch import load_file
    assert "embed_tokens.weight" not in load_file(str(tmp_path / "d" / "model.safetensors"))
    unbound = load_drafter(tmp_path / "d", target.config)
    assert not unbound.is_bound
    back = load_drafter(tmp_path / "d", target)  # a model (not just its config) binds
    assert back.is_bound and back.head_weight is target.embed_tokens.weight
    x, cache, out = _prefill(target, 5)
    torch.testing.assert_close(draft_step(target, back, x[:, -1], out.hidden[:, -1], cache).logits,
                               draft_step(target, shared, x[:, -1], out.hidden[:, -1], cache).logits)
    with pytest.raises(MtpkitError, match="share_target_embedding needs hidden_size"):
        DrafterConfig.for_target(target.config, hidden_size=target.config.hidden_size + 8, share_target_embedding=True)
    with pytest.raises(MtpkitError, match="shape"):
        shared.bind_target(torch.zeros(3, target.config.hidden_size))
    with pytest.raises(MtpkitError, match="own embedding"):
        tiny_drafter(target).bind_target(target.embed_tokens.weight)
