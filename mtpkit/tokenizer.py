"""SentencePiece tokenizer for GGUF (``tokenizer.ggml.model == "llama"``) and HF ``tokenizer.model`` checkpoints.

The GGUF vocab (pieces, scores, token types, special ids) becomes a SentencePiece BPE ``ModelProto``
with byte fallback and Gemma's normalizer (identity, no dummy prefix, spaces escaped to U+2581, extra
whitespace kept), so the maintained ``sentencepiece`` library does the work and matches llama.cpp id for
id.  The serialized model is cached at ``<mtpkit cache>/tokenizers/<sha256>.model`` (see ``mtpkit.paths``).  ``Tokenizer.stream()`` gives a ``StreamDecoder`` for printing tokens as they arrive
without emitting broken UTF-8.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import struct
from pathlib import Path

from mtpkit.errors import MtpkitError
from mtpkit.paths import atomic_write

_FORMAT = "mtpkit-spm-v1"  # bump when the proto layout below changes (invalidates the cache)
_SPACE = "\u2581"


def cache_dir() -> Path:
    from mtpkit.paths import cache_dir as root
    return root() / "tokenizers"


def _build_model_proto(tokens, scores, token_types, bos_id, eos_id, unk_id, pad_id, add_space_prefix) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    sp_type = pb.ModelProto.SentencePiece.Type
    # GGUF token_type 1 normal, 2 unknown, 3 control, 4 user_defined, 5 unused, 6 byte: same numbers as the proto
    pieces = []
    for i, (piece, score, tt) in enumerate(zip(tokens, scores, token_types, strict=True)):
        t = int(tt) if 1 <= int(tt) <= 6 else sp_type.NORMAL
        if i == unk_id:
            t = sp_type.UNKNOWN  # SentencePiece needs exactly one UNKNOWN piece (Gemma's GGUF marks it CONTROL)
        elif t == sp_type.UNKNOWN:
            t = sp_type.CONTROL
        if t == sp_type.USER_DEFINED:
            # llama.cpp's converter stores user-defined pieces with real spaces and matches them on raw
            # text; SentencePiece matches them after whitespace escaping, so escape them back.
            piece = piece.replace(" ", _SPACE)
        pieces.append(pb.ModelProto.SentencePiece(piece=piece, score=float(score), type=t))
    m = pb.ModelProto()
    m.pieces.extend(pieces)
    ts = m.trainer_spec
    ts.model_type, ts.vocab_size, ts.byte_fallback = pb.TrainerSpec.BPE, len(tokens), 6 in token_types
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = unk_id, bos_id, eos_id, pad_id
    for name, idx in (("unk", unk_id), ("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
        if 0 <= idx < len(tokens):
            setattr(ts, name + "_piece", tokens[idx])
    m.normalizer_spec.CopyFrom(pb.NormalizerSpec(name="identity", add_dummy_prefix=add_space_prefix,
                                                 remove_extra_whitespaces=False, escape_whitespaces=True))
    return m.SerializeToString()


def _vocab_key(tokens, scores, token_types, ids, add_space_prefix) -> str:
    h = hashlib.sha256(_FORMAT.encode())
    h.update(json.dumps(list(tokens), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    h.update(struct.pack(f"<{len(scores)}f", *scores))
    h.update(struct.pack(f"<{len(token_types)}i", *(int(t) for t in token_types)))
    h.update(json.dumps([list(ids), bool(add_space_prefix)]).encode())
    return h.hexdigest()


class Tokenizer:
    """Text <-> token ids.  Build with ``from_gguf``, ``from_gguf_fields`` or ``from_sentencepiece``."""

    def __init__(self, sp, bos_id: int, eos_id: int, add_bos: bool, pad_id: int = -1, model_path: Path | None = None):
        self.sp = sp  # sentencepiece.SentencePieceProcessor
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.add_bos = bool(add_bos)
        self.model_path = model_path  # the .model file it was loaded from (None if loaded from memory)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @classmethod
    def from_gguf_fields(cls, tokens, scores, token_types, bos_id, eos_id, unk_id, pad_id=-1,
                         add_bos: bool = True, add_space_prefix: bool = False) -> Tokenizer:
        """Build from already-parsed GGUF tokenizer metadata (no GGUF file access)."""
        import sentencepiece as spm

        tokens = list(tokens)
        n = len(tokens)
        scores = [float(s) for s in scores] if scores is not None else [0.0] * n
        token_types = [int(t) for t in token_types] if token_types is not None else [1] * n
        if not (n == len(scores) == len(token_types)) or n == 0:
            raise MtpkitError(f"tokenizer metadata is inconsistent: {n} tokens, {len(scores)} scores, {len(token_types)} types")
        ids = [-1 if v is None else int(v) for v in (bos_id, eos_id, unk_id, pad_id)]
        if not 0 <= ids[2] < n:
            raise MtpkitError(f"tokenizer has no valid unknown-token id (got {unk_id})")
        path = cache_dir() / f"{_vocab_key(tokens, scores, token_types, ids, add_space_prefix)}.model"
        if path.is_file():
            try:
                return cls(spm.SentencePieceProcessor(model_file=str(path)), ids[0], ids[1], add_bos, ids[3], path)
            except Exception:
                pass  # unreadable/corrupt cache entry: rebuild it below
        data = _build_model_proto(tokens, scores, token_types, *ids, bool(add_space_prefix))
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:
            raise MtpkitError(f"cannot build SentencePiece model from tokenizer metadata: {e}") from e
        try:
            atomic_write(path, data)
        except OSError:
            path = None  # read-only cache dir: fine, just slower next time
        return cls(sp, ids[0], ids[1], add_bos, ids[3], path)

    @classmethod
    def from_gguf(cls, path) -> Tokenizer:
        """Read the tokenizer from a GGUF file (``path`` may also be an open ``gguf.GGUFReader``)."""
        if hasattr(path, "fields"):
            reader, path = path, "<GGUFReader>"
        else:
            from gguf import GGUFReader

            if not os.path.isfile(path):
                raise MtpkitError(f"GGUF file not found: {path}")
            try:
                reader = GGUFReader(path)
            except Exception as e:
                raise MtpkitError(f"cannot read GGUF file {path}: {e}") from e
        f = reader.fields

        def get(key, default=None):
            return f[key].contents() if key in f else default

        model = get("tokenizer.ggml.model")
        if model is None or "tokenizer.ggml.tokens" not in f:
            raise MtpkitError(f"GGUF file {path} has no tokenizer metadata (tokenizer.ggml.*)")
        if model != "llama":
            raise MtpkitError(f"unsupported tokenizer.ggml.model {model!r}: only 'llama' (SentencePiece) is supported")
        return cls.from_gguf_fields(
            get("tokenizer.ggml.tokens"), get("tokenizer.ggml.scores"), get("tokenizer.ggml.token_type"),
            bos_id=get("tokenizer.ggml.bos_token_id", 1), eos_id=get("tokenizer.ggml.eos_token_id", 2),
            unk_id=get("tokenizer.ggml.unknown_token_id", 0), pad_id=get("tokenizer.ggml.padding_token_id", -1),
            add_bos=bool(get("tokenizer.ggml.add_bos_token", True)),
            add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)),  # llama.cpp's default
        )

    @classmethod
    def from_sentencepiece(cls, path) -> Tokenizer:
        """Load an HF-layout directory containing ``tokenizer.model`` (or a ``.model`` file itself)."""
        import sentencepiece as spm

        p = Path(path)
        model_file = p / "tokenizer.model" if p.is_dir() else p
        if not model_file.is_file():
            raise MtpkitError(f"no SentencePiece tokenizer.model found at {path}")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as e:
            raise MtpkitError(f"cannot load SentencePiece model {model_file}: {e}") from e
        add_bos = True
        with contextlib.suppress(ValueError, OSError):
            add_bos = bool(json.loads((model_file.parent / "tokenizer_config.json").read_text()).get("add_bos_token", True))
        return cls(sp, sp.bos_id(), sp.eos_id(), add_bos, sp.pad_id(), model_file)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids for ``text``; special-token strings in the text are NOT parsed (plain text)."""
        ids = self.sp.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id >= 0:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids) -> str:
        """Text for ``ids``; control tokens (bos/eos/...) decode to nothing."""
        ids, n = [int(i) for i in ids], self.vocab_size
        if any(not 0 <= i < n for i in ids):
            raise MtpkitError(f"token id {next(i for i in ids if not 0 <= i < n)} out of range for vocab of size {n}")
        return self.sp.decode(ids)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenizer: ``push(ids)`` returns only complete new text, ``flush()`` the rest.

    Decodes a sliding window (the previously emitted chunk plus the new ids) and emits the part
    past the old chunk, so cost stays O(window) per step; text ending in U+FFFD (an incomplete
    byte-fallback sequence) is held back until more ids arrive or ``flush()`` is called.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids = tokenizer, []
        self._prefix = self._read = 0  # window start re-decoded for context / ids before _read are emitted

    def push(self, ids) -> str:
        """Add one id or an iterable of ids; return the newly completed text (maybe "")."""
        try:
            self.ids.append(operator.index(ids))
        except TypeError:
            self.ids.extend(int(i) for i in ids)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        old = self.tok.decode(self.ids[self._prefix:self._read])
        new = self.tok.decode(self.ids[self._prefix:])
        if len(new) <= len(old) or (new.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return new[len(old):]
