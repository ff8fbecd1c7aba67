"""Build the distillation corpus (.jsonl) of drafter v3: v2's mix (code, prose, instructions) plus the everyday
workload a small model gets -- translation, summarization and QA over long documents, math word problems,
extraction -- from text on this machine only, never from a source held out for the everyday suite.

  python devices/gpu/build_corpus_v3.py corpus_v3.jsonl

Sources are named and split by `everyday_sources.is_eval` (about 1 in 8 gettext domains, doc packages, info
manuals, man pages and dpkg packages is kept for mtpkit/suites_data/everyday.jsonl and never read here); on top,
mtpkit's 8-word-shingle filter against HumanEval, MT-Bench and the everyday suite drops overlapping prompts here
and overlapping windows again at training time. Records (mtpkit.distill.corpus format):
  {"text": ...}    documents, sampled as prompt_len-token windows (char-weighted)
  {"prompt": ...}  prompts used whole (up to max_prompt_len tokens): long ones carry 1-3k-token documents
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_corpus as v2  # noqa: E402  (v2's generators: code, stubs, instruction templates)
import everyday_sources as src  # noqa: E402

from mtpkit.distill.corpus import stdlib_files  # noqa: E402
from mtpkit.suites import EvalFilter  # noqa: E402

rng = v2.rng
rng.seed(3003)
FILT = EvalFilter.for_suites()  # humaneval + mtbench + everyday

N_TRANSLATION = 3600
N_LONG = 2400  # summarization + QA over 1-3k-token documents
N_MATH = 1400
N_EXTRACT = 900
N_CHAT = 3200  # v2's instruction prompts (writing, email, role-play, explanations, reasoning, commands, packages)
N_STUBS = 2000
CODE_CHARS, PROSE_CHARS = 5_000_000, 7_000_000
CHARS_PER_TOKEN = 3.8


# ---------------------------------------------------------------- translation
TRANSLATE = [
    "Translate into {tgt}:\n\n{text}\n",
    "Please translate this {src} text to {tgt}.\n\n{text}\n",
    "{src} to {tgt}:\n{text}\n",
    "How would you say the following in {tgt}?\n\"{text}\"\n",
    "Translate from {src} into {tgt}, keeping the meaning and tone:\n{text}\n\nTranslation:",
    "I received this message in {src}. What does it say in {tgt}?\n\n{text}\n",
    "Give the {tgt} version of this {src} software text:\n{text}\n",
    "Translate:\n{text}\n({src} -> {tgt})\n",
    "{text}\n\nTranslate the text above into {tgt}.",
    "Can you help me translate this to {tgt}? It is {src}.\n{text}\n",
]


def translation_prompts() -> list[str]:
    cats = {d: langs for d, langs in src.catalogs().items() if not src.is_eval(f"mo:{d}")}
    pairs = {}
    for d, langs in sorted(cats.items()):
        for lang, path in sorted(langs.items()):
            ps = src.sentence_pairs(path)
            if len(ps) >= 3:
                pairs[(d, lang)] = ps
    keys = sorted(pairs)
    out = []
    for _ in range(N_TRANSLATION * 2):
        d, lang = rng.choice(keys)
        ps = pairs[(d, lang)]
        n = rng.randint(1, 6)
        i = rng.randrange(max(1, len(ps) - n))
        chunk = ps[i:i + n]
        to_english = rng.random() < 0.5
        text = "\n".join(t if to_english else e for e, t in chunk)
        name = src.LANGUAGES[lang]
        s, t = (name, "English") if to_english else ("English", name)
        out.append(rng.choice(TRANSLATE).format(src=s, tgt=t, text=text))
    out = [q for q in dict.fromkeys(out) if not FILT(q)]
    rng.shuffle(out)
    print(f"translation: {len(keys)} catalogs (domain x language), {len(out)} prompts", file=sys.stderr)
    return out[:N_TRANSLATION]


# ---------------------------------------------------------------- long documents: summarization and QA
def long_documents() -> list[tuple[str, str]]:
    """(source key, text) of training-split documents with at least ~1k tokens of prose."""
    out = []
    for key, nodes in src.info_nodes().items():
        if src.is_eval(key):
            continue
        buf = ""
        for node in nodes:  # consecutive nodes of one manual, cut into ~1-3k-token documents
            buf += node + "\n"
            if len(buf) > rng.randint(4000, 11000):
                out.append((key, buf))
                buf = ""
    for key, files in src.doc_files().items():
        if src.is_eval(key):
            continue
        for f in files:
            t = src.read_text(f)
            if len(t) >= 4000 and sum(c.isalpha() for c in t[:4000]) > 0.6 * 4000:
                out.append((key, t))
    pages = [p for p in sorted(Path("/usr/share/man/man1").glob("*.gz")) if not src.is_eval(f"man:{p.name.split('.')[0]}")]
    rng.shuffle(pages)
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"}
    n_man = 0
    for p in pages[:900]:
        try:
            r = subprocess.run(["man", "-l", str(p)], capture_output=True, text=True, env=env, timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            continue
        t = v2.clean(re.sub(r".\x08", "", r.stdout))
        if len(t) >= 4000:
            out.append((f"man:{p.name.split('.')[0]}", t))
            n_man += 1
    print(f"long documents: {len(out)} ({n_man} man pages)", file=sys.stderr)
    return out


def _cut(text: str, lo: int, hi: int) -> str:
    """A paragraph-aligned piece of `text` of about lo..hi characters."""
    n = rng.randint(lo, hi)
    if len(text) <= n:
        return text.strip()
    start = text.rfind("\n\n", 0, rng.randrange(max(1, len(text) - n))) + 1
    piece = text[start:start + n]
    end = piece.rfind("\n\n")
    return (piece[:end] if end > lo // 2 else piece).strip()


SUMMARY = [
    "{doc}\n\nSummarize the text above.",
    "Write a short summary of the following document.\n\n{doc}\n",
    "{doc}\n\nTL;DR:",
    "Here is a section of a manual:\n\n{doc}\n\nGive me the key points as a bulleted list.",
    "Read this and explain in three sentences what it is about.\n\n{doc}\n",
    "{doc}\n\nIn plain words, what does this document describe?",
    "Document:\n{doc}\n\nSummary:",
    "Condense the following into one paragraph for a busy reader:\n\n{doc}\n",
]
QA = [
    "{doc}\n\nQuestion: {q}\nAnswer:",
    "Use the text below to answer the question.\n\n{doc}\n\nQuestion: {q}",
    "Context:\n{doc}\n\nBased only on the context, {ql}",
    "{doc}\n\n{q}",
    "I am reading this documentation:\n\n{doc}\n\n{q} Please answer briefly.",
]


def _question(doc: str) -> str:
    opts = re.findall(r"(?m)^\s*(--?[a-zA-Z][\w-]+)", doc)
    heads = [h.strip() for h in re.findall(r"(?m)^([A-Z][A-Za-z0-9 ,'-]{3,50})\n[-=*]{3,}", doc)]
    terms = re.findall(r"`([^`\n]{3,30})'", doc) + re.findall(r"'([a-z][\w.-]{2,25})'", doc)
    choices = []
    if opts:
        o = rng.choice(opts)
        choices += [f"What does the {o} option do?", f"When should I use {o}?"]
    if heads:
        h = rng.choice(heads)
        choices += [f"What does the section \"{h}\" explain?", f"Summarize what the text says about {h.lower()}."]
    if terms:
        t = rng.choice(terms)
        choices += [f"What is {t} according to the text?", f"How is {t} used?"]
    choices += ["What is the main purpose of the tool described here?", "What are the most important points for a new user?",
                "Which limitations or caveats does the text mention?", "Give an example of how to use what is described."]
    return rng.choice(choices)


def long_prompts(docs: list[tuple[str, str]]) -> list[str]:
    out = []
    for _ in range(N_LONG * 2):
        _key, text = rng.choice(docs)
        doc = _cut(text, 4000, 11000)
        if len(doc) < 3800:
            continue
        if rng.random() < 0.5:
            out.append(rng.choice(SUMMARY).format(doc=doc))
        else:
            q = _question(doc)
            out.append(rng.choice(QA).format(doc=doc, q=q, ql=q[0].lower() + q[1:]))
    out = [q for q in dict.fromkeys(out) if not FILT(q)]
    rng.shuffle(out)
    toks = sorted(len(q) / CHARS_PER_TOKEN for q in out)
    print(f"long prompts: {len(out)}, ~tokens p10/p50/p90 {toks[len(toks) // 10]:.0f}/{toks[len(toks) // 2]:.0f}/"
          f"{toks[9 * len(toks) // 10]:.0f}", file=sys.stderr)
    return out[:N_LONG]


# ---------------------------------------------------------------- math word problems (our own templates)
FOODS = ["pizzas", "sandwiches", "cupcakes", "bags of rice", "boxes of tea", "jars of honey", "loaves of bread"]
JOBS = ["paints fences", "walks dogs", "tutors students", "delivers newspapers", "mows lawns", "bakes cakes"]


def math_prompt() -> str:
    n1, n2 = rng.sample(v2.NAMES, 2)
    a, b, c, d = rng.randint(3, 90), rng.randint(2, 40), rng.randint(2, 15), rng.randint(5, 60)
    f = rng.choice(FOODS)
    q = rng.choice([
        f"{n1} earns ${c} per hour and works {b} hours a week. After spending ${d} on groceries and ${c * 2} on transport, how much is left each week?",
        f"A recipe needs {c} eggs for {b} cookies. How many eggs are needed for {b * a} cookies?",
        f"A jacket costs ${a * 4}. It is on sale for {rng.choice([10, 15, 20, 25, 30])}% off. What is the sale price?",
        f"{n1} {rng.choice(JOBS)} and charges ${c} per job. {n1} did {a} jobs in March and {b} fewer in April. How much did {n1} earn in both months?",
        f"A tank holds {a * 10} liters. It is filled at {c} liters per minute. How long does it take to fill from empty?",
        f"{n1} reads {b} pages a day. The book has {b * a + c} pages. After how many days will {n1} finish it?",
        f"A bakery sold {a} {f} on Monday, twice as many on Tuesday and {d} on Wednesday. How many in total?",
        f"Two friends, {n1} and {n2}, start {a * 10} km apart and walk towards each other at {c} km/h and {c + 2} km/h. When do they meet?",
        f"The price of a ticket rose from ${a} to ${a + b}. By what percentage did it increase?",
        f"A garden is {a} m by {b} m. A path {rng.randint(1, 3)} m wide runs around it. What is the area of the path?",
        f"{n1} saves ${d} a month. How many months until {n1} can buy a bike that costs ${d * c + b}?",
        f"There are {a + b} students. {rng.choice([25, 40, 50, 60, 75])}% of them walk to school and the rest take the bus. How many take the bus?",
        f"A phone plan costs ${c} a month plus ${b / 10:.2f} per GB. {n1} used {a} GB. What is the bill?",
        f"Convert {a * 100} minutes into hours and minutes.",
        f"The average of {c} numbers is {a}. One more number, {d}, is added. What is the new average?",
        f"Solve the system: x + y = {a + b}, x - y = {a - b}.",
        f"What is {c}/{b} + {d}/{a}? Give the answer as a fraction in lowest terms.",
    ])
    return rng.choice(["{q}", "{q} Show your work.", "Solve step by step: {q}", "Math problem: {q}\nSolution:",
                       "{q}\nLet's think step by step.", "Question: {q}\nAnswer:"]).format(q=q)


# ---------------------------------------------------------------- v2's prompts that name sources: training split only
def package_prompts() -> list[str]:
    out = []
    for key, p in src.dpkg_packages().items():
        if src.is_eval(key) or "Description" not in p:
            continue
        desc = p["Description"].split("\n")[0].strip().rstrip(".")
        out.append(rng.choice([f"Describe the software package {p['Package']} ({desc}).",
                               f"What is a {desc.lower()} and when would I need one?",
                               f"Explain to a beginner what \"{desc}\" means.",
                               f"Write a short README introduction for a project that provides {desc.lower()}."]))
    return out


v2.command_prompts = functools.partial(v2.command_prompts, keep=lambda name: not src.is_eval(f"man:{name}"))
v2.package_prompts = package_prompts


# ---------------------------------------------------------------- extraction
def extraction_prompts(paras: list[str]) -> list[str]:
    pkgs = [f for k, f in src.dpkg_packages().items() if not src.is_eval(k)]
    out = []
    for _ in range(N_EXTRACT):
        r = rng.random()
        if r < 0.45:
            sel = rng.sample(pkgs, rng.randint(2, 5))
            block = "\n\n".join("\n".join(f"{k}: {p[k]}" for k in ("Package", "Version", "Maintainer", "Installed-Size",
                                                                     "Depends", "Description") if k in p) for p in sel)
            ask = rng.choice(["Extract the package names and versions as a JSON list.",
                              "Make a table with columns: package, maintainer, installed size.",
                              "Which of these packages depend on libc6? Answer with names only.",
                              "List every e-mail address that appears above.",
                              "Return a JSON object mapping each package to its one-line description."])
            out.append(rng.choice(["{b}\n\n{a}", "{a}\n\n{b}\n", "Data:\n{b}\n\nTask: {a}"]).format(b=block, a=ask))
        else:
            p = " ".join(rng.sample(paras, rng.randint(1, 3)))
            ask = rng.choice(["Extract every command name mentioned in the text.", "List the file names that appear in this text.",
                              "Pull out all numbers and what they refer to.", "What options or flags does this text mention? List them.",
                              "Extract the key terms and give a one-line definition of each.",
                              "Turn this paragraph into a JSON object with fields 'topic', 'tools' and 'steps'."])
            out.append(rng.choice(["{p}\n\n{a}", "{a}\n\n{p}\n", "Text: {p}\nInstruction: {a}\nOutput:"]).format(p=p, a=ask))
    out = [q for q in dict.fromkeys(out) if not FILT(q)]
    print(f"extraction: {len(out)} prompts", file=sys.stderr)
    return out


def _take(docs: list[str], chars: int) -> list[str]:
    """The leading documents until their characters pass `chars` (the one that passes it included)."""
    out, n = [], 0
    for d in docs:
        if n > chars:
            break
        out.append(d)
        n += len(d)
    return out


def main(path: str) -> None:
    docs = long_documents()
    code = _take(v2.code_docs(), CODE_CHARS)
    pool = [t for _k, t in docs] + v2.metadata_docs()
    rng.shuffle(pool)
    prose = _take(pool, PROSE_CHARS)
    paras = [p for p in v2.paragraphs(prose) if not FILT(p)]
    stubs = [s for s in v2.func_prompts(stdlib_files()) if not FILT(s)]
    rng.shuffle(stubs)
    chat = [q for q in v2.instruction_prompts(paras, stubs) if not FILT(q)][:N_CHAT]
    groups = {"translation": translation_prompts(), "long": long_prompts(docs),
              "math": [q for q in (math_prompt() for _ in range(N_MATH)) if not FILT(q)],
              "extraction": extraction_prompts(paras), "chat": chat, "code": stubs[:N_STUBS]}
    prompts = [q for qs in groups.values() for q in qs]
    rng.shuffle(prompts)
    texts = [d for d in code + prose if not FILT(d[:2000])]  # windows are filtered again at training time
    rng.shuffle(texts)
    tmp = Path(path + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in texts:
            f.write(json.dumps({"text": d}) + "\n")
        for q in prompts:
            f.write(json.dumps({"prompt": q}) + "\n")
    os.replace(tmp, path)
    print(f"documents: {len(code)} code ({sum(map(len, code)) / 1e6:.2f} M chars), {len(prose)} prose "
          f"({sum(map(len, prose)) / 1e6:.2f} M chars); prompts: "
          + ", ".join(f"{k} {len(v)}" for k, v in groups.items())
          + f"; {os.path.getsize(path) / 2**20:.1f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
