"""mtpkit.export.mil_eval: small torch modules converted by coremltools (iOS18 ML Programs), saved, loaded back and
evaluated with numpy against torch: fp32 and fp16 compute, a KV-cache state over two calls, a multifunction package,
int8/int4 block-quantized weights, the coremltools int16-cast trap on token ids, and the numpy ops against
coremltools' own per-op value_inference."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")

from coremltools.converters.mil import Builder as mb  # noqa: E402

from mtpkit.export import mil_eval  # noqa: E402
from mtpkit.export.mil_eval import Evaluator, int16_ops, load_program  # noqa: E402

F = torch.nn.functional
FP32, FP16 = ct.precision.FLOAT32, ct.precision.FLOAT16


def _convert(module, example, inputs, outputs, path, precision, states=None, pass_pipeline=None):
    traced = torch.jit.trace(module.eval(), example)
    kw = {} if pass_pipeline is None else {"pass_pipeline": pass_pipeline}
    ml = ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(n) for n in outputs], states=states,
                    convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, compute_precision=precision,
                    **kw)
    ml.save(str(path))
    return path


def _i32(name, shape):
    return ct.TensorType(name, shape=shape, dtype=np.int32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# --- 1. a tiny transformer block ---

class Block(torch.nn.Module):
    """Embedding (70,000 rows), RMSNorm, rope from a position input, causal softmax attention, GELU-tanh MLP, tied
    logits."""

    def __init__(self, vocab=70_000, d=64, heads=2, ff=128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.heads, self.hd = heads, d // heads
        self.emb = torch.nn.Parameter(torch.randn(vocab, d, generator=g) * 0.5)
        self.norm1 = torch.nn.Parameter(1 + 0.1 * torch.randn(d, generator=g))
        self.norm2 = torch.nn.Parameter(1 + 0.1 * torch.randn(d, generator=g))
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.up, self.down = torch.nn.Linear(d, ff), torch.nn.Linear(ff, d)
        with torch.no_grad():
            for p in [*self.qkv.parameters(), self.o.weight, *self.up.parameters(), *self.down.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.register_buffer("inv_freq", 1.0 / 10_000 ** (torch.arange(0, self.hd, 2).float() / self.hd))

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rope(self, x, cos, sin):
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(self, ids, pos):  # ids [1, T] int32, pos [1] int32: the first token's position
        t = ids.shape[1]
        x = F.embedding(ids, self.emb)
        p = pos[0] + torch.arange(t, dtype=torch.int32)  # [T]
        ang = p.float()[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cos(ang), torch.sin(ang)
        q, k, v = self.qkv(self.rms(x, self.norm1)).view(1, t, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
        scores = scores.masked_fill(p[None, :] > p[:, None], float("-inf"))  # causal by position
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, t, -1)
        x = x + self.o(a)
        x = x + self.down(F.gelu(self.up(self.rms(x, self.norm2)), approximate="tanh"))
        return x, x @ self.emb.T


@pytest.mark.parametrize("precision,tol", [(FP32, 2e-5), (FP16, 2e-2)])
def test_block_matches_torch(tmp_path, precision, tol):
    m = Block()
    ids = torch.tensor([[3, 40_000, 69_999, 17, 66_000]], dtype=torch.int32)
    pos = torch.tensor([7], dtype=torch.int32)
    path = _convert(m, (ids, pos), [_i32("ids", (1, 5)), _i32("pos", (1,))], ["h", "logits"],
                    tmp_path / "block.mlpackage", precision)
    ev = Evaluator(load_program(path))
    assert ev.input_names == ["ids", "pos"] and ev.output_names == ["h", "logits"]
    out = ev({"ids": ids.numpy(), "pos": pos.numpy()})
    with torch.no_grad():
        h, logits = (t.numpy() for t in m(ids, pos))
    assert out["logits"].dtype == (np.float32 if precision is FP32 else np.float16)
    assert out["logits"].shape == (1, 5, 70_000)
    assert _rel(out["h"], h) < tol and _rel(out["logits"], logits) < tol
    assert (out["logits"].argmax(-1) == logits.argmax(-1)).all()
    if precision is FP32:  # and the ids reached the right embedding rows: no int16 cast in an fp32 program
        assert int16_ops(load_program(path)) == []


# --- 2. + 3. a KV cache in a state; two functions over one state ---

class KV(torch.nn.Module):
    """Per layer: writes K/V for n tokens at a dynamic position into fp16 buffers [L, 1, H, S, D]
    (`self.k[l:l + 1, :, :, p:p + n] = ...`) and attends (SDPA) to that layer's cache up to each token's position."""

    def __init__(self, layers=3, heads=2, seq=16, hd=8, d=16):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.L, self.H, self.S, self.D = layers, heads, seq, hd
        self.proj = torch.nn.Parameter(torch.randn(layers, d, 3 * heads * hd, generator=g) * 0.3)
        self.out = torch.nn.Parameter(torch.randn(layers, heads * hd, d, generator=g) * 0.3)
        self.register_buffer("k", torch.zeros(layers, 1, heads, seq, hd, dtype=torch.float16))
        self.register_buffer("v", torch.zeros(layers, 1, heads, seq, hd, dtype=torch.float16))

    def forward(self, x, pos):  # x [1, n, d] fp32, pos [1] int32 -> [1, n, d]
        n, p = x.shape[1], pos[0]
        mask = torch.arange(self.S)[None, :] <= (p + torch.arange(n))[:, None]  # [n, S]
        for i in range(self.L):
            q, k, v = (x @ self.proj[i]).view(1, n, 3, self.H, self.D).permute(2, 0, 3, 1, 4)  # [1, H, n, D]
            self.k[i:i + 1, :, :, p:p + n] = k.half()
            self.v[i:i + 1, :, :, p:p + n] = v.half()
            o = F.scaled_dot_product_attention(q, self.k[i].float(), self.v[i].float(), attn_mask=mask)
            x = x + o.transpose(1, 2).reshape(1, n, -1) @ self.out[i]
        return x


def _kv_states(m):
    return [ct.StateType(ct.TensorType(shape=tuple(b.shape), dtype=np.float16), name=n) for n, b in
            (("k", m.k), ("v", m.v))]


def _kv_convert(m, n, path, precision):
    x = torch.randn(1, n, 16)
    path = _convert(m, (x, torch.tensor([0], dtype=torch.int32)), [ct.TensorType("x", shape=(1, n, 16)),
                    _i32("pos", (1,))], ["o"], path, precision, states=_kv_states(m))
    with torch.no_grad():  # tracing ran forward and wrote into the buffers
        m.k.detach_().zero_(), m.v.detach_().zero_()
    return path


@pytest.mark.parametrize("precision,tol", [(FP32, 1e-5), (FP16, 1e-2)])
def test_state_two_calls(tmp_path, monkeypatch, precision, tol):
    m = KV()
    path = _kv_convert(m, 3, tmp_path / "kv.mlpackage", precision)
    prog = load_program(path)
    ops = {op.op_type for op in prog.functions["main"].operations}
    assert {"read_state", "coreml_update_state", "slice_update", "scaled_dot_product_attention"} <= ops
    ev = Evaluator(prog)
    state = ev.new_state()
    assert sorted(state) == ["k", "v"] and state["k"].dtype == np.float16 and state["k"].shape == (3, 1, 2, 16, 8)
    with pytest.raises(ValueError, match="state"):
        ev({"x": np.zeros((1, 3, 16), np.float32), "pos": np.array([0], np.int32)})
    monkeypatch.setattr(mil_eval, "_kv_plan", lambda f: (set(), {}))
    plain = Evaluator(prog)  # copies the whole cache at every write, literally
    monkeypatch.undo()
    plain_state = plain.new_state()
    g = torch.Generator().manual_seed(2)
    for p in (0, 3):
        x = torch.randn(1, 3, 16, generator=g)
        pos = torch.tensor([p], dtype=torch.int32)
        out = ev({"x": x.numpy(), "pos": pos.numpy()}, state)["o"]
        with torch.no_grad():
            ref = m(x, pos).numpy()
        assert _rel(out, ref) < tol
        # the in-place cache writes (mil_eval._kv_plan) change no bit
        assert np.array_equal(plain({"x": x.numpy(), "pos": pos.numpy()}, plain_state)["o"], out)
        assert all(np.array_equal(plain_state[n], state[n]) for n in state)
    for name in ("k", "v"):  # the caller's arrays were written in place, positions 0..5, the rest still zero
        buf = getattr(m, name).numpy()
        assert _rel(state[name], buf) < tol
        assert not state[name][:, :, :, 6:].any() and state[name][:, :, :, :6].all()


def test_multifunction_shares_state(tmp_path):
    m = KV()
    prefill = _kv_convert(m, 3, tmp_path / "prefill.mlpackage", FP32)
    decode = _kv_convert(m, 1, tmp_path / "decode.mlpackage", FP32)
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(prefill), src_function_name="main", target_function_name="prefill")
    desc.add_function(str(decode), src_function_name="main", target_function_name="decode")
    desc.default_function_name = "decode"
    ct.utils.save_multifunction(desc, str(tmp_path / "both.mlpackage"))
    prog = load_program(tmp_path / "both.mlpackage")
    assert sorted(prog.functions) == ["decode", "prefill"]
    pre, dec = Evaluator(prog, "prefill"), Evaluator(prog, "decode")
    with pytest.raises(KeyError, match="main"):
        Evaluator(prog)
    state = pre.new_state()
    g = torch.Generator().manual_seed(3)
    for ev, n, p in ((pre, 3, 0), (dec, 1, 3), (dec, 1, 4)):
        x = torch.randn(1, n, 16, generator=g)
        pos = torch.tensor([p], dtype=torch.int32)
        out = ev({"x": x.numpy(), "pos": pos.numpy()}, state)["o"]
        with torch.no_grad():
            ref = m(x, pos).numpy()
        assert out.shape == (1, n, 16) and _rel(out, ref) < 1e-5
    assert _rel(state["k"], m.k.numpy()) < 1e-3 and not state["k"][:, :, :, 5:].any()


# --- 4. block-quantized weights ---

class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.a, self.b = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.b(F.silu(self.a(x)))


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_block_quantized_weights(tmp_path, dtype):
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights
    m = MLP()
    x = torch.randn(2, 64)
    _convert(m, (x,), [ct.TensorType("x", shape=(2, 64))], ["y"], tmp_path / "f.mlpackage", FP32)
    cfg = OpLinearQuantizerConfig(mode="linear_symmetric", dtype=dtype, granularity="per_block", block_size=32,
                                  weight_threshold=1000)
    q = linear_quantize_weights(ct.models.MLModel(str(tmp_path / "f.mlpackage"), skip_model_load=True),
                                OptimizationConfig(global_config=cfg))
    q.save(str(tmp_path / "q.mlpackage"))
    prog = load_program(tmp_path / "q.mlpackage")
    ev = Evaluator(prog)
    cx = [op for op in prog.functions["main"].operations if op.op_type == "constexpr_blockwise_shift_scale"]
    assert len(cx) == 2
    deq = {}
    for op in cx:  # dequantize here, independently: data [out, in] int, scale [out, in / 32]
        data, scale = op.data.val, op.scale.val
        assert data.dtype == np.int8 and data.min() >= (-8 if dtype == "int4" else -128)
        assert scale.shape == (data.shape[0], data.shape[1] // 32)
        w = data.astype(np.float32) * np.repeat(scale.astype(np.float32), 32, axis=1)
        assert np.array_equal(ev._env[op.outputs[0].name], w)
        assert np.allclose(op.materialized_val_inference(), w, rtol=1e-6, atol=0)  # coremltools' own
        deq[data.shape] = w
    out = ev({"x": x.numpy()})["y"]
    with torch.no_grad():
        ref = m(x).numpy()
        m.a.weight.copy_(torch.from_numpy(deq[(128, 64)]))
        m.b.weight.copy_(torch.from_numpy(deq[(64, 128)]))
        ref_q = m(x).numpy()
    assert _rel(out, ref_q) < 1e-5  # exact dequant: float32 rounding only
    assert _rel(out, ref) > (1e-3 if dtype == "int4" else 1e-4)  # while the quantization error is visible


@pytest.mark.parametrize("target,kind", [("iOS18", "palettize"), ("iOS16", "palettize"), ("iOS16", "int8")])
def test_lut_and_affine_weights(tmp_path, target, kind):
    """iOS18 grouped LUTs (constexpr_lut_to_dense, decoded here), iOS16 packed LUTs (decoded by coremltools) and
    iOS16 per-channel asymmetric int8 (constexpr_affine_dequantize, decoded here): equal to coremltools'
    materialization, and the outputs equal torch with those weights."""
    from coremltools.optimize.coreml import (
        OpLinearQuantizerConfig,
        OpPalettizerConfig,
        OptimizationConfig,
        linear_quantize_weights,
        palettize_weights,
    )
    m, x = MLP(), torch.randn(2, 64)
    traced = torch.jit.trace(m.eval(), (x,))
    ml = ct.convert(traced, inputs=[ct.TensorType("x", shape=(2, 64))], outputs=[ct.TensorType("y")],
                    convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target),
                    compute_precision=FP32)
    if kind == "int8":
        ml = linear_quantize_weights(ml, OptimizationConfig(OpLinearQuantizerConfig(
            mode="linear", dtype="int8", weight_threshold=1000)))
    else:
        grouped = dict(granularity="per_grouped_channel", group_size=16) if target == "iOS18" else {}
        ml = palettize_weights(ml, OptimizationConfig(OpPalettizerConfig(
            mode="uniform", nbits=4, weight_threshold=1000, **grouped)))
    ml.save(str(tmp_path / "c.mlpackage"))
    prog = load_program(tmp_path / "c.mlpackage")
    ev = Evaluator(prog)
    op_type = "constexpr_affine_dequantize" if kind == "int8" else "constexpr_lut_to_dense"
    cx = [op for op in prog.functions["main"].operations if op.op_type.startswith("constexpr_")]
    assert [op.op_type for op in cx] == [op_type] * 2
    w = {}
    for op in cx:
        w[op.outputs[0].shape] = ev._env[op.outputs[0].name]
        np.testing.assert_array_equal(w[op.outputs[0].shape], op.materialized_val_inference())
    if kind == "palettize":  # 16 values per table: one table (iOS16) or one per 16 output channels (iOS18)
        assert len(np.unique(w[(128, 64)])) <= 16 * 8
    else:  # 256 levels per output channel
        assert max(len(np.unique(row)) for row in w[(64, 128)]) <= 256
    with torch.no_grad():
        m.a.weight.copy_(torch.from_numpy(w[(128, 64)]))
        m.b.weight.copy_(torch.from_numpy(w[(64, 128)]))
        ref = m(x).numpy()
    assert _rel(ev({"x": x.numpy()})["y"], ref) < 1e-5


# --- 5. the int16 trap ---

class Ids(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(70_000, 8)

    def forward(self, ids):  # [1, 4] -> squeeze -> the 70,000-row table
        return self.emb(ids.squeeze(0))


def test_int16_cast_trap(tmp_path):
    m = Ids()
    ids = np.array([[5, 40_000, 66_000, 69_999]], np.int32)
    kw = dict(inputs=[_i32("ids", (1, 4))], outputs=["rows"], precision=FP16)
    default = load_program(_convert(m, (torch.from_numpy(ids),), path=tmp_path / "d.mlpackage", **kw))
    # the default FP16 pipeline casts the squeeze's int32 ids to int16 (and its input with them)
    assert int16_ops(default) == ["main/cast_3 (cast -> int16)", "main/input_cast_uint16 (squeeze -> int16)"]
    table = m.emb.weight.detach().numpy().astype(np.float16)
    row = lambda out: [int(np.flatnonzero((table == r).all(1))[0]) for r in out]
    # 40,000 wraps to -25,536 and the frontend's negative-index guard adds 70,000: 44,464; 66,000 -> 464
    assert row(Evaluator(default)({"ids": ids})["rows"]) == [5, 44_464, 464, 4_463]

    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes({"common::add_int16_cast"})
    fixed = load_program(_convert(m, (torch.from_numpy(ids),), path=tmp_path / "f.mlpackage",
                                  pass_pipeline=pipeline, **kw))
    assert int16_ops(fixed) == []
    assert row(Evaluator(fixed)({"ids": ids})["rows"]) == [5, 40_000, 66_000, 69_999]


# --- 6. unknown ops, out-of-range indices ---

def test_unknown_op_raises(tmp_path, monkeypatch):
    path = _convert(MLP(), (torch.randn(2, 64),), [ct.TensorType("x", shape=(2, 64))], ["y"],
                    tmp_path / "m.mlpackage", FP32)
    prog = load_program(path)
    Evaluator(prog)  # fine as is
    monkeypatch.delitem(mil_eval._OPS, "silu")
    with pytest.raises(NotImplementedError, match="'silu'"):
        Evaluator(prog)


def test_gather_out_of_range_raises():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2,), dtype=ct.converters.mil.mil.types.int32)],
                opset_version=ct.target.iOS18)
    def prog(i):
        return mb.gather(x=np.arange(12, dtype=np.float32).reshape(4, 3), indices=i, axis=0)

    ev = Evaluator(prog)
    np.testing.assert_array_equal(ev({"i": np.array([3, 0], np.int32)})[ev.output_names[0]],
                                  [[9, 10, 11], [0, 1, 2]])
    for bad in ([4, 0], [-1, 0]):  # iOS17+: negative indices are out of range too
        with pytest.raises(IndexError, match="out of range"):
            ev({"i": np.array(bad, np.int32)})


# --- 7. the numpy ops vs coremltools' value_inference, on constants ---

def test_ops_match_value_inference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    xi = rng.integers(-50_000, 70_000, size=(2, 6)).astype(np.int32)
    q, k, v = (rng.standard_normal((1, 2, 4, 8)).astype(np.float32) for _ in range(3))
    mask = np.tril(np.ones((4, 4), bool))

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS18)
    def prog(unused):
        return (
            mb.gelu(x=x, mode="EXACT"), mb.gelu(x=x, mode="TANH_APPROXIMATION"),
            mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"), mb.tanh(x=x), mb.softplus(x=x), mb.erf(x=x),
            mb.rsqrt(x=np.abs(x)), mb.inverse(x=x), mb.clip(x=x, alpha=-0.5, beta=0.7), mb.sigmoid(x=x),
            mb.layer_norm(x=x, axes=[-1], gamma=np.linspace(0.5, 1.5, 8, dtype=np.float32), epsilon=1e-5),
            mb.reduce_mean(x=x, axes=[1], keep_dims=True), mb.reduce_sum(x=x), mb.reduce_max(x=x, axes=[-1]),
            mb.reduce_argmax(x=x, axis=1), mb.reduce_log_sum_exp(x=x, axes=[2]), mb.reduce_l2_norm(x=x, axes=[0]),
            mb.matmul(x=x, y=x, transpose_y=True), mb.linear(x=x, weight=x[0], bias=np.arange(3, dtype=np.float32)),
            mb.slice_by_index(x=x, begin=[1, 0, -3], end=[2, 2, 8], stride=[1, 1, 2], begin_mask=[False, True, False],
                              end_mask=[False, False, True], squeeze_mask=[True, False, False]),
            mb.slice_by_size(x=x, begin=[0, 1, 2], size=[-1, 2, 3]),
            mb.slice_update(x=x, update=np.ones((2, 1, 4), np.float32), begin=[0, 1, 0], end=[2, 2, 8],
                            stride=[1, 1, 2]),
            mb.gather(x=x, indices=np.array([[2, 0], [1, 1]], np.int32), axis=1, batch_dims=1),
            mb.gather_along_axis(x=x, indices=np.array([[[0, 2, 1, 0, 0, 1, 2, 2]]] * 2, np.int32), axis=1),
            mb.gather(x=x, indices=np.array([2, 0, 2], np.int32), axis=-1),
            mb.topk(x=x, k=3, axis=-1)[1], mb.topk(x=x, k=2, axis=1, ascending=True)[0],
            mb.cumsum(x=x, axis=2, reverse=True), mb.band_part(x=x, lower=1, upper=0),
            mb.cast(x=xi, dtype="int16"), mb.cast(x=xi, dtype="uint16"), mb.cast(x=x * 100, dtype="int32"),
            mb.concat(values=[x, x * 2], axis=1), mb.split(x=x, split_sizes=[5, 3], axis=2)[1],
            mb.stack(values=[x, x], axis=2), mb.reshape(x=x, shape=[0, -1]), mb.transpose(x=x, perm=[2, 0, 1]),
            mb.expand_dims(x=x, axes=[0, -1]), mb.squeeze(x=x[:1], axes=[0]), mb.tile(x=x, reps=[1, 2, 1]),
            mb.pad(x=x, pad=[1, 2], mode="reflect"), mb.pad(x=x, pad=[0, 0, 1, 1], constant_val=-2.0),
            mb.select(cond=x > 0, a=x, b=-x), mb.range_1d(start=2, end=11, step=3),
            mb.floor_div(x=xi, y=7), mb.mod(x=xi, y=7), mb.real_div(x=x, y=x + 3),
            mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask),
            mb.einsum(values=(q[0], np.swapaxes(k[0], 0, 2)[:, :1]), equation="chw,whr->chr"),
        )

    outs = prog.functions["main"].outputs
    assert all(v.val is not None for v in outs), [v.op.op_type for v in outs if v.val is None]
    got = Evaluator(prog)({"unused": np.zeros(1, np.float32)})
    for v in outs:
        ref = np.asarray(v.val)
        assert got[v.name].shape == ref.shape, v.op.op_type
        if np.issubdtype(ref.dtype, np.floating):
            np.testing.assert_allclose(got[v.name], ref, rtol=2e-6, atol=2e-6, err_msg=v.op.op_type)
        else:
            np.testing.assert_array_equal(got[v.name], ref, err_msg=v.op.op_type)
    wrapped = next(got[v.name] for v in outs if v.op.op_type == "cast" and v.op.dtype.val == "int16")
    assert wrapped.dtype == np.int16 and int(wrapped.min()) < 0  # the wrap, as coremltools computes it


def test_ops_without_value_inference():
    """coremltools has no value_inference for these: hand-computed expectations instead."""
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 10 - 1

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS18)
    def prog(unused):
        return (mb.gather_nd(x=x, indices=np.array([[1, 2], [0, 0]], np.int32)),
                mb.gather_nd(x=x, indices=np.array([[2], [0]], np.int32), batch_dims=1),
                mb.one_hot(indices=np.array([0, 3, 1], np.int32), one_hot_vector_size=4, axis=0, on_value=5,
                           off_value=-1),
                mb.silu(x=x), mb.scatter(data=x, indices=np.array([2, 0], np.int32), updates=np.ones((2, 2, 4),
                                         np.float32), axis=1, mode="add"),
                # coremltools' concat value_inference ignores interleave; the op's own docstring example:
                mb.concat(values=[np.array([[1, 2], [3, 4], [5, 6]], np.int32),
                                  np.array([[7, 8], [9, 10], [11, 12]], np.int32)], axis=0, interleave=True))

    outs = Evaluator(prog)({"unused": np.zeros(1, np.float32)})
    gnd, gnd_b, hot, silu, sc, inter = (outs[v.name] for v in prog.functions["main"].outputs)
    np.testing.assert_array_equal(gnd, np.stack([x[1, 2], x[0, 0]]))
    np.testing.assert_array_equal(gnd_b, np.stack([x[0, 2], x[1, 0]]))
    np.testing.assert_array_equal(hot, [[5, -1, -1], [-1, -1, 5], [-1, -1, -1], [-1, 5, -1]])
    np.testing.assert_allclose(silu, F.silu(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-7)
    ref = x.copy()
    ref[:, [2, 0]] += 1
    np.testing.assert_array_equal(sc, ref)
    np.testing.assert_array_equal(inter, [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]])


def test_cumsum_exclusive():
    """coremltools' own value_inference for exclusive cumsum raises (a TypeError in its np.zeros call)."""
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3), dtype=ct.converters.mil.mil.types.int32)],
                opset_version=ct.target.iOS18)
    def prog(x):
        return mb.cumsum(x=x, axis=1, exclusive=True), mb.cumsum(x=x, axis=1, exclusive=True, reverse=True)

    outs = Evaluator(prog)({"x": np.array([[1, 2, 3], [4, 5, 6]], np.int32)})
    fwd, rev = (outs[v.name] for v in prog.functions["main"].outputs)
    np.testing.assert_array_equal(fwd, [[0, 1, 3], [0, 4, 9]])
    np.testing.assert_array_equal(rev, [[5, 3, 0], [11, 6, 0]])
