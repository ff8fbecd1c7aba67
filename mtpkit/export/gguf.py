"""Export target and drafter to GGUF for llama.cpp (`mtpkit export --format gguf`).

    DIR/target.gguf   arch `gemma3`, our canonical tensors under llama.cpp's names (norms stored as 1 + w, as
                      llama.cpp's converter writes them), the tokenizer metadata copied from the source GGUF
                      (or rebuilt from the SentencePiece model of an HF directory)
    DIR/drafter.gguf  arch `gemma4-assistant`, the keys and tensors llama.cpp's loader for that arch reads
                      (see `drafter_tensors`)

--quant: the common values `none` (default: a GGUF target's own tensors byte for byte, i.e. `source`; any other
target in f32), `int8` (= q8_0) and `int4` (= q4_k_m), or a GGUF type by name (`QUANTS`). --drafter-quant: the
same common values (`none` = f32, `int8` = q8_0, the default, `int4` = q4_0) or a numpy type (`DRAFTER_QUANTS`).
Quantization: `f32 f16 bf16 q8_0 q5_0 q5_1 q4_0 q4_1` are written by the `gguf` package's numpy quantizers;
the K-quants (`q4_k_m q5_k_m q6_k ...`) are made by llama.cpp's own quantizer (llama-cpp-python's
`llama_model_quantize`) from an F32 file, which, like llama.cpp's tool, picks the per-tensor mix and falls back
for rows that are not a multiple of 256. 1-D tensors (norms, scalars) always stay F32. A tensor whose rows
the numpy quantizer cannot split into blocks is an error before anything is written. Imports without torch.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtpkit.errors import MtpkitError
from mtpkit.export import COMMON_QUANTS, check_quant, no_options, staged, stale_entries
from mtpkit.export.parity import compare_logits, probe_tokens, reference_logits
from mtpkit.model.config import FULL, SLIDING, GemmaConfig
from mtpkit.progress import steps as progress_steps

NUMPY_QUANTS = ("source", "f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
# llama.cpp's ftype names (llama_ftype) for the quantizer it ships; values from llama.h
LLAMA_QUANTS = {"q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "q3_k_m": 12, "q2_k": 10}
TYPES = NUMPY_QUANTS + tuple(LLAMA_QUANTS)
QUANTS = COMMON_QUANTS + TYPES
COMMON_TYPES = {"int8": "q8_0", "int4": "q4_k_m"}  # none: gguf_type
# --drafter-quant: the drafter is written by the numpy quantizers (no K-quants, no source tensors to copy)
DRAFTER_QUANTS = COMMON_QUANTS + NUMPY_QUANTS[1:]
DRAFTER_TYPES = {"none": "f32", "int8": "q8_0", "int4": "q4_0"}
OUTPUTS = ("target.gguf", "drafter.gguf", "tokenizer.model", "target.json", "export.json")  # what OUT gets, in order


def _qtype(name: str):
    import gguf
    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q5_0": gguf.GGMLQuantizationType.Q5_0, "q5_1": gguf.GGMLQuantizationType.Q5_1,
            "q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}[name]


def gguf_type(quant: str, source: dict[str, Any]) -> str:
    """--quant (QUANTS) -> the GGUF type written for the target (`source`: the loaded target's source info)."""
    if quant == "none":
        return "source" if source.get("kind") == "gguf" else "f32"
    return COMMON_TYPES.get(quant, quant)


def drafter_type(drafter_quant: str | None) -> str:
    """--drafter-quant (DRAFTER_QUANTS, None = int8) -> the GGUF type the drafter is written in; called before the
    target loads."""
    dq = "int8" if drafter_quant is None else drafter_quant
    if dq in DRAFTER_QUANTS:
        return DRAFTER_TYPES.get(dq, dq)
    why = {"source": " (source copies a GGUF target's own tensors; a drafter has none)"}.get(dq, "")
    if dq in LLAMA_QUANTS:
        why = " (K-quants come from llama.cpp's quantizer, which mtpkit runs on the target only)"
    raise MtpkitError(f"--drafter-quant {dq!r}: --format gguf accepts {', '.join(DRAFTER_QUANTS)}{why}")


def check_llama_quantizer(quant: str) -> None:
    if COMMON_TYPES.get(quant, quant) in LLAMA_QUANTS:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise MtpkitError(f"--quant {quant} uses llama.cpp's quantizer: pip install -e '.[gguf]' "
                              "(llama-cpp-python)") from None


@dataclass
class Tensor:
    name: str  # GGUF name
    data: np.ndarray  # float32, numpy (row-major) shape = reversed ggml ne
    quantize: bool = True  # False: always F32 (norms, scalars, rope factors)


LOW_BIT = ("q5_0", "q5_1", "q4_0", "q4_1")


def plan_types(tensors: list[Tensor], quant: str) -> dict[str, str]:
    """GGUF type name per tensor for a numpy quant (a K-quant is first written as f32); errors before writing.

    With 4/5-bit types the token embedding, which is also the tied output head, stays q8_0 (as llama.cpp's own
    Q4_K_M of this model): at 4 bits the head alone moves the real target's logits by up to 14 (argmax 64 %)."""
    import gguf
    base = "f32" if quant in LLAMA_QUANTS or quant == "source" else quant
    out = {}
    for t in tensors:
        if not t.quantize or t.data.ndim < 2 or base == "f32":
            out[t.name] = "f32"
            continue
        qt = "q8_0" if t.name == "token_embd.weight" and base in LOW_BIT else base
        block = gguf.GGML_QUANT_SIZES[_qtype(qt)][0]
        if t.data.shape[-1] % block:
            raise MtpkitError(f"--quant {quant}: tensor {t.name} has rows of {t.data.shape[-1]} values, "
                              f"{qt.upper()} needs a multiple of {block}")
        out[t.name] = qt
    return out


# general.file_type (llama.cpp's llama_ftype) of a file whose quantized tensors are all of one numpy type; tools
# such as llama-bench label a model by it (without it: "all F32"). K-quant files get theirs from llama.cpp's
# quantizer, a `source` copy the source file's.
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}


def file_type_kv(gtype: str, reader=None) -> list[tuple[str, Any, Any]]:
    """general.file_type (the gguf package's LlamaFileType) + general.quantization_version for a file written in
    `gtype`, as llama.cpp's tools write them (a `source` copy: the source file's own values, when it has them)."""
    import gguf
    T = gguf.GGUFValueType
    if gtype == "source":
        return [(k, reader.fields[k].contents(), T.UINT32) for k in ("general.file_type", "general.quantization_version")
                if reader is not None and k in reader.fields]
    return [("general.file_type", int(gguf.LlamaFileType[FILE_TYPES[gtype]]), T.UINT32),
            ("general.quantization_version", gguf.GGML_QUANT_VERSION, T.UINT32)]


def _write(path: Path, arch: str, name: str, kv: list[tuple[str, Any, Any]], tensors) -> None:
    """One GGUF file: metadata kv (key, value, gguf.GGUFValueType or (ARRAY, sub_type)), then tensors =
    (name, array, gguf type) in order (quantized arrays are [rows, bytes])."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name(name)
    for key, value, vtype in kv:
        if isinstance(vtype, tuple):
            w.add_key_value(key, value, vtype[0], sub_type=vtype[1])
        else:
            w.add_key_value(key, value, vtype)
    for tname, a, q in tensors:
        w.add_tensor(tname, a, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(path: Path, arch: str, kv: list[tuple[str, Any, Any]], tensors: list[Tensor],
               types: dict[str, str], name: str) -> None:
    """Our float tensors, quantized to `types` (plan_types) by the gguf package."""
    import gguf
    from gguf import quants

    def quantized():
        for t in tensors:
            q = _qtype(types[t.name])
            a = np.ascontiguousarray(t.data, dtype=np.float32)
            yield t.name, (a if q == gguf.GGMLQuantizationType.F32 else quants.quantize(a, q)), q
    _write(path, arch, name, kv, quantized())


def copy_source_gguf(reader, dst: Path, kv: list[tuple[str, Any, Any]]) -> None:
    """A gemma3 GGUF with the source file's tensors byte for byte (its quantization kept) and our metadata."""
    name = str(reader.fields["general.name"].contents()) if "general.name" in reader.fields else "mtpkit target"
    _write(dst, "gemma3", name, kv, ((t.name, np.asarray(t.data), t.tensor_type) for t in reader.tensors))


def llama_quantize(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """llama.cpp's quantizer (llama_model_quantize) from an F32 GGUF to `quant`."""
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = LLAMA_QUANTS[quant]
    p.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p)
    if rc != 0:
        raise MtpkitError(f"llama.cpp's quantizer failed on {src.name} for {quant} (code {rc})")


def gguf_types(path: Path) -> dict[str, int]:
    """Tensor-type histogram of a GGUF file (for the export report)."""
    import gguf
    r = gguf.GGUFReader(str(path))
    hist: dict[str, int] = {}
    for t in r.tensors:
        hist[t.tensor_type.name] = hist.get(t.tensor_type.name, 0) + 1
    return dict(sorted(hist.items()))


# --------------------------------------------------------------------------- target (arch gemma3)

def source_reader(source: dict[str, Any]):
    """An open GGUFReader of the target's source file when it came from one (else None)."""
    src = Path(source.get("path", "")) if source.get("kind") == "gguf" else None
    if src is None or not src.is_file():
        return None
    from mtpkit.model.files import open_gguf as _open_gguf
    return _open_gguf(src)


def tokenizer_kv(reader, tokenizer) -> list[tuple[str, Any, Any]]:
    """The target's tokenizer metadata: copied field by field from its source GGUF (`reader`, from
    `source_reader`) when it came from one (ids, types and flags exactly as llama.cpp wrote them), else rebuilt
    from the SentencePiece model."""
    import gguf
    T = gguf.GGUFValueType
    if reader is not None:
        r = reader
        out = []
        for key, f in r.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = f.types[0]
            if vtype == T.ARRAY:
                out.append((key, f.contents(), (T.ARRAY, f.types[-1])))
            else:
                out.append((key, f.contents(), vtype))
        return out
    if tokenizer is None:
        raise MtpkitError("gguf export: the target has no tokenizer (an HF directory needs tokenizer.model)")
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString(tokenizer.sp.serialized_model_proto())
    tokens = [p.piece for p in m.pieces]
    scores = [float(p.score) for p in m.pieces]
    types = [int(p.type) for p in m.pieces]  # SentencePiece's piece types have GGUF's numbers (1..6)
    sp = tokenizer.sp
    kv = [("tokenizer.ggml.model", "llama", T.STRING), ("tokenizer.ggml.pre", "default", T.STRING),
          ("tokenizer.ggml.tokens", tokens, (T.ARRAY, T.STRING)),
          ("tokenizer.ggml.scores", scores, (T.ARRAY, T.FLOAT32)),
          ("tokenizer.ggml.token_type", types, (T.ARRAY, T.INT32)),
          ("tokenizer.ggml.bos_token_id", tokenizer.bos_id, T.UINT32),
          ("tokenizer.ggml.eos_token_id", tokenizer.eos_id, T.UINT32),
          ("tokenizer.ggml.unknown_token_id", sp.unk_id(), T.UINT32),
          ("tokenizer.ggml.add_bos_token", bool(tokenizer.add_bos), T.BOOL),
          ("tokenizer.ggml.add_eos_token", False, T.BOOL),
          ("tokenizer.ggml.add_space_prefix", bool(m.normalizer_spec.add_dummy_prefix), T.BOOL)]
    if tokenizer.pad_id >= 0:
        kv.append(("tokenizer.ggml.padding_token_id", tokenizer.pad_id, T.UINT32))
    return kv


def target_kv(c: GemmaConfig) -> list[tuple[str, Any, Any]]:
    import gguf
    T = gguf.GGUFValueType
    a = "gemma3."
    if c.query_pre_attn_scalar != c.head_dim and c.num_hidden_layers != 62:
        # llama.cpp's gemma3 graph scales queries by 1/sqrt(head_dim) (by hidden/heads only for the 27B)
        raise MtpkitError(f"gguf export: llama.cpp's gemma3 assumes query_pre_attn_scalar = head_dim "
                          f"({c.head_dim}); this target uses {c.query_pre_attn_scalar}")
    kv = [(a + "context_length", c.max_position_embeddings, T.UINT32),
          (a + "embedding_length", c.hidden_size, T.UINT32),
          (a + "block_count", c.num_hidden_layers, T.UINT32),
          (a + "feed_forward_length", c.intermediate_size, T.UINT32),
          (a + "attention.head_count", c.num_attention_heads, T.UINT32),
          (a + "attention.head_count_kv", c.num_key_value_heads, T.UINT32),
          (a + "attention.key_length", c.head_dim, T.UINT32),
          (a + "attention.value_length", c.head_dim, T.UINT32),
          (a + "attention.layer_norm_rms_epsilon", c.rms_norm_eps, T.FLOAT32),
          (a + "rope.freq_base", c.rope_theta, T.FLOAT32),
          (a + "rope.freq_base_swa", c.rope_local_base_freq, T.FLOAT32),
          (a + "attention.sliding_window", c.sliding_window, T.UINT32),
          (a + "attention.sliding_window_pattern", [t == SLIDING for t in c.layer_types], (T.ARRAY, T.BOOL))]
    if c.rope_scaling_factor != 1.0:
        kv += [(a + "rope.scaling.type", "linear", T.STRING), (a + "rope.scaling.factor", c.rope_scaling_factor, T.FLOAT32)]
    if c.final_logit_softcapping:
        kv.append((a + "final_logit_softcapping", c.final_logit_softcapping, T.FLOAT32))
    return kv


def target_tensors(model) -> list[Tensor]:
    from mtpkit.model.load import canonical_to_gguf
    out = []
    for k, v in model.state_dict().items():
        if "inv_freq" in k:
            continue
        name, plus_one = canonical_to_gguf(k)
        a = v.detach().float().cpu().numpy()
        out.append(Tensor(name, a + 1.0 if plus_one else a, quantize=a.ndim >= 2))
    return out


def check_target(ref, path: Path, tokens: list[int], tolerance: float, what: str = "exported GGUF target",
                 threads: int = 2) -> dict[str, float]:
    """The exported target in llama.cpp vs the float32 reference `ref` on `tokens` (parity.compare_logits: raises
    beyond `tolerance`)."""
    from llama_cpp import Llama

    from mtpkit.runtime.llamacpp_backend import quiet_llama_logs
    quiet_llama_logs()
    try:
        llm = Llama(model_path=str(path), n_ctx=max(64, len(tokens) + 8), n_batch=len(tokens), logits_all=True,
                    n_threads=threads, verbose=False)
    except Exception as e:
        raise MtpkitError(f"llama.cpp cannot load the exported {path.name}: {e}") from None
    llm.eval(tokens)
    got = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    llm.close()
    return compare_logits(reference_logits(ref, tokens), got, tolerance, MIN_ARGMAX, what)


def layer_roles(c: GemmaConfig) -> tuple[int, int]:
    """(last sliding, last full) target layer: llama.cpp's gemma4-assistant reads layers n-2 and n-1."""
    n = c.num_hidden_layers
    if n < 2 or c.layer_types[-2] != SLIDING or c.layer_types[-1] != FULL:
        raise MtpkitError(f"gguf export: llama.cpp's gemma4-assistant drafter reads target layers n-2 (sliding) and "
                          f"n-1 (full); this target's last two layers are {list(c.layer_types[-2:])}")
    return n - 2, n - 1


# --------------------------------------------------------------------------- drafter (arch gemma4-assistant)

DRAFTER_ARCH = "gemma4-assistant"
PAD_MULTIPLE = 32  # width added when the drafter is as wide as the target (see drafter_width)


def drafter_width(d: int, target_hidden: int) -> int:
    """llama.cpp refuses an assistant whose hidden size equals the target's (embedding_length_out must differ).
    Such a drafter is written zero-padded to d + 32: the padded dims stay exactly zero through every block and
    the norm weights are scaled by sqrt(d / d'), so every output equals the unpadded model's (up to the RMS eps,
    which then acts as eps * d' / d: 5 % of 1e-6 here)."""
    return d + PAD_MULTIPLE if d == target_hidden else d


def drafter_kv(dc, t: GemmaConfig, width: int) -> list[tuple[str, Any, Any]]:
    import gguf
    T = gguf.GGUFValueType
    a = DRAFTER_ARCH + "."
    n = len(dc.layer_types)
    kv = [(a + "context_length", t.max_position_embeddings, T.UINT32),
          (a + "embedding_length", width, T.UINT32),
          (a + "embedding_length_out", dc.target_hidden_size, T.UINT32),
          (a + "block_count", n, T.UINT32),
          (a + "nextn_predict_layers", n, T.UINT32),
          (a + "feed_forward_length", dc.intermediate_size, T.UINT32),
          (a + "attention.head_count", dc.num_attention_heads, T.UINT32),
          (a + "attention.head_count_kv", dc.num_key_value_heads, T.UINT32),
          (a + "attention.key_length", dc.head_dim, T.UINT32),
          (a + "attention.value_length", dc.head_dim, T.UINT32),
          (a + "attention.key_length_swa", dc.head_dim, T.UINT32),
          (a + "attention.value_length_swa", dc.head_dim, T.UINT32),
          (a + "attention.layer_norm_rms_epsilon", dc.rms_norm_eps, T.FLOAT32),
          (a + "attention.sliding_window", dc.sliding_window, T.UINT32),
          (a + "attention.sliding_window_pattern", [k == SLIDING for k in dc.layer_types], (T.ARRAY, T.BOOL)),
          (a + "rope.freq_base", dc.rope_theta, T.FLOAT32),
          (a + "rope.freq_base_swa", dc.rope_local_base_freq, T.FLOAT32)]
    if dc.rope_scaling_factor != 1.0:
        kv += [(a + "rope.scaling.type", "linear", T.STRING), (a + "rope.scaling.factor", dc.rope_scaling_factor, T.FLOAT32)]
    kv += [("mtpkit.unpadded_embedding_length", dc.hidden_size, T.UINT32),
           ("mtpkit.draft_temperature", dc.draft_temperature, T.FLOAT32)]
    return kv


def centroid_kv(drafter) -> list[tuple[str, Any, Any]]:
    """The centroid head as metadata arrays, read by mtpkit's llama.cpp backend (llama.cpp computes dense logits
    for this arch; its loader rejects Gemma 4's own `masked_embd_*` tensor names with a shape it cannot check)."""
    import gguf
    T = gguf.GGUFValueType
    dc = drafter.config
    if dc.head != "centroid":
        return []
    return [("mtpkit.head", "centroid", T.STRING), ("mtpkit.centroid_top_k", dc.centroid_top_k, T.UINT32),
            ("mtpkit.num_centroids", dc.num_centroids, T.UINT32),
            ("mtpkit.centroids", drafter.centroids.weight.detach().float().cpu().numpy().reshape(-1).tolist(),
             (T.ARRAY, T.FLOAT32)),
            ("mtpkit.token_ordering", drafter.token_ordering.cpu().numpy().astype(np.int32).tolist(), (T.ARRAY, T.INT32))]


def drafter_tensors(drafter, t: GemmaConfig) -> list[Tensor]:
    """The drafter under llama.cpp's gemma4-assistant names, padded to `drafter_width` if needed.

    llama.cpp's norms multiply by w (our Gemma norms by 1 + w), its attention scale is 1 (ours, attn_scale, is
    folded into the query norm: RoPE is linear), its head is tied to the drafter's token_embd (ours may read the
    target's embedding: then that matrix is written as the drafter's token_embd)."""
    dc = drafter.config
    layer_roles(t)
    if dc.final_logit_softcapping:
        raise MtpkitError("gguf export: llama.cpp's gemma4-assistant has no logit softcapping; this drafter uses "
                          f"{dc.final_logit_softcapping}")
    if dc.num_key_value_heads != t.num_key_value_heads or dc.head_dim != t.head_dim:
        raise MtpkitError(f"gguf export: the drafter reads {dc.num_key_value_heads} KV heads of {dc.head_dim}, the "
                          f"target has {t.num_key_value_heads} of {t.head_dim}")
    d = dc.hidden_size
    w = drafter_width(d, dc.target_hidden_size)
    s = float(np.sqrt(d / w))
    sd = {k: v.detach().float().cpu().numpy() for k, v in drafter.state_dict().items() if "inv_freq" not in k}

    def cols(a):  # pad the input (last) dim d -> w
        return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, w - d)])

    def rows(a):  # pad the output (first) dim d -> w
        return np.pad(a, [(0, w - d)] + [(0, 0)] * (a.ndim - 1))

    def norm(a):  # hidden-size Gemma norm -> llama.cpp multiplier over the padded width
        return np.pad((1.0 + a) * s, (0, w - d))

    out = [Tensor("token_embd.weight", cols(drafter.head_weight.detach().float().cpu().numpy())),
           Tensor("output_norm.weight", norm(sd["norm.weight"]), quantize=False),
           Tensor("nextn.pre_projection.weight", rows(sd["pre_projection.weight"])),
           Tensor("nextn.post_projection.weight", cols(sd["post_projection.weight"]))]
    if FULL in dc.layer_types:
        out.append(Tensor("rope_freqs.weight", np.ones(dc.head_dim // 2, np.float32), quantize=False))
    for i in range(len(dc.layer_types)):
        p, g = f"layers.{i}.", f"blk.{i}."
        out += [Tensor(g + "attn_norm.weight", norm(sd[p + "input_layernorm.weight"]), quantize=False),
                Tensor(g + "attn_q.weight", cols(sd[p + "self_attn.q_proj.weight"])),
                Tensor(g + "attn_q_norm.weight", (1.0 + sd[p + "self_attn.q_norm.weight"]) * dc.attn_scale, quantize=False),
                Tensor(g + "attn_output.weight", rows(sd[p + "self_attn.o_proj.weight"])),
                Tensor(g + "post_attention_norm.weight", norm(sd[p + "post_attention_layernorm.weight"]), quantize=False),
                Tensor(g + "ffn_norm.weight", norm(sd[p + "pre_feedforward_layernorm.weight"]), quantize=False),
                Tensor(g + "ffn_gate.weight", cols(sd[p + "mlp.gate_proj.weight"])),
                Tensor(g + "ffn_up.weight", cols(sd[p + "mlp.up_proj.weight"])),
                Tensor(g + "ffn_down.weight", rows(sd[p + "mlp.down_proj.weight"])),
                Tensor(g + "post_ffw_norm.weight", norm(sd[p + "post_feedforward_layernorm.weight"]), quantize=False),
                Tensor(g + "layer_output_scale.weight", sd[p + "layer_scalar"].reshape(1), quantize=False)]
    return out


def describe(path: Path) -> dict[str, Any]:
    return {"mb": round(path.stat().st_size / 2**20, 1), "tensor_types": gguf_types(path)}


# max |logit diff| of the exported target in llama.cpp vs the float32 reference, per target type. Measured on the
# real Gemma 3 270M (probe of 22 tokens): f32 0.023, q8_0 1.40, q4_0 see export.json; llama.cpp quantizes the
# activations of quantized matmuls to 8 bits, so even q8_0 is not close to f32.
TOLERANCE = {"source": 3.0, "f32": 0.1, "f16": 0.5, "bf16": 1.5, "q8_0": 2.5, "q5_0": 4.0, "q5_1": 4.0}
MIN_ARGMAX = 0.8


def tolerance(quant: str) -> float:
    return TOLERANCE.get(quant, 6.0)


def export(target: str, drafter: str | None, out: Path, *, quant: str | None = None, dtype: str | None = None,
           drafter_quant: str | None = None, **format_options) -> dict[str, Any]:
    """Write OUT/target.gguf (+ tokenizer.model, target.json), OUT/drafter.gguf and OUT/export.json, load both in
    llama.cpp and compare with the reference; nothing lands in OUT unless every check passed. Without a drafter a
    stale OUT/drafter.gguf is removed (it would be picked up as the sibling; the result's `removed` says so).
    drafter_quant: DRAFTER_QUANTS (default int8 = q8_0)."""
    from mtpkit.api import resolve_drafter
    from mtpkit.model.load import load_drafter, load_target
    no_options("gguf", format_options)
    if dtype is not None:
        raise MtpkitError("--dtype is for MLX; GGUF types are chosen with --quant / --drafter-quant")
    quant = check_quant("gguf", quant, QUANTS)
    check_llama_quantizer(quant)
    drafter_quant = drafter_type(drafter_quant)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise MtpkitError("--format gguf checks the files in llama.cpp: pip install -e '.[gguf]' (llama-cpp-python)") from None
    t0 = time.perf_counter()
    dpath = resolve_drafter(target, drafter)
    kquant = COMMON_TYPES.get(quant, quant) in LLAMA_QUANTS
    with progress_steps("export gguf", 3 + kquant + 2 * (dpath is not None)) as say:
        say(f"loading the target {target}" + (f" and the drafter {dpath}" if dpath is not None else ""))
        t = load_target(target)
        c = t.config
        gtype = gguf_type(quant, t.source)
        if gtype == "source" and t.source.get("kind") != "gguf":
            raise MtpkitError("--quant source copies the tensors of a GGUF target; this target is not one (pick a type)")
        d = load_drafter(dpath, t.model) if dpath is not None else None
        # every refusal before anything is written
        tk = target_kv(c)
        tt = target_tensors(t.model)
        ttypes = plan_types(tt, gtype)
        if d is not None:
            width = drafter_width(d.config.hidden_size, d.config.target_hidden_size)
            dt = drafter_tensors(d, c)
            dtypes = plan_types(dt, drafter_quant)
        reader = source_reader(t.source)  # parsed once: its tokenizer fields and (--quant source) its tensors
        tok_kv = tokenizer_kv(reader, t.tokenizer)
        out = Path(out)
        with staged(out, OUTPUTS) as tmp:
            tgt = tmp / "target.gguf"
            if gtype == "source":
                say("writing target.gguf (the source GGUF's tensors)")
                copy_source_gguf(reader, tgt, tk + file_type_kv("source", reader) + tok_kv)
            elif gtype in LLAMA_QUANTS:
                say("writing target.gguf in f32 for llama.cpp's quantizer")
                write_gguf(tmp / "target-f32.gguf", "gemma3", tk + file_type_kv("f32") + tok_kv, tt, ttypes,
                           "mtpkit target (f32)")
                from mtpkit.runtime.llamacpp_backend import quiet_llama_logs
                quiet_llama_logs()
                say(f"quantizing target.gguf to {gtype} with llama.cpp")
                llama_quantize(tmp / "target-f32.gguf", tgt, gtype)
                (tmp / "target-f32.gguf").unlink()
            else:
                say(f"writing target.gguf ({gtype})")
                write_gguf(tgt, "gemma3", tk + file_type_kv(gtype) + tok_kv, tt, ttypes, f"mtpkit target ({gtype})")
            if t.tokenizer is not None and getattr(t.tokenizer, "model_path", None):
                shutil.copyfile(t.tokenizer.model_path, tmp / "tokenizer.model")
            (tmp / "target.json").write_text(json.dumps({"quant": gtype, "target_config": c.to_dict()}, indent=2))
            probe = probe_tokens(t.tokenizer)
            say("checking target.gguf in llama.cpp against the reference")
            check = check_target(t.model, tgt, probe, tolerance(gtype), what=f"exported target ({gtype})")
            res: dict[str, Any] = {"format": "gguf", "out": str(out), "quant": gtype, "quant_requested": quant,
                                   "drafter_quant": drafter_quant, "vs_reference": check, "probe_tokens": len(probe),
                                   "target": describe(tgt), "drafter": None, "drafter_source": dpath}
            res["wrote"] = [f"{out}/target.gguf ({gtype}, {res['target']['mb']} MB)"]
            if d is not None:
                say(f"writing drafter.gguf ({drafter_quant})")
                kv = drafter_kv(d.config, c, width) + file_type_kv(drafter_quant) + centroid_kv(d) + tok_kv
                write_gguf(tmp / "drafter.gguf", DRAFTER_ARCH, kv, dt, dtypes, "mtpkit assistant drafter")
                res["drafter"] = {**describe(tmp / "drafter.gguf"), "embedding_length": width,
                                  "padded_from": d.config.hidden_size if width != d.config.hidden_size else None}
                res["wrote"].append(f"{out}/drafter.gguf ({drafter_quant}, {res['drafter']['mb']} MB)")
                say("checking a draft step in llama.cpp against the reference")
                res["drafter_check"] = check_drafter(t.model, d, tgt, tmp / "drafter.gguf", probe)
            res["removed"] = stale_entries(out, tmp, OUTPUTS)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            (tmp / "export.json").write_text(json.dumps(res, indent=2))
    return res


def check_drafter(ref_target, ref_drafter, target_gguf: Path, drafter_gguf: Path, tokens: list[int]) -> dict[str, Any]:
    """One draft step after `tokens` in llama.cpp (its own dense head; the target's K/V and h from the exported
    target) vs the reference drafter on the reference target: max |logit diff|, argmax equal, |h_next diff|."""
    import torch

    from mtpkit.model.drafter import target_kv as kv_of
    from mtpkit.runtime.llamacpp_backend import LlamaCppBackend
    with torch.no_grad():
        cache = ref_target.new_cache(len(tokens) + 8)
        o = ref_target(torch.tensor([tokens]), cache)
        tok = int(o.logits[0, -1].argmax())
        x, h_ref = ref_drafter.body(ref_target.embed(torch.tensor([[tok]])), o.hidden[:, -1:],
                                    torch.tensor([cache.length]), kv_of(cache, ref_target.config))
        want = ref_drafter.dense_logits(x[0, 0])
    be = LlamaCppBackend(target_gguf, drafter_gguf, head="dense", max_len=len(tokens) + 16, threads=2)
    try:
        _, h = be.start(tokens)
        s = be.draft_step(be.ops.tokens([tok]), h)
        got, h_next = torch.from_numpy(s.logits), torch.from_numpy(s.h)
    finally:
        be.close()
    return {"max_abs_logit_diff": float((got - want).abs().max()), "argmax_equal": int(got.argmax()) == int(want.argmax()),
            "max_abs_h_diff": float((h_next - h_ref[0, 0].float()).abs().max()),
            "h_scale": float(h_ref.abs().max())}
