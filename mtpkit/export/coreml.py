"""Export target and drafter as Core ML ML Programs (`mtpkit export --format coreml`) for macOS 15 / iOS 18.

    DIR/target.mlpackage    functions prefill (PREFILL tokens), decode (1), verify (K + 1), sharing one copy of
                            the weights; with --compute gpu also `draft`, the drafter step (coreml_graphs.py has
                            every function's inputs and outputs)
    DIR/drafter.mlpackage   --compute ane only: the draft step as its own model (explicit K/V inputs)
    DIR/coreml.json         what a runtime needs: compute, context, K, functions, states, both configs
    DIR/tokenizer.model, DIR/export.json    the SentencePiece model; this export's result and checks

Traced with torch.jit.trace and converted by coremltools (ML Program, deployment target iOS 18 / macOS 15, float16
compute), one function at a time, then merged with `ct.utils.save_multifunction` (which stores equal constants once:
the drafter's head reads the target's embedding constant). The KV cache (coreml_graphs.py):
  --compute gpu  Core ML states `keys` / `values` [L, KV, C, D] float16 (read_state / slice_update). Every function
                 of target.mlpackage declares them, so the app makes one MLState and passes it to prefill, decode,
                 verify and draft: the drafter reads the target's K/V where it lies, nothing is copied.
  --compute ane  the Neural Engine rejects states (error -14), so K/V are plain inputs and the target step returns
                 its new rows for the app to write into its own arrays; the drafter's inputs are the two layers it
                 reads. Each call hands Core ML the whole cache (2 x L x C x D x 2 bytes, 38 MB for Gemma 3 270M at
                 C = 2048), which it may copy to the engine's memory: the cost of leaving the GPU.
--quant: none = float16 weights; int8 / int4 = per-block symmetric weights (coremltools.optimize, blocks of
QUANT_BLOCK along the input dimension) applied to each function before the merge; int4 keeps the tied
embedding/head matrix at 8 bits (4 bits moves Gemma 3 270M's logits by 12, as in the ONNX export).
coremltools' `common::add_int16_cast` pass is left out: it casts int32 inputs of gather / squeeze / topk to int16,
which wraps token ids above 32,767 of this 262,144-token vocabulary; every program is checked to hold no 16-bit
integer op.

No Mac here: before anything lands in DIR the programs are evaluated op by op with numpy (mtpkit.export.mil_eval, a
test harness that models float16 storage) through the coreml backend's steps and compared with the float32
reference: the target's logits (TOLERANCE) and each draft step (DRAFTER_TOLERANCE). Imports without torch and
coremltools.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from mtpkit.errors import MtpkitError
from mtpkit.export import COMMON_QUANTS, check_quant, staged, stale_entries
from mtpkit.export.parity import check_draft_steps, compare_logits, probe_tokens, reference_logits, walk
from mtpkit.progress import steps as progress_steps

QUANTS = COMMON_QUANTS
COMPUTES = ("gpu", "ane")
QUANT_BLOCK = 32
PREFILL = 64  # tokens per prefill call
DEFAULT_CONTEXT = 2048
DEFAULT_K = 5  # drafts per round the verify function takes (K + 1 rows); longer verifies run in pieces
MANIFEST = "coreml.json"
OUTPUTS = ("target.mlpackage", "drafter.mlpackage", "tokenizer.model", MANIFEST, "export.json")
# max |logit diff| vs the float32 reference and the least argmax agreement, per --quant (float16 compute). Measured on
# the real Gemma 3 270M (the export's 136-token probe, logits reach 35, context 512, numpy evaluation): none 0.083
# (98.6 %: one near-tie), int8 0.84 (98.6 %), int4 11.7 (72 %: 4-bit round-to-nearest of a target that was already
# Q4_K_M; ONNX's int4 is at 12.2 / 67 %). On the tiny test targets (|logit| < 1): none ~0.003.
TOLERANCE = {"none": 0.5, "int8": 3.0, "int4": 16.0}
MIN_ARGMAX = {"none": 0.9, "int8": 0.8, "int4": 0.6}
# a draft step: (max |candidate logit diff|, max |next h diff| relative to the largest |h|). Measured on the shipped
# drafter with the real target (12 steps): none 0.087 / 0.008, int8 0.45 / 0.034, int4 5.3 / 0.46 (the int4 target's
# K/V and h move it: with the drafter's own weights at 8 bits instead, 5.3 / 0.44)
DRAFTER_TOLERANCE = {"none": (0.25, 0.05), "int8": (3.0, 0.1), "int4": (16.0, 0.6)}
# a draft step's argmax may flip at near-ties of its candidates (tiny random drafters have many; int4 targets move
# the K/V it reads); the logits' and h's tolerances are the gate, this only catches a step that is wrong altogether
DRAFTER_MIN_ARGMAX = {"none": 0.5, "int8": 0.5, "int4": 0.25}


def _ct():
    import logging
    logging.getLogger("coremltools").setLevel(logging.ERROR)  # before the import: off macOS it warns that it cannot
    try:                                                       # load Core ML, which is expected here
        import coremltools as ct
    except ImportError:
        raise MtpkitError("--format coreml needs coremltools (pip install -e '.[coreml]')") from None
    return ct


def target_functions(context: int, k: int, prefill: int = PREFILL) -> dict[str, int]:
    """Function name -> new tokens per call."""
    return {"prefill": min(prefill, context), "decode": 1, "verify": k + 1}


def _io(c, dc, context: int, stateful: bool, n: int | None) -> tuple[list, list[str]]:
    """(coremltools input types, output names) of a target step of n tokens, or of the draft step (n None)."""
    ct = _ct()
    from mtpkit.export.coreml_graphs import cache_shape, kinds
    shape = cache_shape(c, context)
    position = ct.TensorType("position", shape=(1,), dtype=np.int32)
    if n is None:
        ins = [ct.TensorType("token", shape=(1,), dtype=np.int32), ct.TensorType("h", shape=(1, c.hidden_size)),
               position]
        if not stateful:  # the two layers it reads, [KV, C, D] each
            ins += [ct.TensorType(f"{kv}_{kind}", shape=shape[1:], dtype=np.float16) for kind in kinds(dc)
                    for kv in ("keys", "values")]
        return ins, ["logits", "h_next"] if dc.head == "dense" else ["ids", "logits", "h_next"]
    ins = [ct.TensorType("input_ids", shape=(1, n), dtype=np.int32), position]
    if stateful:
        return ins, ["logits", "hidden"]
    return ins + [ct.TensorType(kv, shape=shape, dtype=np.float16) for kv in ("keys", "values")], \
        ["logits", "hidden", "new_keys", "new_values"]


def _names(c, dc, context: int, stateful: bool, n: int | None) -> dict[str, list[str]]:
    ins, outs = _io(c, dc, context, stateful, n)
    return {"inputs": [t.name for t in ins], "outputs": outs}


@contextlib.contextmanager
def _quiet():
    """coremltools' own progress bars and warnings off (the export has one progress bar)."""
    import functools
    import importlib
    import logging
    import warnings

    import tqdm
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    mods = [("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),
            ("coremltools.converters.mil.frontend.torch.ops", "_tqdm"),
            ("coremltools.optimize.coreml._post_training_quantization", "tqdm"),
            ("coremltools.optimize.coreml._quantization_passes", "tqdm")]
    saved = []
    for name, attr in mods:
        m = importlib.import_module(name)
        saved.append((m, attr, getattr(m, attr)))
        setattr(m, attr, functools.partial(tqdm.tqdm, disable=True))
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision as fp16
    saved.append((fp16, "fp16_overflow", fp16.__dict__["fp16_overflow"]))
    fp16.fp16_overflow = staticmethod(_fp16_overflow(fp16.fp16_overflow))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for m, attr, v in saved:
            setattr(m, attr, v)


def _rms_norm(context, node):
    """torch's rms_norm as MIL, safe in float16 and exact: x / M first (x^2 of |x| > 256 overflows float16), then
    x / sqrt(mean(x^2) + eps) = (x / M) / sqrt(mean((x / M)^2) + (sqrt(eps) / M)^2). coremltools' own converter
    scales by M as well but adds eps unscaled, i.e. computes x / sqrt(mean(x^2) + eps M^2): Gemma 3's post-feedforward
    norms read vectors with max |x| ~ 0.08 whose mean(x^2) is of eps's order, and came out 3 % off (logits off by
    8 at the last layer of Gemma 3 270M, in float32). M is at least 1/64 so (sqrt(eps) / M)^2 stays a float16 normal."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    x, shape, weight, eps = _get_inputs(context, node, expected=4)
    axes = list(range(-len(shape.val), 0))
    e = float(eps.val) if eps is not None and eps.val is not None else float(np.finfo(np.float32).eps)
    name = node.name
    m = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x), axes=axes, keep_dims=True), y=np.float32(1 / 64), name=f"{name}_m")
    xs = mb.real_div(x=x, y=m, name=f"{name}_xs")
    r = mb.real_div(x=np.float32(e ** 0.5), y=m, name=f"{name}_r")
    ms = mb.reduce_mean(x=mb.square(x=xs), axes=axes, keep_dims=True, name=f"{name}_ms")
    rms = mb.sqrt(x=mb.add(x=ms, y=mb.square(x=r)), name=f"{name}_rms")
    out = mb.real_div(x=xs, y=rms, name=f"{name}_norm" if weight is not None else name)
    if weight is not None:
        out = mb.mul(x=out, y=weight, name=name)
    context.add(out, name)


@contextlib.contextmanager
def _exact_rms_norm():
    """Convert torch's rms_norm with `_rms_norm` for the duration (the registry is coremltools' global one)."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY as reg
    saved = reg.name_to_func_mapping.get("rms_norm")
    reg.name_to_func_mapping["rms_norm"] = _rms_norm
    try:
        yield
    finally:
        reg.name_to_func_mapping["rms_norm"] = saved


def _fp16_overflow(exact):
    """coremltools' check of whether an op's float32 constants fit float16 (an np.where over every element, 2 of the
    3 minutes of converting one Gemma 3 270M function: the 168M-value embedding, per op reading it) with a fast
    answer first: constants whose max |value| fits need no more (the same answer); others get the exact check."""
    def check(op) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
                if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32") \
                        and np.abs(np.asarray(var.op.val.val)).max(initial=0.0) > 65504:
                    return exact(op)
        return False
    return check


def convert(module, args: tuple, inputs: list, outputs: list[str], states: list, precision: str):
    """torch module -> an ML Program MLModel (not loaded: no Core ML here), without coremltools' int16 casts and with
    an exact RMSNorm (`_rms_norm`)."""
    import torch
    ct = _ct()
    pipe = ct.PassPipeline.DEFAULT
    pipe.remove_passes(["common::add_int16_cast"])
    with torch.no_grad(), _quiet(), _exact_rms_norm():
        traced = torch.jit.trace(module.eval(), args)
        return ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(o) for o in outputs], states=states,
                          minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram", pass_pipeline=pipe,
                          compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
                          skip_model_load=True)


def compress(mlmodel, quant: str, vocab_size: int):
    """Per-block symmetric weights (module docstring); int4 keeps the [V, d] matrix at 8 bits."""
    if quant == "none":
        return mlmodel
    import coremltools.optimize.coreml as cto
    cfg = {b: cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{b}", granularity="per_block",
                                          block_size=QUANT_BLOCK, weight_threshold=2048) for b in (8, 4)}
    bits = 8 if quant == "int8" else 4
    names = {}
    if bits == 4:
        for fn in mlmodel._mil_program.functions.values():
            for op in fn.operations:
                if op.op_type == "const" and op.outputs[0].shape and op.outputs[0].shape[0] == vocab_size:
                    names[op.name] = cfg[8]
    with _quiet():
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=cfg[bits],
                                                                           op_name_configs=names))


RESIDUAL_HEADROOM = 2048.0  # the probe's residual peak is brought under this (32x below float16's 65,504)


def residual_scale(model, tokenizer) -> float:
    """The power of two the float16 graphs divide the residual stream by (coreml_graphs.py): the probe's peak, with
    the same text again after it (a longer context grows it), at most RESIDUAL_HEADROOM."""
    import math

    from mtpkit.export.coreml_graphs import residual_peak
    probe = probe_tokens(tokenizer)
    peak = residual_peak(model, probe + probe)
    return float(2 ** max(0, math.ceil(math.log2(max(peak, 1e-30) / RESIDUAL_HEADROOM))))


def _no_int16(mlmodel, what: str) -> None:
    from mtpkit.export.mil_eval import int16_ops
    bad = int16_ops(mlmodel._mil_program)
    if bad:
        raise MtpkitError(f"coreml export: {what} holds 16-bit integer ops ({', '.join(bad[:3])}): token ids above "
                          "32,767 would wrap; nothing written")


def write_files(model, drafter, tokenizer, out: Path, quant: str, *, compute: str = "gpu",
                context: int = DEFAULT_CONTEXT, k: int = DEFAULT_K, precision: str = "float16", prefill: int = PREFILL,
                name: str | None = None, source: dict[str, Any] | None = None, progress=None) -> dict[str, Any]:
    """Write target.mlpackage (+ drafter.mlpackage for ane), tokenizer.model (if any) and coreml.json into `out` (a
    directory that exists); no numeric checks. Returns the manifest. `progress(str)` hears each function; `prefill`:
    the prefill function's tokens (tests make it small, so that short prompts exercise it)."""
    import tempfile

    import torch
    ct = _ct()
    from mtpkit.export.coreml_graphs import DraftStep, TargetStep, cache_shape, kinds
    from mtpkit.export.onnx import weights_sha256  # the same fingerprint as the ONNX export's
    c = model.config
    dc = drafter.config if drafter is not None else None
    stateful = compute == "gpu"
    shape = cache_shape(c, context)
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=s)
              for s in ("keys", "values")] if stateful else []
    say = progress or (lambda s: None)
    fns = target_functions(context, k, prefill)
    scale = residual_scale(model, tokenizer) if precision == "float16" else 1.0
    parts: dict[str, list[tuple[str, Path]]] = {"target": [], "drafter": []}
    with tempfile.TemporaryDirectory(prefix="mtpkit-coreml-") as tmp:
        def one(pkg: str, fn: str, module, args, inputs, outputs):
            say(f"{pkg}.{fn}")
            ml = compress(convert(module, args, inputs, outputs, states, precision), quant, c.vocab_size)
            _no_int16(ml, f"function {fn}")
            path = Path(tmp) / f"{pkg}_{fn}.mlpackage"
            ml.save(str(path))
            parts[pkg].append((fn, path))

        for fn, n in fns.items():
            ins, outs = _io(c, dc, context, stateful, n)
            args = (torch.zeros(1, n, dtype=torch.int32), torch.tensor([min(3, context - n)], dtype=torch.int32))
            args += tuple(torch.zeros(i.shape.shape, dtype=torch.float16) for i in ins[2:])  # explicit K/V
            one("target", fn, TargetStep(model, n, context, stateful, scale), args, ins, outs)
        if drafter is not None:
            ins, outs = _io(c, dc, context, stateful, None)
            args = (torch.zeros(1, dtype=torch.int32), torch.zeros(1, c.hidden_size), torch.tensor([3], dtype=torch.int32))
            args += tuple(torch.zeros(i.shape.shape, dtype=torch.float16) for i in ins[3:])
            one("target" if stateful else "drafter", "draft", DraftStep(drafter, model, context, stateful),
                args, ins, outs)
        for pkg, fl in parts.items():
            if not fl:
                continue
            say(f"{pkg}.mlpackage")
            desc = ct.utils.MultiFunctionDescriptor()
            for fn, path in fl:
                desc.add_function(str(path), src_function_name="main", target_function_name=fn)
            desc.default_function_name = fl[0][0] if pkg == "drafter" else "decode"
            with _quiet():
                ct.utils.save_multifunction(desc, str(out / f"{pkg}.mlpackage"))
    funcs = {fn: {"tokens": n, **_names(c, dc, context, stateful, n)} for fn, n in fns.items()}
    manifest: dict[str, Any] = {
        "format": "mtpkit-coreml", "version": 1, "compute": compute, "stateful": stateful, "context": context, "k": k,
        "precision": precision, "residual_scale": scale, "quant": quant,
        "quant_block": QUANT_BLOCK if quant != "none" else None,
        "deployment_target": "iOS18 / macOS15", "cache_shape": list(shape), "target_name": name,
        "target_source": source, "target_config": c.to_dict(), "drafter_config": dc.to_dict() if dc else None,
        "target_sha256": weights_sha256(model), "params": sum(p.numel() for p in model.parameters()),
        "target": {"package": "target.mlpackage", "functions": funcs, "states": ["keys", "values"] if stateful else []},
        "drafter": None}
    if drafter is not None:
        manifest["drafter"] = {"package": "target.mlpackage" if stateful else "drafter.mlpackage", "function": "draft",
                               **_names(c, dc, context, stateful, None), "kinds": kinds(dc),
                               "reads_layers": {kd: c.last_layer_of(kd) for kd in kinds(dc)},
                               "params": sum(p.numel() for p in drafter.parameters())}
    if tokenizer is not None and getattr(tokenizer, "model_path", None):
        shutil.copyfile(tokenizer.model_path, out / "tokenizer.model")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def check_target(ref, path: Path, tokens: list[int], tolerance: float, what: str = "exported Core ML target",
                 min_argmax: float = 0.9) -> dict[str, Any]:
    """The exported target evaluated op by op (mil_eval) through the coreml backend's steps (a prefill of half the
    probe: the prefill function where it is that long, then verifies of up to K + 1 tokens) vs the float32 reference:
    compare_logits over every position from the prefill's last on (raises beyond)."""
    be = _evaluated(path, drafter=False, max_len=len(tokens) + 1)
    got, _, _ = walk(be, tokens, max(1, len(tokens) // 2), chunk=be.k + 1)
    return compare_logits(reference_logits(ref, tokens)[len(tokens) // 2 - 1 if len(tokens) > 1 else 0:], got,
                          tolerance, min_argmax, what)


def _evaluated(path: Path, drafter: bool, max_len: int):
    from mtpkit.export.mil_eval import EvaluatedPrograms
    from mtpkit.runtime.coreml_backend import CoreMLBackend
    return CoreMLBackend(path, drafter, max_len=max_len, programs=EvaluatedPrograms(path))


def check_drafter(ref, drafter, path: Path, tokens: list[int], tolerance: tuple[float, float],
                  min_argmax: float) -> dict[str, Any]:
    """Draft steps on the evaluated programs vs the reference drafter (parity.check_draft_steps)."""
    be = _evaluated(path, drafter=True, max_len=len(tokens) + 1)
    return check_draft_steps(ref, drafter, be, tokens, tolerance, min_argmax, "exported Core ML drafter step",
                             chunk=be.k + 1)


def check_options(compute: str | None, context: int | None, k: int | None) -> tuple[str, int, int]:
    compute = compute or "gpu"
    if compute not in COMPUTES:
        raise MtpkitError(f"--compute {compute!r}: --format coreml accepts {' | '.join(COMPUTES)}")
    context = DEFAULT_CONTEXT if context is None else context
    k = DEFAULT_K if k is None else k
    if not 1 <= k <= 16:
        raise MtpkitError(f"--max-draft {k}: between 1 and 16")
    if context < 2 * (k + 1) or context > 32768:
        raise MtpkitError(f"--context {context}: between {2 * (k + 1)} and 32768 positions")
    return compute, context, k


def export(target: str, drafter: str | None, out: Path, *, quant: str | None = None, dtype: str | None = None,
           compute: str | None = None, context: int | None = None, max_draft: int | None = None,
           **format_options) -> dict[str, Any]:
    """Write OUT's entries (module docstring); nothing lands in OUT unless the evaluated programs are within
    tolerance of the reference."""
    from mtpkit.export import no_options
    no_options("coreml", format_options)
    quant = check_quant("coreml", quant, QUANTS)
    compute, context, k = check_options(compute, context, max_draft)
    if dtype not in (None, "float16"):
        raise MtpkitError("--format coreml computes in float16 (--dtype float16); smaller weights: --quant int8 | int4")
    _ct()
    from mtpkit.api import resolve_drafter
    from mtpkit.model.load import load_drafter, load_target
    t0 = time.perf_counter()
    dpath = resolve_drafter(target, drafter)
    steps = len(target_functions(context, k)) + 3 + (dpath is not None) * (2 if compute == "ane" else 1)
    with progress_steps("export coreml", steps) as say:
        say(f"loading the target {target}" + (f" and the drafter {dpath}" if dpath is not None else ""))
        t = load_target(target)
        d = load_drafter(dpath, t.model) if dpath is not None else None
        if d is not None:
            d.config.check_target(t.config)
        out = Path(out)
        probe = probe_tokens(t.tokenizer)
        # long enough that its first half runs through the prefill function (and fits a small --context)
        probe = (probe * (2 * PREFILL // len(probe) + 2))[:min(context - k - 1, 2 * PREFILL + 8)]
        with staged(out, OUTPUTS) as tmp:
            write_files(t.model, d, t.tokenizer, tmp, quant, compute=compute, context=context, k=k, name=str(target),
                        source=t.source, progress=lambda s: say(f"converting {s}"))
            say("checking against the reference (numpy evaluation)")
            check = check_target(t.model, tmp, probe, TOLERANCE[quant], f"exported Core ML target (--quant {quant})",
                                 MIN_ARGMAX[quant])
            res: dict[str, Any] = {"format": "coreml", "out": str(out), "quant": quant, "compute": compute,
                                   "context": context, "k": k, "vs_reference": check, "probe_tokens": len(probe),
                                   "drafter_source": dpath, "target_mb": _mb(tmp / "target.mlpackage")}
            res["wrote"] = [f"{out}/target.mlpackage ({quant}, {compute}, {res['target_mb']} MB)"]
            if d is not None:
                res["drafter_check"] = check_drafter(t.model, d, tmp, probe, DRAFTER_TOLERANCE[quant],
                                                     DRAFTER_MIN_ARGMAX[quant])
                if compute == "ane":
                    res["drafter_mb"] = _mb(tmp / "drafter.mlpackage")
                    res["wrote"].append(f"{out}/drafter.mlpackage ({quant}, {res['drafter_mb']} MB)")
            res["removed"] = stale_entries(out, tmp, OUTPUTS)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            (tmp / "export.json").write_text(json.dumps(res, indent=2))
    return res


def _mb(p: Path) -> float:
    return round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 1)
