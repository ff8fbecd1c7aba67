"""Evaluate Core ML ML Programs with numpy, op by op, on any OS: a test harness, not a runtime.

`MLModel.predict` needs macOS. To prove the numerics of a Core ML export on Linux, `load_program` reads a saved
.mlpackage (multifunction and compressed weights included) back into coremltools' MIL, and `Evaluator` runs one of
its functions with numpy, one op at a time, in program order. It is meant for the exporter's parity checks and for
tests: fast enough for a decode step of a 270M model (float32 BLAS), never tuned beyond that.

What is emulated, and how:
- fp16: a tensor whose MIL dtype is fp16 holds float16 values. Each op computes in float32 from its (exact) inputs
  and rounds its output to float16 once: Core ML's GPU/ANE accumulate matmuls and reductions in higher precision,
  the rounding models the fp16 storage between ops. Internally fp16 tensors are kept as float32 arrays of
  float16-representable values (so the fp16 weights are converted to float32 once, not per call); inputs, outputs
  and states cross the API as np.float16.
- integers: int32 / int16 / uint16 / int8 / uint8 tensors are numpy arrays of that dtype and wrap like C:
  `cast` to int16 of 66,000 is 464. This is how the coremltools `common::add_int16_cast` trap (token ids above
  32,767 cast to int16 in front of gather/squeeze/topk...) shows up; `int16_ops` lists such ops.
  Casts from float to int truncate toward zero (C semantics); real_div of ints truncates its quotient.
- gather* / scatter*: out-of-range indices raise IndexError (Core ML: undefined; validate_indices=False does not
  check). From the iOS17 opset on, negative indices are out of range, as the op definitions say; before, they count
  from the end.
- compressed weights: constexpr_blockwise_shift_scale (iOS18 per-block int8/int4/uint*, optional offset),
  constexpr_affine_dequantize (iOS16) and scalar constexpr_lut_to_dense (iOS18) are materialized here, once per
  Evaluator; any other constexpr_* (iOS16 packed LUTs, vector LUTs, sparse, cast) through coremltools' own
  `materialized_val_inference`.
- states: `new_state()` gives zeros per ct.StateType; read_state copies the state, coreml_update_state writes its
  value into the caller's array in place (like MLState) and returns it; slice_update is the KV-cache write. The
  per-layer write chain skips the whole-cache copies where that is provably the same (`_kv_plan`; bit-identical).
- every op output is cast to its declared MIL dtype and checked against its static shape; an op type with no
  implementation here raises NotImplementedError naming it, when the Evaluator is built.

Approximate: transcendental functions use numpy's float32 (or math.erf in float64), not Apple's kernels; ties in
topk/argsort/reduce_argmax go to the lowest index (stable sort); duplicate indices in scatter(mode="update") keep
the last write; round is half-to-even (numpy). Nested blocks (cond, while_loop) are not supported.
The numpy implementations are cross-checked against coremltools' per-op `value_inference` in the tests (numpy here
for speed and control: value_inference works on the program's vars, and a few are wrong: concat ignores
interleave, exclusive cumsum raises).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np


def _import_coremltools():
    # coremltools logs "Failed to load _MLModelProxy ..." on import off macOS: harmless here (no predict)
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import coremltools
        from coremltools.converters.mil.frontend.milproto.load import load
        from coremltools.converters.mil.mil import Program, types
    finally:
        log.setLevel(level)
    return coremltools, load, Program, types


ct, _milproto_load, Program, types = _import_coremltools()


def load_program(package: str | Path) -> Program:
    """A saved .mlpackage (or an MLModel) -> its coremltools pymil Program, every function of it."""
    model = package if isinstance(package, ct.models.MLModel) else ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    return _milproto_load(spec, spec.specificationVersion, model.weights_dir)


def int16_ops(program: Program) -> list[str]:
    """'function/op_name (op_type -> int16)' for every op with an int16/uint16 output: an exporter asserts none."""
    found = []
    for fname, f in program.functions.items():
        for op in _walk(f):
            for v in op.outputs:
                if v.dtype in (types.int16, types.uint16):
                    found.append(f"{fname}/{op.name} ({op.op_type} -> {types.builtin_to_string(v.dtype)})")
    return found


def _walk(block):
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from _walk(b)


# --- storage: the numpy form of a MIL value ---

def _nptype(dtype):
    return np.float32 if dtype == types.fp16 else types.nptype_from_builtin(dtype)


def _store(value, var, exact: bool = False):
    """Cast an op's result to var's MIL dtype; fp16 rounds to float16 and is kept as float32 (see module doc)."""
    if var.dtype == types.str:
        return value
    out = np.asarray(value)
    if var.dtype == types.fp16:
        if out.dtype == np.float16:
            out = out.astype(np.float32)
        elif not exact or out.dtype != np.float32:
            out = out.astype(np.float16).astype(np.float32)
    else:
        out = out.astype(_nptype(var.dtype), copy=False)
    return out


def _static_shape(var):
    shape = tuple(var.shape)
    return shape if all(isinstance(d, (int, np.integer)) for d in shape) else None


# --- op implementations: fn(a, op) with a = {param: numpy value (or tuple of them)} ---

def _i(x) -> int:
    return int(np.asarray(x).reshape(()))


def _axes(a, key="axes"):
    return None if a.get(key) is None else tuple(int(v) for v in np.atleast_1d(a[key]))


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _gelu(a, op):
    x, mode = a["x"], str(a.get("mode", "EXACT"))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(np.float32(-1.702) * x))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _real_div(a, op):
    q = np.true_divide(a["x"], a["y"])
    return np.trunc(q) if np.issubdtype(np.asarray(a["x"]).dtype, np.integer) else q


_UNARY = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh, "ceil": np.ceil,
    "cos": np.cos, "cosh": np.cosh, "erf": _erf, "exp": np.exp, "exp2": np.exp2, "floor": np.floor,
    "logical_not": np.logical_not, "round": np.round, "sign": np.sign, "sin": np.sin, "sinh": np.sinh,
    "sqrt": np.sqrt, "square": np.square, "tan": np.tan, "tanh": np.tanh, "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0), "relu6": lambda x: np.clip(x, 0, 6), "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x), "softsign": lambda x: x / (1 + np.abs(x)),
    "softplus": lambda x: np.logaddexp(x, np.float32(0)),
}
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "pow": np.power, "maximum": np.maximum,
    "minimum": np.minimum, "floor_div": np.floor_divide, "mod": np.mod, "equal": np.equal, "not_equal": np.not_equal,
    "less": np.less, "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}
_REDUCE = {
    "reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min, "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: _logsumexp(x, axis, keepdims),
}


def _logsumexp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def _unary(fn):
    return lambda a, op: fn(a["x"])


def _binary(fn):
    return lambda a, op: fn(a["x"], a["y"])


def _reduce(fn):
    return lambda a, op: fn(a["x"], axis=_axes(a), keepdims=bool(a.get("keep_dims", False)))


def _arg_reduce(fn):
    def run(a, op):
        axis = _i(a.get("axis", -1))
        out = fn(a["x"], axis=axis)
        return np.expand_dims(out, axis) if bool(a.get("keep_dims", False)) else out
    return run


def _softmax(a, op):
    x, axis = a["x"], _i(a.get("axis", -1))
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _matmul(a, op):
    x, y = a["x"], a["y"]
    if bool(a.get("transpose_x", False)) and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if bool(a.get("transpose_y", False)) and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(a, op):
    y = np.matmul(a["x"], a["weight"].T)  # weight [out, in]
    return y + a["bias"] if a.get("bias") is not None else y


def _layer_norm(a, op):
    x = a["x"]
    axes = _axes(a) or tuple(range(x.ndim))
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.mean(np.square(x - mean), axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + a.get("epsilon", np.float32(1e-5)))
    shape = [x.shape[d] if d in {ax % x.ndim for ax in axes} else 1 for d in range(x.ndim)]
    if a.get("gamma") is not None:
        y = y * a["gamma"].reshape(shape)
    if a.get("beta") is not None:
        y = y + a["beta"].reshape(shape)
    return y


def _channel(v, x):  # per-channel vector [C] -> broadcastable over [N, C, *D]
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def _batch_norm(a, op):
    x = a["x"]
    y = (x - _channel(a["mean"], x)) / np.sqrt(_channel(a["variance"], x) + a.get("epsilon", np.float32(1e-5)))
    y = y * _channel(a["gamma"], x) if a.get("gamma") is not None else y
    return y + _channel(a["beta"], x) if a.get("beta") is not None else y


def _instance_norm(a, op):
    x = a["x"]
    axes = tuple(range(2, x.ndim))
    mean = np.mean(x, axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(np.mean(np.square(x - mean), axis=axes, keepdims=True) + a.get("epsilon", 1e-5))
    y = y * _channel(a["gamma"], x) if a.get("gamma") is not None else y
    return y + _channel(a["beta"], x) if a.get("beta") is not None else y


def _l2_norm(a, op):  # over the last three dims, the rest is batch
    x = a["x"]
    flat = x.reshape(int(np.prod(x.shape[:-3], dtype=np.int64)), -1)
    ss = np.sum(flat * flat, axis=1, keepdims=True)
    return (flat / np.sqrt(ss + a.get("epsilon", np.float32(1e-6)))).reshape(x.shape)


def _slices(x, a):
    """slice_by_index / slice_update parameters -> a numpy index (a squeezed dim becomes an int)."""
    n = x.ndim
    begin, end = [int(v) for v in a["begin"]], [int(v) for v in a["end"]]
    stride = [int(v) for v in a["stride"]] if a.get("stride") is not None else [1] * n
    bmask = [bool(v) for v in a["begin_mask"]] if a.get("begin_mask") is not None else [False] * n
    emask = [bool(v) for v in a["end_mask"]] if a.get("end_mask") is not None else [False] * n
    smask = [bool(v) for v in a["squeeze_mask"]] if a.get("squeeze_mask") is not None else [False] * n
    return tuple(begin[d] if smask[d] else slice(None if bmask[d] else begin[d], None if emask[d] else end[d],
                                                 stride[d]) for d in range(n))


def _slice_update(a, op, out=None):
    x = a["x"]
    out = np.empty_like(x) if out is None or out.shape != x.shape else out
    np.copyto(out, x)  # op inputs are never written
    idx = _slices(out, a)
    out[idx] = np.reshape(a["update"], out[idx].shape)
    return out


def _slice_update_in_place(a, op):
    idx = _slices(a["x"], a)
    a["x"][idx] = np.reshape(a["update"], a["x"][idx].shape)
    return a["x"]


def _reusing(fn):
    """fn(a, op, out) writing into one buffer kept across calls: KV-cache sized outputs (the first call allocates;
    a fresh array each step is what makes a decode step slow, not the copy). Safe: outputs and states are copies."""
    buf = [None]

    def run(a, op):
        buf[0] = fn(a, op, buf[0])
        return buf[0]
    return run


def _slice_by_size(a, op):
    x, begin, size = a["x"], [int(v) for v in a["begin"]], [int(v) for v in a["size"]]
    return x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size, strict=True))]


def _reshape(a, op):
    x, shape = a["x"], [int(v) for v in np.atleast_1d(a["shape"])]
    for i, s in enumerate(shape):  # iOS17: each 0 copies the input dim aligned from the right (1 if none)
        if s == 0:
            j = x.ndim - (len(shape) - i)
            shape[i] = x.shape[j] if j >= 0 else 1
    return x.reshape(shape)


def _squeeze(a, op):
    axes = _axes(a)
    return np.squeeze(a["x"], axis=axes) if axes else np.squeeze(a["x"])


def _concat(a, op):
    values, axis = a["values"], _i(a["axis"])
    if not bool(a.get("interleave", False)):
        return np.concatenate(values, axis=axis)
    axis %= values[0].ndim
    stacked = np.stack(values, axis=axis + 1)
    return stacked.reshape(values[0].shape[:axis] + (-1,) + values[0].shape[axis + 1:])


def _split(a, op):
    x, axis = a["x"], _i(a["axis"])
    if a.get("split_sizes") is not None:
        bounds = np.cumsum([int(s) for s in a["split_sizes"]])[:-1]
        return tuple(np.split(x, bounds, axis=axis))
    return tuple(np.split(x, _i(a["num_splits"]), axis=axis))


def _check_indices(idx, size: int, op, negative_ok: bool):
    idx = np.asarray(idx).astype(np.int64)
    lo = -size if negative_ok else 0
    if idx.size and (idx.min() < lo or idx.max() >= size):
        bad = idx[(idx < lo) | (idx >= size)]
        raise IndexError(f"{op.op_type} {op.name}: indices {bad[:8].tolist()} out of range [{lo}, {size}) "
                         f"(Core ML: undefined; an int16 cast wraps ids above 32767)")
    return np.where(idx < 0, idx + size, idx)


def _negative_ok(op):
    return op.opset_version is None or op.opset_version < ct.target.iOS17


def _gather(a, op):
    x, axis, b = a["x"], _i(a.get("axis", 0)), _i(a.get("batch_dims", 0))
    axis %= x.ndim
    idx = _check_indices(a["indices"], x.shape[axis], op, _negative_ok(op))
    if b == 0:
        return np.take(x, idx, axis=axis)
    lead = x.shape[:b]
    xs, ids = x.reshape((-1,) + x.shape[b:]), idx.reshape((-1,) + idx.shape[b:])
    out = np.stack([np.take(xs[i], ids[i], axis=axis - b) for i in range(xs.shape[0])])
    return out.reshape(lead + out.shape[1:])


def _gather_along_axis(a, op):
    x, axis = a["x"], _i(a.get("axis", 0)) % a["x"].ndim
    return np.take_along_axis(x, _check_indices(a["indices"], x.shape[axis], op, _negative_ok(op)), axis=axis)


def _gather_nd(a, op):
    x, b = a["x"], _i(a.get("batch_dims", 0))
    idx = np.asarray(a["indices"]).astype(np.int64)
    k = idx.shape[-1]
    for d in range(k):
        idx[..., d] = _check_indices(idx[..., d], x.shape[b + d], op, _negative_ok(op))
    if b == 0:
        return x[tuple(np.moveaxis(idx, -1, 0))]
    xs, ids = x.reshape((-1,) + x.shape[b:]), idx.reshape((-1,) + idx.shape[b:])
    out = np.stack([xs[i][tuple(np.moveaxis(ids[i], -1, 0))] for i in range(xs.shape[0])])
    return out.reshape(x.shape[:b] + out.shape[1:])


_SCATTER = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "max": np.maximum,
            "min": np.minimum}


def _scatter_into(out, index, updates, mode):
    if mode == "update":
        out[index] = updates
    else:
        _SCATTER[mode].at(out, index, updates)
    return out


def _scatter(a, op):  # indices [C] along axis
    out, axis = np.array(a["data"]), _i(a.get("axis", 0)) % a["data"].ndim
    idx = _check_indices(a["indices"], out.shape[axis], op, _negative_ok(op))
    moved, upd = np.moveaxis(out, axis, 0), np.moveaxis(a["updates"], axis, 0)
    _scatter_into(moved, idx, upd, str(a.get("mode", "add")))
    return out


def _scatter_along_axis(a, op):
    out, axis = np.array(a["data"]), _i(a.get("axis", 0)) % a["data"].ndim
    idx = _check_indices(a["indices"], out.shape[axis], op, _negative_ok(op))
    grid = list(np.indices(idx.shape, sparse=True))
    grid[axis] = idx
    return _scatter_into(out, tuple(grid), a["updates"], str(a.get("mode", "add")))


def _scatter_nd(a, op):
    out = np.array(a["data"])
    idx = np.asarray(a["indices"]).astype(np.int64)
    for d in range(idx.shape[-1]):
        idx[..., d] = _check_indices(idx[..., d], out.shape[d], op, _negative_ok(op))
    return _scatter_into(out, tuple(np.moveaxis(idx, -1, 0)), a["updates"], str(a.get("mode", "add")))


def _topk(a, op):
    x, k, axis = a["x"], _i(a.get("k", 1)), _i(a.get("axis", -1))
    order = np.argsort(x if bool(a.get("ascending", False)) else -x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(x, idx, axis=axis)
    return (values, idx) if len(op.outputs) == 2 else values


def _argsort(a, op):
    x = a["x"]
    return np.argsort(x if bool(a.get("ascending", False)) else -x, axis=_i(a.get("axis", -1)), kind="stable")


def _cumsum(a, op):
    x, axis = a["x"], _i(a.get("axis", 0))
    if bool(a.get("reverse", False)):
        x = np.flip(x, axis)
    y = np.cumsum(x, axis=axis, dtype=x.dtype)
    if bool(a.get("exclusive", False)):  # shift by one: 0, x0, x0 + x1, ...
        y = np.moveaxis(y, axis, 0)
        y = np.moveaxis(np.concatenate([np.zeros_like(y[:1]), y[:-1]]), 0, axis)
    return np.flip(y, axis) if bool(a.get("reverse", False)) else y


def _band_part(a, op):
    x, lower, upper = a["x"], _i(a.get("lower", -1)), _i(a.get("upper", -1))
    m, n = np.arange(x.shape[-2])[:, None], np.arange(x.shape[-1])[None, :]
    keep = ((lower < 0) | (m - n <= lower)) & ((upper < 0) | (n - m <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


def _one_hot(a, op):
    idx, depth, axis = np.asarray(a["indices"]), _i(a["one_hot_vector_size"]), _i(a.get("axis", -1))
    hot = np.expand_dims(idx, -1) == np.arange(depth)
    out = np.where(hot, a.get("on_value", 1), a.get("off_value", 0))
    return np.moveaxis(out, -1, axis)


def _pad(a, op):
    x, pad, mode = a["x"], [int(v) for v in a["pad"]], str(a.get("mode", "constant"))
    pairs = [(0, 0)] * (x.ndim - len(pad) // 2) + [tuple(pad[i:i + 2]) for i in range(0, len(pad), 2)]
    if mode == "constant":
        return np.pad(x, pairs, mode="constant", constant_values=a.get("constant_val", 0))
    return np.pad(x, pairs, mode="edge" if mode == "replicate" else mode)


def _cast(a, op):
    x, dtype = np.asarray(a["x"]), str(a["dtype"])
    if dtype == "bool":
        return x != 0
    target = np.float32 if dtype in ("fp16", "fp32") else types.nptype_from_builtin(types.string_to_builtin(dtype))
    if np.issubdtype(target, np.integer) and np.issubdtype(x.dtype, np.floating):
        x = np.trunc(x).astype(np.int64)  # C: toward zero; then wrap to the width
    return x.astype(target)  # int32 -> int16 wraps: 66000 -> 464


def _sdpa(a, op):
    q, k, v = a["query"], a["key"], a["value"]
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(math.sqrt(q.shape[-1]))
    mask = a.get("attn_mask")
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    return np.matmul(_softmax({"x": scores, "axis": -1}, op), v)


def _read_state(a, op, out=None):
    state = a["input"]
    dtype = np.float32 if state.dtype == np.float16 else state.dtype
    out = np.empty(state.shape, dtype) if out is None or out.shape != state.shape else out
    np.copyto(out, state)
    return out


def _update_state(a, op):
    np.copyto(a["state"], a["value"], casting="same_kind")  # in place, like MLState
    return a["value"]


# --- the KV-cache chain, without copying the cache per layer ---
# A converted cache write is read_state -> slice_update -> coreml_update_state, then per layer slice_update of the
# last update's output -> coreml_update_state: copied literally, each step moves the whole cache twice per layer.
# `_kv_plan` finds where that is provably unneeded: a slice_update may write into its x when every other op that
# could see x's memory (through views) has already run; a coreml_update_state of a slice_update whose x holds the
# state's current contents only needs to write the updated slice.

_VIEWS = {"identity", "reshape", "transpose", "expand_dims", "squeeze", "flatten2d", "reverse", "slice_by_index",
          "slice_by_size", "split", "coreml_update_state"}  # outputs that may share memory with an input
_SLICE_ARGS = ("begin", "end", "stride", "begin_mask", "end_mask", "squeeze_mask")


def _kv_plan(f):
    """-> (ids of slice_update ops that may write in place, {id of coreml_update_state op: its slice_update op})."""
    ops = list(f.operations)
    order = {id(op): i for i, op in enumerate(ops)}
    outputs = {id(v) for v in f.outputs}
    in_place, region = set(), {}
    for op in ops:
        if op.op_type == "slice_update":
            src = op.inputs["x"]
            while src.op is not None and src.op.op_type == "coreml_update_state":
                src = src.op.inputs["value"]
            if src.op is not None and src.op.op_type in ("read_state", "slice_update") and _read_before(
                    src, op, order, outputs):
                in_place.add(id(op))
        elif op.op_type == "coreml_update_state":
            su = op.inputs["value"].op
            x = su.inputs["x"] if su is not None and su.op_type == "slice_update" else None
            src = x.op if x is not None else None
            if src is not None and src.op_type in ("read_state", "coreml_update_state") and \
                    src.inputs["input" if src.op_type == "read_state" else "state"] is op.inputs["state"] and \
                    not any(o.op_type == "coreml_update_state" and o.inputs["state"] is op.inputs["state"]
                            for o in ops[order[id(src)] + 1:order[id(op)]]):
                region[id(op)] = su
    return in_place, region


def _read_before(src, op, order, outputs) -> bool:
    """Has every op that can see src's memory (through views) run before op, and none of it is a function output?"""
    stack, here = [src], order[id(op)]
    while stack:
        v = stack.pop()
        if id(v) in outputs:
            return False
        for c in v.child_ops:
            if c is op:
                continue
            if order.get(id(c), here + 1) > here:
                return False
            if c.op_type in _VIEWS:
                stack.extend(c.outputs)
    return True


def _update_state_region(a, op):
    idx = _slices(a["value"], {k[6:]: v for k, v in a.items() if k.startswith("slice.")})
    a["state"][idx] = a["value"][idx]  # the rest of the state already holds these values
    return a["value"]


_OPS = {
    **{name: _unary(f) for name, f in _UNARY.items()},
    **{name: _binary(f) for name, f in _BINARY.items()},
    **{name: _reduce(f) for name, f in _REDUCE.items()},
    "real_div": _real_div,
    "reduce_argmax": _arg_reduce(np.argmax), "reduce_argmin": _arg_reduce(np.argmin),
    "inverse": lambda a, op: 1 / (a["x"] + a.get("epsilon", np.float32(1e-4))),
    "log": lambda a, op: np.log(a["x"] + a.get("epsilon", np.float32(1e-45))),
    "rsqrt": lambda a, op: 1 / np.sqrt(a["x"] + a.get("epsilon", np.float32(1e-12))),
    "clip": lambda a, op: np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"]),
    "threshold": lambda a, op: np.maximum(a["x"], a["alpha"]),
    "gelu": _gelu,
    "leaky_relu": lambda a, op: np.where(a["x"] >= 0, a["x"], a["alpha"] * a["x"]),
    "elu": lambda a, op: np.where(a["x"] > 0, a["x"], a["alpha"] * (np.exp(a["x"]) - 1)),
    "clamped_relu": lambda a, op: np.minimum(np.where(a["x"] >= 0, a["x"], a["alpha"] * a["x"]), a["beta"]),
    "thresholded_relu": lambda a, op: np.where(a["x"] > a["alpha"], a["x"], 0),
    "sigmoid_hard": lambda a, op: np.clip(a["alpha"] * a["x"] + a["beta"], 0, 1),
    "scaled_tanh": lambda a, op: a["alpha"] * np.tanh(a["beta"] * a["x"]),
    "linear_activation": lambda a, op: a["alpha"] * a["x"] + a["beta"],
    "softmax": _softmax, "linear": _linear, "matmul": _matmul,
    "einsum": lambda a, op: np.einsum(str(a["equation"]), *a["values"]),
    "layer_norm": _layer_norm, "batch_norm": _batch_norm, "instance_norm": _instance_norm, "l2_norm": _l2_norm,
    "concat": _concat, "split": _split, "stack": lambda a, op: np.stack(a["values"], axis=_i(a["axis"])),
    "reshape": _reshape,
    "transpose": lambda a, op: np.transpose(a["x"], [int(p) for p in a["perm"]]),
    "expand_dims": lambda a, op: np.expand_dims(a["x"], _axes(a)),
    "squeeze": _squeeze, "flatten2d": lambda a, op: a["x"].reshape(
        int(np.prod(a["x"].shape[:_i(a.get("axis", 1))], dtype=np.int64)), -1),
    "reverse": lambda a, op: np.flip(a["x"], _axes(a)),
    "slice_by_index": lambda a, op: a["x"][_slices(a["x"], a)], "slice_by_size": _slice_by_size,
    "slice_update": _slice_update,
    "gather": _gather, "gather_along_axis": _gather_along_axis, "gather_nd": _gather_nd,
    "scatter": _scatter, "scatter_along_axis": _scatter_along_axis, "scatter_nd": _scatter_nd,
    "select": lambda a, op: np.where(a["cond"], a["a"], a["b"]),
    "tile": lambda a, op: np.tile(a["x"], [int(r) for r in a["reps"]]),
    "fill": lambda a, op: np.full([int(s) for s in np.atleast_1d(a["shape"])], a.get("value", 0)),
    "fill_like": lambda a, op: np.full(a["ref_tensor"].shape, a.get("value", 0)),
    "range_1d": lambda a, op: np.arange(a["start"], a["end"], a["step"]),
    "shape": lambda a, op: np.array(a["x"].shape, dtype=np.int32),
    "cast": _cast, "topk": _topk, "argsort": _argsort, "cumsum": _cumsum, "band_part": _band_part,
    "one_hot": _one_hot, "pad": _pad, "scaled_dot_product_attention": _sdpa,
    "read_state": _read_state, "coreml_update_state": _update_state,
}
# ops that only move or pick values: their fp16 outputs need no rounding
_EXACT = {"identity", "reshape", "transpose", "expand_dims", "squeeze", "flatten2d", "reverse", "concat", "split",
          "stack", "slice_by_index", "slice_by_size", "slice_update", "gather", "gather_along_axis", "gather_nd",
          "select", "tile", "read_state", "coreml_update_state", "topk", "maximum", "minimum", "relu", "abs",
          "band_part", "pad"}


# --- compressed constants, materialized once ---

def _blocks(data_shape, block_shape):
    """[d0, d1..] over [s0, s1..] blocks -> the interleaved shapes that broadcast a per-block array over data."""
    split = [x for d, s in zip(data_shape, block_shape, strict=True) for x in (s, d // s)]
    per_block = [x for s in block_shape for x in (s, 1)]
    return split, per_block


def _blockwise_shift_scale(a, op):
    data, scale = a["data"], a["scale"]
    split, per_block = _blocks(data.shape, scale.shape)
    data = data.reshape(split)
    if a.get("offset") is not None:
        data = np.subtract(data, a["offset"].reshape(per_block), dtype=np.float32)
    # one pass: float32 products (exact: 8 x 11 bits) rounded once into DstT
    out = np.empty(split, np.float16 if op.outputs[0].dtype == types.fp16 else np.float32)
    np.multiply(data, scale.reshape(per_block), out=out, dtype=np.float32, casting="unsafe")
    return out.reshape(a["data"].shape)


def _affine_dequantize(a, op):
    q, axis = a["quantized_data"].astype(np.float32), _i(a["axis"]) % a["quantized_data"].ndim
    shape = [-1 if d == axis else 1 for d in range(q.ndim)]
    zp, scale = (np.asarray(a[k], np.float32) for k in ("zero_point", "scale"))
    return (q - (zp.reshape(shape) if zp.ndim else zp)) * (scale.reshape(shape) if scale.ndim else scale)


def _lut_to_dense(a, op):
    lut = a["lut"]
    if "shape" in a or lut.shape[-1] != 1:  # iOS16 packed indices, or vector palettization: coremltools decodes
        return op.materialized_val_inference()
    idx = a["indices"].astype(np.int64)
    grids = tuple((np.arange(n) // (n // m)).reshape([-1 if d == i else 1 for d in range(idx.ndim)])
                  for i, (n, m) in enumerate(zip(idx.shape, lut.shape[:-2], strict=True)))
    return lut[..., 0][grids + (idx,)]


_CONSTEXPR = {"constexpr_blockwise_shift_scale": _blockwise_shift_scale,
              "constexpr_affine_dequantize": _affine_dequantize, "constexpr_lut_to_dense": _lut_to_dense}


class Evaluator:
    """Runs one function of a MIL Program with numpy (see the module docstring for the semantics).

    ev = Evaluator(load_program("model.mlpackage"), "main"); state = ev.new_state(); out = ev(inputs, state)

    Not reentrant: read_state and slice_update write into one buffer per op, kept across calls.
    """

    def __init__(self, program, function: str = "main"):
        if not isinstance(program, Program):
            program = load_program(program)  # a path or an MLModel
        if function not in program.functions:
            raise KeyError(f"no function {function!r} in the program (has {sorted(program.functions)})")
        f = program.functions[function]
        self.function = f
        self._states = {n: (tuple(t.get_shape()), types.nptype_from_builtin(t.get_primitive()))
                        for n, v in f.inputs.items() if types.is_state(v.sym_type) for t in [v.sym_type.wrapped_type()]}
        self.input_names = [n for n in f.inputs if n not in self._states]
        self.output_names = [v.name for v in f.outputs]
        self._env: dict = {}  # const and constexpr values, materialized once
        self._steps = []  # (op, fn, [(param, var name | tuple of names)], exact)
        in_place, region = _kv_plan(f)
        for op in f.operations:
            if op.blocks:
                raise NotImplementedError(f"MIL op {op.op_type!r} ({op.name}): nested blocks are not supported")
            if op.op_type == "const":
                self._env[op.outputs[0].name] = _store(op.outputs[0].val, op.outputs[0])
            elif op.op_type.startswith("constexpr_"):
                fn = _CONSTEXPR.get(op.op_type)
                result = fn(self._args(op, self._env), op) if fn else op.materialized_val_inference()
                self._set_outputs(self._env, op, result, exact=False)
            elif op.op_type in _OPS:
                ins = [(k, v.name if not isinstance(v, (list, tuple)) else tuple(x.name for x in v))
                       for k, v in op.inputs.items()]
                fn = _OPS[op.op_type]
                if op.op_type == "read_state" or op.op_type == "slice_update" and id(op) not in in_place:
                    fn = _reusing(fn)
                elif op.op_type == "slice_update":
                    fn = _slice_update_in_place
                elif id(op) in region:
                    su = region[id(op)]
                    ins += [("slice." + k, su.inputs[k].name) for k in _SLICE_ARGS if k in su.inputs]
                    fn = _update_state_region
                self._steps.append((op, fn, ins, op.op_type in _EXACT))
            else:
                raise NotImplementedError(f"MIL op {op.op_type!r} ({op.name}) is not implemented by mil_eval")

    def new_state(self) -> dict[str, np.ndarray]:
        """Zeros for each state of the function: name -> array of its dtype (fp16 -> np.float16) and shape."""
        return {name: np.zeros(shape, dtype) for name, (shape, dtype) in self._states.items()}

    def __call__(self, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None):
        """Run the function: inputs by name -> outputs by name; `state` (from new_state) is updated in place."""
        if self._states and state is None:
            raise ValueError(f"the function has states {list(self._states)}: pass state=evaluator.new_state()")
        env = dict(self._env)
        for name in self.input_names:
            if name not in inputs:
                raise KeyError(f"missing input {name!r} (inputs: {self.input_names})")
            var = self.function.inputs[name]
            value = np.asarray(inputs[name])
            if var.dtype == types.fp16:
                value = value.astype(np.float16)
            env[name] = self._checked(_store(value, var), var, f"input {name}")
        for name, (shape, dtype) in self._states.items():
            if state[name].shape != shape or state[name].dtype != dtype:
                raise ValueError(f"state {name!r}: {state[name].dtype}{list(state[name].shape)}, the function has "
                                 f"{np.dtype(dtype)}{list(shape)}")
            env[name] = state[name]
        for op, fn, ins, exact in self._steps:
            a = {k: env[n] if isinstance(n, str) else tuple(env[m] for m in n) for k, n in ins}
            self._set_outputs(env, op, fn(a, op), exact)
        out = {}
        for v in self.function.outputs:
            value = env[v.name]
            out[v.name] = value.astype(np.float16) if v.dtype == types.fp16 else np.array(value)  # never a cached const
        return out

    @staticmethod
    def _args(op, env):
        return {k: env[v.name] if not isinstance(v, (list, tuple)) else tuple(env[x.name] for x in v)
                for k, v in op.inputs.items()}

    def _set_outputs(self, env, op, result, exact):
        results = result if isinstance(result, tuple) else (result,)
        if len(results) != len(op.outputs):
            raise RuntimeError(f"{op.op_type} {op.name}: {len(results)} results for {len(op.outputs)} outputs")
        for var, value in zip(op.outputs, results, strict=True):
            env[var.name] = self._checked(_store(value, var, exact), var, f"{op.op_type} {op.name}")

    @staticmethod
    def _checked(value, var, what):
        shape = _static_shape(var)
        if shape is not None and var.dtype != types.str and value.shape != shape:
            raise RuntimeError(f"{what}: shape {value.shape}, the program declares {shape}")
        return value


class EvaluatedPrograms:
    """The coreml backend's `Programs` (runtime/coreml_backend.py) over the packages of an export directory, evaluated
    here: one Evaluator per function, one state per stateful package shared by its functions (as one MLState is on a
    Mac). For the exporter's checks and tests; the backend on macOS runs Core ML instead."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.programs: dict[str, object] = {}
        self.evaluators: dict[tuple[str, str], Evaluator] = {}
        self.states: dict[str, dict[str, np.ndarray]] = {}

    def run(self, package: str, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = (package, function)
        if key not in self.evaluators:
            if package not in self.programs:
                self.programs[package] = load_program(self.dir / package)
            self.evaluators[key] = Evaluator(self.programs[package], function)
        ev = self.evaluators[key]
        if package not in self.states:
            self.states[package] = ev.new_state()  # {} for a package without states
        return ev(inputs, self.states[package] or None)
