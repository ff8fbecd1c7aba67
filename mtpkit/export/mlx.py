"""Export target and drafter for MLX (`mtpkit export --format mlx`).

    DIR/target/   config.json (model_type gemma3_text) + model.safetensors (+ MLX quantization) + tokenizer.model
                  + tokenizer_config.json: `mlx_lm.load(DIR/target)` loads it
    DIR/drafter/  mtpkit's drafter format (config.json + safetensors), read by mtpkit's MLX drafter port

The target tensors are our canonical ones under mlx-lm's names (`model.` + canonical key; the head is tied,
so there is no `lm_head.weight`). mlx-lm's gemma3_text expresses one layer pattern (every p-th layer full,
the rest sliding) and no final logit softcap; a target outside that is refused before anything is written.

--quant: none (default) = every tensor in --dtype (default bfloat16); int8 / int4 = mlx's affine 8- / 4-bit
weights in groups of 64 (`nn.quantize`: every Linear and the embedding, which is also the tied head), norms and
scales in --dtype. Before anything lands in DIR the target is loaded back with mlx-lm and its logits are compared
with the float32 reference (`TOLERANCE`). Imports without torch: the MLX backend uses `load_target`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from mtpkit.errors import MtpkitError
from mtpkit.export import COMMON_QUANTS, check_quant, no_options, staged, stale_entries
from mtpkit.export.parity import compare_logits, probe_tokens, reference_logits
from mtpkit.model.config import FULL, GemmaConfig
from mtpkit.paths import atomic_dir
from mtpkit.progress import steps as progress_steps

QUANTS = COMMON_QUANTS  # none | int8 | int4 (module docstring)
QUANT_BITS = {"int8": 8, "int4": 4}
DTYPES = ("float32", "bfloat16", "float16")


def layer_pattern(c: GemmaConfig) -> int:
    """mlx-lm's sliding_window_pattern p for our layer types (layer i is full iff (i + 1) % p == 0)."""
    fulls = [i for i, t in enumerate(c.layer_types) if t == FULL]
    if not fulls:
        raise MtpkitError("mlx export: the target has no full-attention layer")
    p = fulls[0] + 1
    want = [FULL if (i + 1) % p == 0 else "sliding_attention" for i in range(c.num_hidden_layers)]
    if list(c.layer_types) != want:
        raise MtpkitError(f"mlx export: mlx-lm's gemma3_text needs every {p}-th layer full and the rest sliding; "
                          f"this target's layers are {list(c.layer_types)}")
    return p


QUANT_GROUP = 64


def mlx_config(c: GemmaConfig, quant: str | None = None) -> dict[str, Any]:
    """mlx-lm's config.json for our target config; refuses what mlx-lm's gemma3_text (or --quant) cannot express."""
    quant = check_quant("mlx", quant, QUANTS)
    if quant != "none":
        dims = {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                "heads x head_dim": c.num_attention_heads * c.head_dim}
        bad = {k: v for k, v in dims.items() if v % QUANT_GROUP}
        if bad:
            raise MtpkitError(f"MLX {quant} quantization uses groups of {QUANT_GROUP}: {bad} is not a multiple")
    if c.final_logit_softcapping:
        raise MtpkitError("mlx export: mlx-lm's gemma3_text has no final logit softcapping; this target uses "
                          f"{c.final_logit_softcapping}")
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "vocab_size": c.vocab_size, "rope_theta": c.rope_theta, "rope_local_base_freq": c.rope_local_base_freq,
        # transformers (which mlx_lm.load asks for the tokenizer) validates this field as an int
        "query_pre_attn_scalar": int(c.query_pre_attn_scalar) if float(c.query_pre_attn_scalar).is_integer()
        else c.query_pre_attn_scalar, "sliding_window": c.sliding_window,
        "sliding_window_pattern": layer_pattern(c), "max_position_embeddings": c.max_position_embeddings,
        "rope_scaling": None if c.rope_scaling_factor == 1.0 else {"rope_type": "linear", "factor": c.rope_scaling_factor},
        "tie_word_embeddings": True, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        # mtpkit's own copy of the reference config, so the MLX backend needs no guessing
        "mtpkit_target_config": c.to_dict(),
    }


def write_target(model, tokenizer, out: Path, dtype: str = "bfloat16", quant: str | None = None) -> None:
    """model: our GemmaModel; tokenizer: mtpkit Tokenizer (its SentencePiece model is copied); quant: QUANTS."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    check_dtype(dtype)
    cfg = mlx_config(model.config, quant)
    bits = QUANT_BITS.get(quant or "none")
    mdt = getattr(mx, dtype)
    tensors = {f"model.{k}": mx.array(v.detach().float().cpu().numpy()).astype(mdt)
               for k, v in model.state_dict().items() if "inv_freq" not in k}
    with atomic_dir(out) as tmp:
        if bits is not None:
            from mlx_lm.utils import _get_classes
            cls, args_cls = _get_classes(cfg)
            m = cls(args_cls.from_dict(cfg))
            m.load_weights(list(m.sanitize(dict(tensors)).items()))
            nn.quantize(m, group_size=QUANT_GROUP, bits=bits)
            tensors = dict(tree_flatten(m.parameters()))
            cfg["quantization"] = {"group_size": QUANT_GROUP, "bits": bits}
        try:
            mx.save_safetensors(str(tmp / "model.safetensors"), tensors, metadata={"format": "mlx"})
        except RuntimeError as e:  # MLX's writer reports a file it cannot write so: an OSError for the export's line
            raise OSError(None, str(e).split(" /")[0], str(out / "model.safetensors")) from None
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            if getattr(tokenizer, "model_path", None) is None:
                raise MtpkitError("mlx export: the target's tokenizer has no SentencePiece model file")
            shutil.copyfile(tokenizer.model_path, tmp / "tokenizer.model")
            (tmp / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))


def load_target(path: str | os.PathLike):
    """mlx-lm's model for an exported target dir -> (model, mtpkit GemmaConfig, tokenizer or None)."""
    from mlx_lm.utils import load_model

    from mtpkit.tokenizer import Tokenizer
    p = Path(path)
    if not (p / "config.json").is_file():
        raise MtpkitError(f"{p} is not an MLX target directory (no config.json; make one with mtpkit export --format mlx)")
    cfg = json.loads((p / "config.json").read_text())
    if cfg.get("model_type") != "gemma3_text" or "mtpkit_target_config" not in cfg:
        raise MtpkitError(f"{p}: not a gemma3_text target written by mtpkit export")
    model, _ = load_model(p)
    tok = Tokenizer.from_sentencepiece(p / "tokenizer.model") if (p / "tokenizer.model").is_file() else None
    return model, GemmaConfig.from_dict(cfg["mtpkit_target_config"]), tok


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise MtpkitError(f"--dtype {dtype!r}: --format mlx accepts {', '.join(DTYPES)}")


def check_target(ref, path: Path, tokens: list[int], tolerance: float, what: str = "exported MLX target") -> dict[str, float]:
    """The exported MLX target vs the float32 reference `ref` on `tokens` (parity.compare_logits: raises beyond
    `tolerance`).

    Not bit-exact even in float32: mlx-lm's gemma3_text scales the embedding by sqrt(d) rounded to bfloat16
    (25.25 instead of 25.298 for d = 640), as Gemma's reference code does in bfloat16."""
    import mlx.core as mx
    import numpy as np
    model, _, _ = load_target(path)
    got = np.array(model(mx.array([tokens])).astype(mx.float32))[0]
    return compare_logits(reference_logits(ref, tokens), got, tolerance, MIN_ARGMAX, what)


# max |logit diff| of the exported target in mlx-lm vs the float32 reference: by --dtype for --quant none, by --quant
# otherwise. Measured (probe_tokens, 22 tokens; mlx[cpu] 0.32 on a Linux x86 CPU) on the real Gemma 3 270M, whose
# logits reach 35: float32 0.047 (the bf16-rounded sqrt(d), see check_target), bfloat16 0.77, int8 in float32 0.84,
# all argmax 100 %; refused there: float16 15.7 (argmax 86 %), int8 in bfloat16 5.8 (77 %: MLX's CPU quantized
# matmul sums in bfloat16, 9 % relative error at 2048 inputs vs 0.3 % dense), int4 15.0 / 17.0 in float32 /
# bfloat16 (68 / 73 %; 14.7 and 82 % even with the tied head at 8 bits: Q4_K weights re-quantized to 4 bits).
# On the tiny test targets (|logit| < 1): float32 1e-6, float16 0.002, bfloat16 0.03, int8 0.05, int4 0.37.
TOLERANCE = {"float32": 0.2, "bfloat16": 2.5, "float16": 1.0, "int8": 2.5, "int4": 6.0}
MIN_ARGMAX = 0.8


def tolerance(dtype: str, quant: str) -> float:
    return TOLERANCE[dtype if quant == "none" else quant]


def export(target: str, drafter: str | None, out: Path, *, quant: str | None = None, dtype: str | None = None,
           **format_options) -> dict[str, Any]:
    """Write OUT/target (mlx-lm's gemma3_text) and OUT/drafter (mtpkit's drafter format in --dtype), and
    OUT/export.json; nothing lands in OUT unless the target loaded back in mlx-lm is within tolerance of the
    reference. Without a drafter a stale OUT/drafter is removed (the backend would pick it up as the sibling; the
    result's `removed` says so)."""
    no_options("mlx", format_options)
    quant = check_quant("mlx", quant, QUANTS)  # every refusal of the arguments before the (slow) target load
    dtype = dtype or "bfloat16"
    check_dtype(dtype)
    from mtpkit.api import resolve_drafter
    t0 = time.perf_counter()
    dpath = resolve_drafter(target, drafter)
    with progress_steps("export mlx", 4 + (dpath is not None)) as say:
        say("importing torch, mlx and mlx-lm")
        from mtpkit.runtime.mlx_blas import use_openblas
        use_openblas()  # Linux: MLX's float32 matmuls through OpenBLAS (the check runs the model)
        try:
            import mlx.core  # noqa: F401
            import mlx_lm  # noqa: F401
        except ImportError:
            raise MtpkitError("--format mlx needs mlx and mlx-lm (pip install -e '.[mlx]')") from None
        import torch

        from mtpkit.model.load import load_drafter, save_drafter
        from mtpkit.model.load import load_target as load_reference
        say(f"loading the target {target}" + (f" and the drafter {dpath}" if dpath is not None else ""))
        t = load_reference(target)
        mlx_config(t.config, quant)  # refuse what mlx-lm cannot express before writing anything
        d = load_drafter(dpath, t.config) if dpath is not None else None
        out = Path(out)
        probe = probe_tokens(t.tokenizer)
        names = ("target", "drafter", "export.json")
        with staged(out, names) as tmp:
            q = "" if quant == "none" else f", {quant}"
            say(f"writing target ({dtype}{q})")
            write_target(t.model, t.tokenizer, tmp / "target", dtype=dtype, quant=quant)
            say("checking target in mlx-lm against the reference")
            try:
                check = check_target(t.model, tmp / "target", probe, tolerance(dtype, quant),
                                     what=f"exported MLX target ({dtype}, --quant {quant})")
            except MtpkitError as e:
                if quant != "int8" or dtype == "float32":
                    raise
                raise MtpkitError(f"{e} (MLX's CPU quantized matmul sums in {dtype}: try --dtype float32)") from None
            if d is not None:
                say(f"writing drafter ({dtype})")
                save_drafter(d, tmp / "drafter", dtype=getattr(torch, dtype))
            res = {"format": "mlx", "out": str(out), "target": str(out / "target"),
                   "drafter": str(out / "drafter") if d is not None else None, "dtype": dtype, "quant": quant,
                   "vs_reference": check, "probe_tokens": len(probe),
                   "wrote": [f"{out}/target ({dtype}{q})"] + ([f"{out}/drafter ({dtype})"] if d is not None else []),
                   "removed": stale_entries(out, tmp, names), "seconds": round(time.perf_counter() - t0, 1)}
            (tmp / "export.json").write_text(json.dumps(res, indent=2))
    return res
