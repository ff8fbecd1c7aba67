"""Export target and drafter for MLX (`mtpkit export --format mlx`).

    DIR/target/   config.json (model_type gemma3_text) + model.safetensors (+ MLX quantization) + tokenizer.model
                  + tokenizer_config.json: `mlx_lm.load(DIR/target)` loads it
    DIR/drafter/  mtpkit's drafter format (config.json + safetensors), read by mtpkit's MLX drafter port

The target tensors are our canonical ones under mlx-lm's names (`model.` + canonical key; the head is tied,
so there is no `lm_head.weight`). mlx-lm's gemma3_text expresses one layer pattern (every p-th layer full,
the rest sliding) and no final logit softcap; a target outside that is refused before anything is written.
After writing, the target is loaded back with mlx-lm and its logits are compared with the reference.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mtpkit.errors import MtpkitError
from mtpkit.model.config import FULL, GemmaConfig
from mtpkit.paths import atomic_dir

QUANT_BITS = (4, 8)


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


def mlx_config(c: GemmaConfig, quant: int | None = None) -> dict[str, Any]:
    if quant is not None:
        if quant not in QUANT_BITS:
            raise MtpkitError(f"--quant must be one of {QUANT_BITS} for MLX, got {quant}")
        dims = {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                "heads x head_dim": c.num_attention_heads * c.head_dim}
        bad = {k: v for k, v in dims.items() if v % QUANT_GROUP}
        if bad:
            raise MtpkitError(f"MLX {quant}-bit quantization uses groups of {QUANT_GROUP}: {bad} is not a multiple")
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


def write_target(model, tokenizer, out: Path, dtype: str = "bfloat16", quant: int | None = None) -> None:
    """model: our GemmaModel; tokenizer: mtpkit Tokenizer (its SentencePiece model is copied)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    if dtype not in ("float32", "bfloat16", "float16"):
        raise MtpkitError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    cfg = mlx_config(model.config, quant)
    mdt = getattr(mx, dtype)
    tensors = {f"model.{k}": mx.array(v.detach().float().cpu().numpy()).astype(mdt)
               for k, v in model.state_dict().items() if "inv_freq" not in k}
    with atomic_dir(out) as tmp:
        if quant is not None:
            from mlx_lm.utils import _get_classes
            cls, args_cls = _get_classes(cfg)
            m = cls(args_cls.from_dict(cfg))
            m.load_weights(list(m.sanitize(dict(tensors)).items()))
            nn.quantize(m, group_size=QUANT_GROUP, bits=quant)
            tensors = dict(tree_flatten(m.parameters()))
            cfg["quantization"] = {"group_size": QUANT_GROUP, "bits": quant}
        mx.save_safetensors(str(tmp / "model.safetensors"), tensors, metadata={"format": "mlx"})
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


def check_target(ref, path: Path, tokens: list[int]) -> dict[str, float]:
    """The exported MLX target vs the reference (float32) on `tokens`: max |logit diff| and argmax agreement.

    Not bit-exact even in float32: mlx-lm's gemma3_text scales the embedding by sqrt(d) rounded to bfloat16
    (25.25 instead of 25.298 for d = 640), as Gemma's reference code does in bfloat16."""
    import mlx.core as mx
    import numpy as np
    model, _, _ = load_target(path)
    with torch.no_grad():
        want = ref.float()(torch.tensor([tokens])).logits[0].numpy()
    got = np.array(model(mx.array([tokens])).astype(mx.float32))[0]
    return {"max_abs_logit_diff": float(np.abs(got - want).max()),
            "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}
