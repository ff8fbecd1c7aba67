"""Export target and drafter for ONNX Runtime (`mtpkit export --format onnx`).

    DIR/target.onnx  + target.onnx.data     one target step with explicit K/V (onnx_graphs.py has the I/O contract)
    DIR/drafter.onnx + drafter.onnx.data    one draft step over the target's last sliding and last full layer K/V
    DIR/onnx.json                           what a runtime needs: opset, quant, both configs, input/output names
    DIR/tokenizer.model, DIR/export.json    the SentencePiece model; this export's result and checks

Traced with `torch.onnx.export(dynamo=True)` at ONNX opset OPSET (+ com.microsoft for the quantized operators);
every tensor over 1 KB goes to the external data file. The tied head is a Gemm(transB) that shares the embedding's
constant, so a float32 export stores the 262k x 640 matrix once.

--quant: none = float32. int8 / int4 = ONNX Runtime's weight-only block quantizer (MatMulNBitsQuantizer, symmetric,
QUANT_BLOCK values per block along the input dimension, accuracy_level 4 = int8 activations: the only fast CPU path):
every constant matrix multiply becomes MatMulNBits with 8 or 4 bits (int4: the tied head stays at 8, see `quantize`);
int4 also stores the embedding Gathers as GatherBlockQuantized (ONNX Runtime quantizes Gathers at 4 bits only, so
int8 keeps the embedding rows in float32). The quantizer rewrites MatMuls only: the head's Gemm first becomes a
MatMul over its own transposed copy. The drafter's centroid-head rows stay float16 in the quantized exports.
--drafter-quant quantizes the drafter on its own; default: int8 with a float32 target (`default_drafter_quant`): the
target stays exact (greedy output equal to the reference's), and the draft step, bound by its weights' bytes on a
CPU, costs 3.9 ms instead of 6.1 under the profiler on this repo's 2 cores, with the same acceptance
(bench/results/cpu_onnx/NOTES.md).

Before anything lands in DIR both files run in ONNX Runtime through mtpkit's onnx backend (a prefill, then verifies
past the sliding window) and are compared with the float32 reference: the target's logits (`TOLERANCE`) and each
draft step's candidate logits and next h (`DRAFTER_TOLERANCE`). Imports without torch and onnx.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtpkit.errors import MtpkitError
from mtpkit.export import COMMON_QUANTS, check_quant, no_options, staged, stale_entries
from mtpkit.export.parity import check_draft_steps, compare_logits, probe_tokens, reference_logits, walk
from mtpkit.progress import steps as progress_steps

QUANTS = COMMON_QUANTS  # none | int8 | int4 (module docstring)
QUANT_BITS = {"int8": 8, "int4": 4}
QUANT_BLOCK = 32
OPSET = 21  # ONNX domain: Gelu(approximate="tanh") needs 20, int4 tensors (GatherBlockQuantized's data) 21
MANIFEST = "onnx.json"
OUTPUTS = ("target.onnx.data", "target.onnx", "drafter.onnx.data", "drafter.onnx", "tokenizer.model", MANIFEST,
           "export.json")  # what OUT gets, in order (each .onnx after its data)
# max |logit diff| vs the float32 reference and the least argmax agreement over the probe, per --quant. Measured on the
# real Gemma 3 270M (22-token probe, logits reach 35; ONNX Runtime 1.32, x86 CPU): none 5.9e-5 (100 %), int8 1.08
# (100 %), int4 12.2 (67 %: 4-bit round-to-nearest weights of a target that was already Q4_K_M; asymmetric or blocks
# of 16 do no better: 14.1 / 11.5; MLX's int4 is at 15). On the tiny test targets (|logit| < 1): 4e-7, 0.02, 0.24.
TOLERANCE = {"none": 0.01, "int8": 2.5, "int4": 16.0}
MIN_ARGMAX = {"none": 1.0, "int8": 0.8, "int4": 0.6}
# a draft step: (max |candidate logit diff|, max |next h diff| relative to the largest |h|). Measured on the shipped
# drafter: none 1.2e-5 / 1.3e-6, int8 0.27 / 0.029, int4 2.66 / 0.31
DRAFTER_TOLERANCE = {"none": (0.01, 1e-4), "int8": (2.5, 0.1), "int4": (16.0, 0.5)}


def check_expressible(c, quant: str) -> None:
    """Refuse what the files cannot hold: 4-bit embedding rows (GatherBlockQuantized, the target's embedding in both
    graphs) come in whole blocks."""
    if quant == "int4" and c.hidden_size % QUANT_BLOCK:
        raise MtpkitError(f"onnx export: --quant int4 stores embedding rows in blocks of {QUANT_BLOCK}: the target's "
                          f"hidden_size {c.hidden_size} is not a multiple (use --quant int8 or none)")


def target_io(c) -> dict[str, list[str]]:
    from mtpkit.export.onnx_graphs import past_name, present_name
    kv = [(i, n) for i in range(c.num_hidden_layers) for n in ("key", "value")]
    return {"inputs": ["input_ids", "position_ids", "logits_indices"] + [past_name(i, n) for i, n in kv],
            "outputs": ["logits", "hidden_states"] + [present_name(i, n) for i, n in kv]}


def drafter_io(c, dc) -> dict[str, Any]:
    """The drafter's inputs name the target's past K/V of the layers it reads: an app binds the same buffers."""
    from mtpkit.export.onnx_graphs import kinds, past_name
    layers = {k: c.last_layer_of(k) for k in kinds(dc)}
    past = [past_name(layers[k], n) for k in kinds(dc) for n in ("key", "value")]
    out = ["logits", "h_next"] if dc.head == "dense" else ["ids", "logits", "h_next"]
    return {"inputs": ["token", "h", "position"] + past, "outputs": out, "reads_layers": layers}


def _trace(module, args: tuple, dynamic: tuple, io: dict[str, list[str]]):
    """torch.onnx.export (dynamo) -> onnx.ModelProto with our input/output names."""
    import logging
    import warnings

    import torch
    # the export's steps are its only lines on stderr: not torch's "torchvision is not installed", nor onnxscript's
    # INFO lines (ONNX Runtime's quantizer, once imported, logs the root logger at INFO: logging.basicConfig)
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING if name != "torch.onnx" else logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=dynamic, opset_version=OPSET,
                                 input_names=io["inputs"], output_names=io["outputs"], verbose=False)
    return prog.model_proto


def export_target(model):
    """The target step graph (onnx_graphs.TargetGraph) of a GemmaModel."""
    import torch
    from torch.export import Dim

    from mtpkit.export.onnx_graphs import TargetGraph
    c = model.config
    n, m, s = 3, 2, 5  # distinct sample sizes: the tracer must not equate dynamic dims
    kv_shape = (1, c.num_key_value_heads, s, c.head_dim)
    past = tuple(torch.randn(kv_shape) for _ in range(2 * c.num_hidden_layers))  # distinct: no aliased inputs
    args = (torch.zeros(1, n, dtype=torch.long), torch.arange(s, s + n)[None], torch.arange(m), *past)
    nd = Dim("n")
    dynamic = ({1: nd}, {1: nd}, {0: Dim("m")},
               tuple({2: Dim(f"past_{i // 2}")} for i in range(len(past))))
    return _trace(TargetGraph(model), args, dynamic, target_io(c))


def export_drafter(drafter, model, quant: str = "none"):
    """The draft step graph (onnx_graphs.DrafterGraph) of a DrafterModel on its target GemmaModel; quantized exports
    store the centroid head's rows in float16 (`quantize` leaves them out: see there)."""
    import torch
    from torch.export import Dim

    from mtpkit.export.onnx_graphs import DrafterGraph, kinds
    c, dc = model.config, drafter.config
    sizes = {k: 5 + j for j, k in enumerate(kinds(dc))}
    past = tuple(torch.randn(1, c.num_key_value_heads, sizes[k], c.head_dim) for k in kinds(dc) for _ in range(2))
    args = (torch.zeros(1, dtype=torch.long), torch.randn(1, c.hidden_size), torch.tensor([7]), *past)
    dims = {k: Dim(f"past_{k}") for k in kinds(dc)}
    dynamic = (None, None, None, tuple({2: dims[k]} for k in kinds(dc) for _ in range(2)))
    io = drafter_io(c, dc)
    graph = DrafterGraph(drafter, model, torch.float32 if quant == "none" else torch.float16)
    return _trace(graph, args, dynamic, {"inputs": io["inputs"], "outputs": io["outputs"]})


def untie_gemms(model) -> None:
    """Gemm(x, W, transB=1) over a constant W -> MatMul(x, W^T) with W^T its own constant (in place): the form
    ONNX Runtime's weight quantizer rewrites. The embedding Gathers keep W."""
    from onnx import helper, numpy_helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for idx, node in enumerate(list(g.node)):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in inits or attrs.get("transA", 0) \
                or not attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0:
            continue
        wt = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[node.input[1]]).T),
                                     f"{node.input[1]}.T.{idx}")
        g.initializer.append(wt)
        g.node.remove(node)
        g.node.insert(idx, helper.make_node("MatMul", [node.input[0], wt.name], list(node.output), name=node.name))


def quantize(model, quant: str, vocab_size: int):
    """ONNX Runtime's MatMulNBitsQuantizer -> a new ModelProto. int8: every MatMul at 8 bits. int4: at 4 bits, and the
    embedding Gathers, except the tied head (a MatMul over a [d, vocab] constant), which stays at 8 bits as llama.cpp's
    Q4_K_M keeps its embedding at 8: measured on Gemma 3 270M, a 4-bit head moves the logits by up to 12 (argmax 67 %
    of the probe), an 8-bit one by 2.9 (100 %)."""
    if quant == "none":
        return model
    import logging

    from onnx import TensorProto
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    untie_gemms(model)
    inits = {t.name: t for t in model.graph.initializer}
    head = [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and vocab_size in inits[n.input[1]].dims]
    # Gathers of float32 tables only: not the index tables, nor the drafter's float16 cluster rows (4-bit rows of
    # 4,096 candidates dequantize slower than the rest of a draft step: 11 ms of 17 on this repo's CPU)
    tables = [n.name for n in model.graph.node if n.op_type == "Gather"
              and (n.input[0] not in inits or inits[n.input[0]].data_type != TensorProto.FLOAT)]
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in head]
    # (bits, nodes left alone, op types); the quantizer's nodes_to_include adds nodes, it does not select them
    passes = [(8, [], ("MatMul",))] if quant == "int8" else [(8, others, ("MatMul",)), (4, [], ("MatMul", "Gather"))]
    for bits, leave, ops in passes:
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=QUANT_BLOCK, is_symmetric=True, accuracy_level=4,
                                 nodes_to_exclude=tables + leave, op_types_to_quantize=ops,
                                 quant_axes=(("MatMul", 0), ("Gather", 1)))
        q.process()
        model = q.model.model
    return model


def save(model, path: Path) -> None:
    """One .onnx and its external data file (every tensor over 1 KB) beside it."""
    import onnx
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    data = path.with_name(path.name + ".data")
    if data.exists():  # onnx creates it readable by its owner only
        data.chmod(path.stat().st_mode & 0o777)


def weights_sha256(model) -> str:
    """A fingerprint of the target's weights: a drafter.onnx runs only with the target.onnx it was exported with."""
    import hashlib
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def default_drafter_quant(quant: str) -> str:
    """--drafter-quant when not given: int8 under a float32 target (module docstring), else the target's quant."""
    return "int8" if quant == "none" else quant


def write_steps(quant: str, drafter_quant: str | None) -> int:
    """How many times write_files calls `progress` (None drafter_quant: no drafter)."""
    return 1 + (quant != "none") + (0 if drafter_quant is None else 1 + (drafter_quant != "none"))


def write_files(model, drafter, tokenizer, out: Path, quant: str, name: str | None = None,
                source: dict[str, Any] | None = None, drafter_quant: str | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write target.onnx, drafter.onnx (if a drafter; in `drafter_quant`, default `quant`), tokenizer.model (if any)
    and onnx.json into `out` (a directory that exists); no checks. `name` / `source`: the target as given to the
    export and where its weights came from (load_target's source), for benches that compare with the reference.
    progress(step) names each slow step (write_steps counts them). Returns the manifest."""
    from mtpkit.export.onnx_graphs import kinds
    say = progress or (lambda what: None)
    c = model.config
    dc = drafter.config if drafter is not None else None
    dq = drafter_quant or quant
    check_expressible(c, quant)
    check_expressible(c, dq)
    say("tracing target.onnx (torch.onnx, dynamo)")
    graph = export_target(model)
    if quant != "none":
        say(f"quantizing target.onnx to {quant} (ONNX Runtime's MatMulNBits)")
    save(quantize(graph, quant, c.vocab_size), out / "target.onnx")
    manifest: dict[str, Any] = {
        "format": "mtpkit-onnx", "version": 1, "opset": OPSET, "quant": quant, "drafter_quant": dq if dc else None,
        "quant_block": QUANT_BLOCK if quant != "none" else None, "target_name": name, "target_source": source,
        "target_config": c.to_dict(), "drafter_config": dc.to_dict() if dc is not None else None,
        "target_sha256": weights_sha256(model),
        "target": {"file": "target.onnx", **target_io(c), "params": sum(p.numel() for p in model.parameters())},
        "drafter": None}
    if drafter is not None:
        say("tracing drafter.onnx (torch.onnx, dynamo)")
        graph = export_drafter(drafter, model, dq)
        if dq != "none":
            say(f"quantizing drafter.onnx to {dq} (ONNX Runtime's MatMulNBits)")
        save(quantize(graph, dq, c.vocab_size), out / "drafter.onnx")
        own = sum(p.numel() for p in drafter.parameters())
        manifest["drafter"] = {"file": "drafter.onnx", **drafter_io(c, dc), "kinds": kinds(dc), "params": own}
    if tokenizer is not None and getattr(tokenizer, "model_path", None):
        shutil.copyfile(tokenizer.model_path, out / "tokenizer.model")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def check_target(ref, path: Path, tokens: list[int], tolerance: float, what: str = "exported ONNX target",
                 min_argmax: float = MIN_ARGMAX["none"]) -> dict[str, Any]:
    """The exported target in ONNX Runtime (a prefill of half the probe, then verifies of 4 tokens) vs the float32
    reference on `tokens`: compare_logits over every position from the prefill's last on (raises beyond)."""
    from mtpkit.runtime.onnx_backend import ONNXBackend
    split = max(1, len(tokens) // 2)
    be = ONNXBackend(path, None, max_len=len(tokens) + 8, threads=None)
    got, _, _ = walk(be, tokens, split)
    return compare_logits(reference_logits(ref, tokens)[split - 1:], got, tolerance, min_argmax, what)


def check_drafter(ref, drafter, path: Path, tokens: list[int], tolerance: tuple[float, float],
                  min_argmax: float) -> dict[str, Any]:
    """Draft steps in ONNX Runtime (target K/V and h from the exported target, at the start of each verify of
    check_target's walk) vs the reference drafter on the reference target's cache: the candidates' logits against
    the reference's dense logits at the same ids (compare_logits, tolerance[0]), and the next h (tolerance[1],
    relative to the largest |h|)."""
    from mtpkit.runtime.onnx_backend import ONNXBackend
    be = ONNXBackend(path, path / "drafter.onnx", max_len=len(tokens) + 8, threads=None)
    return check_draft_steps(ref, drafter, be, tokens, tolerance, min_argmax, "exported ONNX drafter step")


def export(target: str, drafter: str | None, out: Path, *, quant: str | None = None, dtype: str | None = None,
           drafter_quant: str | None = None, **format_options) -> dict[str, Any]:
    """Write OUT's entries (module docstring); nothing lands in OUT unless the target and the drafter step, run in
    ONNX Runtime, are within tolerance of the reference. Without a drafter a stale OUT/drafter.onnx is removed.
    drafter_quant: the drafter's QUANTS value (default: default_drafter_quant); its step is checked with the looser
    tolerance of the two (it reads the target's K/V)."""
    no_options("onnx", format_options)
    quant = check_quant("onnx", quant, QUANTS)  # every refusal of the arguments before the (slow) target load
    if drafter_quant not in (None, *QUANTS):
        raise MtpkitError(f"--drafter-quant {drafter_quant!r}: --format onnx accepts {', '.join(QUANTS)}")
    dq = drafter_quant or default_drafter_quant(quant)
    if dtype not in (None, "float32"):
        raise MtpkitError("--format onnx computes in float32 (--dtype float32); smaller weights: --quant int8 | int4")
    from mtpkit.api import resolve_drafter
    t0 = time.perf_counter()
    dpath = resolve_drafter(target, drafter)
    total = 2 + write_steps(quant, dq if dpath is not None else None) + 1 + (dpath is not None)
    with progress_steps("export onnx", total) as say:
        say("importing torch, onnx and onnxruntime")
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise MtpkitError(f"--format onnx needs {e.name} (pip install -e '.[onnx]')") from None
        from mtpkit.model.load import load_drafter, load_target
        say(f"loading the target {target}" + (f" and the drafter {dpath}" if dpath is not None else ""))
        t = load_target(target)
        d = load_drafter(dpath, t.model) if dpath is not None else None
        check_expressible(t.config, quant)
        out = Path(out)
        probe = probe_tokens(t.tokenizer)
        with staged(out, OUTPUTS) as tmp:
            write_files(t.model, d, t.tokenizer, tmp, quant, name=str(target), source=t.source, drafter_quant=dq,
                        progress=say)
            say("checking target.onnx in ONNX Runtime against the reference")
            check = check_target(t.model, tmp, probe, TOLERANCE[quant], f"exported ONNX target (--quant {quant})",
                                 MIN_ARGMAX[quant])
            res: dict[str, Any] = {"format": "onnx", "out": str(out), "quant": quant, "drafter_quant": dq,
                                   "opset": OPSET, "vs_reference": check, "probe_tokens": len(probe),
                                   "drafter_source": dpath, "target_mb": _mb(tmp, "target.onnx")}
            res["wrote"] = [f"{out}/target.onnx ({quant}, {res['target_mb']} MB)"]
            if d is not None:
                say("checking draft steps in ONNX Runtime against the reference")
                worst = max(quant, dq, key=QUANTS.index)  # QUANTS runs from the exact to the loosest
                res["drafter_check"] = check_drafter(t.model, d, tmp, probe, DRAFTER_TOLERANCE[worst],
                                                     MIN_ARGMAX[worst])
                res["drafter_mb"] = _mb(tmp, "drafter.onnx")
                res["wrote"].append(f"{out}/drafter.onnx ({dq}, {res['drafter_mb']} MB)")
            res["removed"] = stale_entries(out, tmp, OUTPUTS)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            (tmp / "export.json").write_text(json.dumps(res, indent=2))
    return res


def _mb(d: Path, name: str) -> float:
    return round(sum(p.stat().st_size for p in (d / name, d / f"{name}.data") if p.exists()) / 2**20, 1)
