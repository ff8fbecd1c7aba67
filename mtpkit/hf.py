"""Hugging Face transformers on our canonical weights: the parity oracle in tests and a baseline in benches.

transformers is optional: it is imported inside these functions (the `dev` extra installs it)."""

from __future__ import annotations

import torch

from mtpkit.model.config import FULL, SLIDING, GemmaConfig


def hf_config(c: GemmaConfig):
    import transformers
    rope = {FULL: {"rope_type": "default", "rope_theta": c.rope_theta},
            SLIDING: {"rope_type": "default", "rope_theta": c.rope_local_base_freq}}
    if c.rope_scaling_factor != 1.0:
        rope[FULL] = {"rope_type": "linear", "factor": c.rope_scaling_factor, "rope_theta": c.rope_theta}
    return transformers.Gemma3TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        query_pre_attn_scalar=int(c.query_pre_attn_scalar), sliding_window=c.sliding_window,
        layer_types=list(c.layer_types), rope_parameters=rope,
        final_logit_softcapping=c.final_logit_softcapping, attn_logit_softcapping=None,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)


def hf_model(config: GemmaConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", attn: str = "eager"):
    """transformers' Gemma3ForCausalLM holding `state` (our canonical keys)."""
    import transformers
    cfg = hf_config(config)
    cfg._attn_implementation = attn
    model = transformers.Gemma3ForCausalLM(cfg)
    sd = {f"model.{k}": v for k, v in state.items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any("rotary" not in m and "inv_freq" not in m for m in missing):
        raise RuntimeError(f"transformers state mismatch: missing {missing}, unexpected {unexpected}")
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def hf_logits(config: GemmaConfig, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, T, V] of transformers' Gemma3ForCausalLM with `state` (our canonical keys)."""
    model = hf_model(config, {k: v.float() for k, v in state.items()})
    return model(input_ids=tokens, use_cache=False).logits.float()
