"""Distillation prompts: the corpus (Python's standard library by default, or the user's jsonl/txt) cut
into token windows, with evaluation prompts (HumanEval, MT-Bench) filtered out.

- Default corpus: every `.py` under `sysconfig.get_paths()['stdlib']` (sources and docstrings), skipping
  site-packages, test directories and the codec tables in `encodings/`.
- `.jsonl`: records with `prompt` (used whole; its tail becomes the prompt) and/or `text` (a document).
- any other file (`.txt`): one document.

Sequence i of the data set gets its prompt from `PromptSource(i)`: a document window (random line start,
ending at a line end, last `prompt_len - 1` tokens) or prompt record i, chosen by a RNG seeded with
(seed, i), so any shard can be rebuilt alone. Windows or prompts that share an 8-word shingle with an
evaluation prompt are skipped (counted in `excluded`). Every 16th document / prompt is held out: the
held-out sequences come from texts the training sequences never see.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtpkit.errors import MtpkitError
from mtpkit.suites import EvalFilter, jsonl_records

# tests, installed packages, and codec tables (`encodings/`: megabytes of hex mappings, not code or prose)
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}
HELDOUT_EVERY = 16


@dataclass
class Corpus:
    documents: list[str]  # sampled as windows
    prompts: list[str]  # used whole (their tail)
    identity: dict[str, Any] = field(default_factory=dict)  # what the data cache key records


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("test"))
        out += [Path(d) / f for f in sorted(files) if f.endswith(".py") and not f.startswith("test_")]
    return out


def load_corpus(path: str | None) -> Corpus:
    """None -> the standard library; else a .jsonl (prompt/text records) or a text file."""
    if path is None:
        docs = []
        for f in stdlib_files():
            try:
                docs.append(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise MtpkitError(f"no Python sources found under {sysconfig.get_paths()['stdlib']}")
        return Corpus(docs, [], {"kind": "stdlib", "python": sys.version.split()[0], "files": len(docs)})
    p = Path(path).expanduser()
    if not p.is_file():
        raise MtpkitError(f"corpus {path!r} is not a file")
    try:
        raw = p.read_bytes()
        text = raw.decode("utf-8")
    except OSError as e:
        raise MtpkitError(f"cannot read corpus {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise MtpkitError(f"corpus {p} is not UTF-8 text") from None
    ident = {"kind": "file", "name": p.name, "sha256": hashlib.sha256(raw).hexdigest()}
    docs, prompts = [], []
    if p.suffix == ".jsonl":
        for i, r in jsonl_records(text.splitlines(), p):
            if isinstance(r, dict) and isinstance(r.get("prompt"), str):
                prompts.append(r["prompt"])
            elif isinstance(r, dict) and isinstance(r.get("text"), str):
                docs.append(r["text"])
            else:
                raise MtpkitError(f"{p}:{i}: expected an object with a 'prompt' or 'text' string")
    else:
        docs = [text]
    docs, prompts = [d for d in docs if d.strip()], [q for q in prompts if q.strip()]
    if not docs and not prompts:
        raise MtpkitError(f"corpus {p} is empty")
    return Corpus(docs, prompts, ident)


def _split(items: list[str], heldout: bool) -> list[str]:
    if len(items) < 2:
        return items
    return [x for j, x in enumerate(items) if (j % HELDOUT_EVERY == 0) == heldout]


class PromptSource:
    """Sequence index -> (prompt token ids without BOS; sampled?): a document window of prompt_len - 1 tokens,
    or the tail of a prompt record, at most max_prompt_len - 1 tokens (default prompt_len - 1)."""

    def __init__(self, corpus: Corpus, tokenizer, *, prompt_len: int, seed: int, sampled_fraction: float,
                 heldout: bool, eval_filter: EvalFilter | None, max_prompt_len: int | None = None):
        self.tok, self.n_tokens = tokenizer, prompt_len - 1
        self.n_prompt = (max_prompt_len or prompt_len) - 1
        self.seed, self.frac, self.filter = seed, sampled_fraction, eval_filter
        self.documents = _split(corpus.documents, heldout)
        prompts = _split(corpus.prompts, heldout)
        self.prompts = [q for q in prompts if eval_filter is None or not eval_filter(q)]
        self.excluded = len(prompts) - len(self.prompts)
        if not self.documents and not self.prompts:
            raise MtpkitError(f"all {len(prompts)} corpus prompts overlap evaluation prompts (HumanEval/MT-Bench)")
        self._cum = []
        total = 0
        for d in self.documents:
            total += len(d)
            self._cum.append(total)
        self._chars = 8 * prompt_len  # ~3-4 characters per token: enough text for a full window

    def __call__(self, i: int) -> tuple[list[int], bool]:
        rng = random.Random(f"{self.seed}:{i}")
        use_prompt = bool(self.prompts) and (not self.documents or i % 2 == 0)
        if use_prompt:
            j = i // 2 if self.documents else i
            ids = self.tok.encode(self.prompts[j % len(self.prompts)], add_bos=False)[-self.n_prompt:]
            # a repeated prompt gets a sampled continuation: a second greedy one would be a duplicate
            return ids, j >= len(self.prompts) or rng.random() < self.frac
        return self._window(rng), rng.random() < self.frac

    def _window(self, rng: random.Random) -> list[int]:
        best: list[int] = []
        for _ in range(64):
            doc = self.documents[bisect.bisect_right(self._cum, rng.random() * self._cum[-1])]
            start = doc.rfind("\n", 0, rng.randrange(len(doc))) + 1  # a line start
            text = doc[start:start + self._chars]
            cut = text.rfind("\n")
            if cut > 0 and start + self._chars < len(doc):
                text = text[:cut + 1]  # end at a line end: the continuation starts a new line
            if self.filter is not None and self.filter(text):
                self.excluded += 1
                continue
            ids = self.tok.encode(text, add_bos=False)[-self.n_tokens:]
            if len(ids) == self.n_tokens:
                return ids
            best = max(best, ids, key=len)  # short documents: keep the longest window seen
        if not best:
            raise MtpkitError("no corpus window without overlap with the evaluation prompts could be found")
        return best
