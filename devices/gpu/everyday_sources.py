"""Text on this machine that everyday prompts are built from, and the one rule that splits it between the
training corpus (build_corpus_v3.py) and the everyday evaluation suite (build_everyday_suite.py).

A *source* is named by a key: `mo:<gettext domain>` (all languages of one catalog), `doc:<package>`
(/usr/share/doc/<package>), `info:<manual>`, `man:<page>`, `dpkg:<package>`. `is_eval(key)` puts about
one source in eight into the evaluation suite; training never reads those sources, and on top of that
mtpkit's 8-word-shingle filter drops any training window that shares a shingle with a suite prompt.
"""

from __future__ import annotations

import gettext
import glob
import gzip
import hashlib
import os
import re
from pathlib import Path

EVAL_SALT = "mtpkit-everyday-v1:"


def is_eval(key: str) -> bool:
    """True for the sources held out for the everyday evaluation suite (~1/8, fixed by the key alone)."""
    return hashlib.sha256((EVAL_SALT + key).encode()).digest()[0] < 32


# language code (gettext directory) -> English name, for the languages with the most catalogs here
LANGUAGES = {
    "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "pt_BR": "Brazilian Portuguese",
    "sv": "Swedish", "uk": "Ukrainian", "ru": "Russian", "ja": "Japanese", "zh_CN": "Chinese (Simplified)",
    "zh_TW": "Chinese (Traditional)", "ko": "Korean", "cs": "Czech", "el": "Greek", "tr": "Turkish", "pl": "Polish",
    "da": "Danish", "vi": "Vietnamese", "fi": "Finnish", "nl": "Dutch", "ro": "Romanian", "id": "Indonesian",
    "ca": "Catalan", "hu": "Hungarian", "eo": "Esperanto", "sk": "Slovak", "bg": "Bulgarian", "hr": "Croatian",
    "gl": "Galician", "nb": "Norwegian Bokmal", "sl": "Slovenian", "et": "Estonian", "eu": "Basque", "lt": "Lithuanian",
    "he": "Hebrew", "be": "Belarusian", "sr": "Serbian", "ka": "Georgian", "ga": "Irish",
}

_FORMAT = re.compile(r"%[-+ #0-9.]*[a-zA-Z]|\{[^}]*\}|<[^>]+>|_[A-Za-z]")


def catalogs() -> dict[str, dict[str, Path]]:
    """gettext domain -> {language code: .mo path}, languages restricted to LANGUAGES."""
    out: dict[str, dict[str, Path]] = {}
    for f in sorted(glob.glob("/usr/share/**/LC_MESSAGES/*.mo", recursive=True)):
        p = Path(f)
        lang = p.parent.parent.name
        if lang in LANGUAGES:
            out.setdefault(p.stem, {})[lang] = p
    return out


def sentence_pairs(path: Path, min_words: int = 4) -> list[tuple[str, str]]:
    """(English msgid, translation) pairs of one catalog that read as text: several words, no format codes."""
    try:
        with open(path, "rb") as f:
            cat = gettext.GNUTranslations(f)._catalog  # noqa: SLF001 - the parsed .mo table
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    out = []
    for k, v in cat.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k or not v or k == v:
            continue
        k1, v1 = " ".join(k.split()), " ".join(v.split())
        if len(k1.split()) < min_words or _FORMAT.search(k1) or len(k1) > 400 or "\x00" in k1:
            continue
        out.append((k1, v1))
    return out


def clean(t: str) -> str:
    t = t.replace("\r", "")
    t = re.sub(r"[ \t]+\n", "\n", t)
    return re.sub(r"\n{3,}", "\n\n", t).strip() + "\n"


SKIP_NAME = re.compile(r"(change|news|history|copying|copyright|license|licence|authors|thanks|todo|credits)", re.I)


def doc_files() -> dict[str, list[Path]]:
    """doc:<package> -> readable prose files (txt/md/rst, plain or .gz) under /usr/share/doc/<package>."""
    out: dict[str, list[Path]] = {}
    root = Path("/usr/share/doc")
    for pkg in sorted(os.listdir(root)) if root.is_dir() else []:
        files = []
        for d, _dirs, names in os.walk(root / pkg):
            for n in sorted(names):
                base = n[:-3] if n.endswith(".gz") else n
                if SKIP_NAME.search(base) or not re.search(r"(\.(txt|md|rst)|^README[^/]*)$", base, re.I):
                    continue
                files.append(Path(d) / n)
        if files:
            out[f"doc:{pkg}"] = files
    return out


def read_text(path: Path) -> str:
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
        return clean(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, EOFError):
        return ""


def info_nodes() -> dict[str, list[str]]:
    """info:<manual> -> its nodes' text (GNU info manuals)."""
    out: dict[str, list[str]] = {}
    for f in sorted(glob.glob("/usr/share/info/*.gz")):
        name = Path(f).name.split(".")[0]
        try:
            t = gzip.open(f, "rt", encoding="utf-8", errors="replace").read()
        except OSError:
            continue
        nodes = []
        for node in t.split("\x1f"):
            node = "\n".join(ln for ln in node.splitlines() if not ln.startswith(("File: ", "* Menu:", "Tag Table")))
            if len(node) > 400:
                nodes.append(clean(node))
        if nodes:
            out.setdefault(f"info:{name}", []).extend(nodes)
    return out


def dpkg_packages() -> dict[str, dict[str, str]]:
    """dpkg:<package> -> its fields from /var/lib/dpkg/status (Package, Version, Maintainer, Description, ...)."""
    out: dict[str, dict[str, str]] = {}
    try:
        text = Path("/var/lib/dpkg/status").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        last = None
        for ln in block.splitlines():
            if ln.startswith((" ", "\t")) and last:
                fields[last] += "\n" + ln.strip()
            elif ":" in ln:
                last, _, v = ln.partition(":")
                fields[last] = v.strip()
        if "Package" in fields:
            out[f"dpkg:{fields['Package']}"] = fields
    return out
