"""The shipped `everyday` suite: loads by name, 6 categories x 8 prompts, sources from the evaluation split
only, long contexts long, and EvalFilter (the distillation-data filter) covers it."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from mtpkit.errors import MtpkitError
from mtpkit.suites import EVERYDAY_FILE, SUITES, EvalFilter, load_suite

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = {"translation", "summarization", "qa", "math", "extraction", "chat"}
TEXT_PREFIXES = ("mo:", "doc:", "info:", "man:", "dpkg:")


def _everyday_sources():
    spec = importlib.util.spec_from_file_location("everyday_sources", ROOT / "devices" / "gpu" / "everyday_sources.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _records() -> list[dict]:
    return [json.loads(ln) for ln in EVERYDAY_FILE.read_text(encoding="utf-8").splitlines() if ln.strip()]


def test_loads_by_name_six_categories_of_eight():
    prompts = load_suite("everyday")
    assert len(prompts) == 48
    assert Counter(p.category for p in prompts) == {c: 8 for c in CATEGORIES}
    assert len({p.id for p in prompts}) == 48
    assert all(p.id == f"everyday/{p.category}/{p.id.rsplit('/', 1)[1]}" for p in prompts)
    assert all(p.text.strip() and len(p.turns) == 1 for p in prompts)
    assert len(load_suite("everyday", limit=5)) == 5
    assert "everyday" in SUITES


def test_sources_are_evaluation_split_only():
    es = _everyday_sources()
    records = _records()
    assert all(set(r) == {"id", "category", "prompt", "source"} for r in records)
    for r in records:
        keys = r["source"].split("/", 1)[0].split(",")
        if r["category"] == "math":  # generated from the build script's own templates, no machine text
            assert r["source"].startswith("template:math/"), r["source"]
            continue
        assert all(k.startswith(TEXT_PREFIXES) for k in keys), r["source"]
        assert all(es.is_eval(k) for k in keys), r["source"]


def test_long_categories_are_long():
    for p in load_suite("everyday"):
        if p.category in ("summarization", "qa"):
            assert 4_000 <= len(p.text) <= 12_000, (p.id, len(p.text))


def test_eval_filter_covers_everyday():
    filt = EvalFilter.for_suites(("everyday",))
    prompts = {p.category: p.text for p in load_suite("everyday")}
    for cat in ("summarization", "qa", "translation"):
        words = prompts[cat].split()
        mid = len(words) // 2
        snippet = "Some training text. " + " ".join(words[mid:mid + 12]).upper() + " and more."
        assert filt(snippet), cat
    assert not filt("A sentence about nothing in particular that no prompt of the suite contains, surely.")


def test_unknown_suite_names_everyday():
    with pytest.raises(MtpkitError, match="everyday"):
        load_suite("no-such-suite")
