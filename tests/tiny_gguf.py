"""Write a tiny gemma3 GGUF (F32 tensors + SentencePiece vocab) from a tiny reference model, for import tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtpkit.model.gemma import GemmaModel
from mtpkit.model.load import canonical_to_gguf

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


def tiny_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """n >= 262 pieces: 4 controls, 256 bytes, then single letters as normal pieces."""
    tokens = SPECIAL + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2] + [6] * 256
    letters = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("a") + n - len(tokens) - 1)]
    tokens += letters
    types += [1] * len(letters)
    scores = [0.0] * 260 + [-float(i) for i in range(len(letters))]
    assert len(tokens) == n
    return tokens, scores, types


def write_gguf(model: GemmaModel, path: Path, *, block_count: int | None = None) -> Path:
    import gguf
    c = model.config
    w = gguf.GGUFWriter(str(path), arch="gemma3")
    w.add_name("tiny gemma3")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(block_count or c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_sliding_window(c.sliding_window)
    w.add_key_value("gemma3.rope.freq_base_swa", c.rope_local_base_freq, gguf.GGUFValueType.FLOAT32)
    pattern = [t == "sliding_attention" for t in c.layer_types]
    pattern += [True] * ((block_count or c.num_hidden_layers) - len(pattern))
    w.add_key_value("gemma3.attention.sliding_window_pattern", pattern,
                    gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)
    if c.final_logit_softcapping:
        w.add_key_value("gemma3.final_logit_softcapping", c.final_logit_softcapping, gguf.GGUFValueType.FLOAT32)
    tokens, scores, types = tiny_vocab(c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_unk_token_id(3)
    w.add_pad_token_id(c.pad_token_id)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    for name, t in model.state_dict().items():
        gname, plus_one = canonical_to_gguf(name)
        a = t.detach().float().numpy()
        w.add_tensor(gname, (a + 1.0 if plus_one else a).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
