"""Views of a bench document: a Markdown table and a PNG with two plots (matplotlib, imported here)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mtpkit.paths import atomic_file


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def machine_line(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["settings"]
    where = m["gpu"] or f"{m['cpu']}, {s['threads']} threads"
    torch = m["versions"].get("torch")
    return (f"{where} | {m['platform']} | " + (f"torch {torch} | " if torch else "") + f"{s['dtype']} | suite {s['suite']} "
            f"(limit {s['limit']}), {s['max_new_tokens']} new tokens, T={s['temperature']:g}, k={s['num_draft_tokens']}, "
            f"repeats {s['repeats']} | {doc['created']}")


def markdown(doc: dict[str, Any]) -> str:
    """The summary table, the per-category speedups and the machine that produced them."""
    out = [f"Machine: {machine_line(doc)}", "",
           "| method | weights | weights MB | tok/s | speedup | tau | c | working mem MB | greedy identical to |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, s in doc["summary"].items():
        meth = doc["methods"][name]
        gi = s["greedy_identical"]
        ident = f"{meth['reference']}: {gi['identical']}/{gi['prompts']}" if gi else "-"
        work = s["cuda_growth_mb"] if s["cuda_growth_mb"] is not None else s["rss_growth_mb"]
        out.append(f"| {name} | {meth['weights']} | {meth['weights_mb']:.0f} | {_f(s['tok_per_s'], '.1f')} | "
                   f"{_f(s['speedup'], '.2f')}x | {_f(s['tau'], '.2f')} | {_f(s['c'], '.3f')} | {_f(work, '.0f')} | "
                   f"{ident} |")
    spec = doc["summary"].get("speculative")
    if spec and spec["acceptance"]:
        out += ["", "Acceptance per draft position (speculative): "
                + ", ".join(f"{i + 1}: {a:.2f}" for i, a in enumerate(spec["acceptance"]))]
    totals = [f"{n} {s['draft_acceptance']:.2f}" for n, s in doc["summary"].items() if "draft_acceptance" in s]
    if totals:
        out += ["", "Draft acceptance, all positions pooled (llama-server reports totals only): " + ", ".join(totals)]
    cats = doc["by_category"]
    if len(cats) > 1:
        names = list(doc["summary"])
        out += ["", "Speedup over plain by category (median over prompts):", "",
                "| category | prompts | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
        for c, per in cats.items():
            out.append(f"| {c} | {per['plain']['prompts']} | "
                       + " | ".join(_f(per[n]["speedup"], ".2f") + "x" for n in names) + " |")
    if doc["skipped"]:
        out += ["", "Skipped baselines: " + "; ".join(f"{k} ({v})" for k, v in doc["skipped"].items())]
    if doc["greedy_mismatch"]:
        out += ["", "**Greedy output differs from its reference for: " + ", ".join(doc["greedy_mismatch"]) + "**"]
    s = doc["settings"]
    out += ["", "tok/s: decode speed after the first token, median over repeats (warm-up excluded), median over "
                "prompts; speedup: median over prompts of tok/s / plain tok/s on the same prompt; c: drafter "
                "seconds per draft token / plain target step; working mem: peak rise of "
                + ("GPU memory" if doc["machine"]["gpu"] else "process RSS") + " during a run, above the loaded weights. "]
    if s.get("command"):  # a document written by another driver (bench/stock_llamacpp.py)
        out[-1] += f"Reproduce: `{s['command']}`"
        return "\n".join(out) + "\n"
    out[-1] += ("Reproduce: `mtpkit bench"
                + (f" --backend {s['backend']} --target {s['target']}" if s.get("backend", "torch") != "torch" else "")
                + f" --suite {s['suite']} --limit {s['limit']} --max-new-tokens {s['max_new_tokens']} "
                f"--temperature {s['temperature']:g} -k {s['num_draft_tokens']} --repeats {s['repeats']}"
                + (f" --device {s['device']}" if s["device"] else "") + (f" --threads {s['threads']}" if s["threads"] else "")
                + (f" --compile {s['compile']}" if s.get("compile") else "")
                + (f" --gate {s['gate']}" if s.get("gate", "on") != "on" else "")
                + (f" --branches {s['branches']}" if s.get("branches", 1) != 1 else "")
                + (f" --verify-rows {s['verify_rows']}" if s.get("verify_rows", "lazy") != "lazy" else "")
                + (f" --pipeline {s['pipeline']}" if s.get("pipeline", "on") != "on" else "")
                + (f" --verify {s['verify']}" if s.get("verify", "block") != "block" else "") + "`")
    return "\n".join(out) + "\n"


def plot(doc: dict[str, Any], path: str | os.PathLike) -> None:
    """Left: acceptance per draft position (overall and per category). Right: speedup over our plain decoding
    per method, overall and per prompt category."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.6]})
    spec = doc["summary"]["speculative"]
    cats = doc["by_category"]
    k = len(spec["acceptance"])
    xs = list(range(1, k + 1))
    a1.plot(xs, spec["acceptance"], "o-", color="black", lw=2.5, label=f"all (tau {spec['tau']:.2f})")
    if len(cats) > 1:
        for c, per in cats.items():
            acc = per["speculative"]["acceptance"]
            a1.plot(range(1, len(acc) + 1), acc, ".--", lw=1, alpha=0.8, label=f"{c} (tau {per['speculative']['tau']:.2f})")
    a1.set(xlabel="draft position", ylabel="share of drafted tokens accepted",
           title="Acceptance per draft position", ylim=(0, 1.02), xticks=xs)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)

    names = [n for n in doc["summary"] if n != "plain"]
    groups = ["all"] + (list(cats) if len(cats) > 1 else [])
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [doc["summary"][n]["speedup"]] + ([cats[c][n]["speedup"] for c in groups[1:]])
        pos = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        bars = a2.bar(pos, [v or 0 for v in vals], width, label=f"{n} ({doc['methods'][n]['weights']})")
        for b, v in zip(bars, vals, strict=True):
            if v is not None:
                a2.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                            fontsize=7, rotation=90 if len(names) * len(groups) > 14 else 0)
    a2.axhline(1.0, color="black", ls="--", lw=1)
    a2.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0)
    a2.set(ylabel="speedup over mtpkit plain decoding (median over prompts)", title="Speedup per method and prompt category")
    a2.grid(axis="y", alpha=0.3)
    a2.legend(fontsize=7)
    m, s = doc["machine"], doc["settings"]
    where = m["gpu"] or f"{m['cpu']} ({s['threads']} threads)"
    fig.suptitle(f"{s['target']} on {where}, {s['dtype']} | {s['suite']} x{doc['summary']['plain']['prompts']}, "
                 f"{s['max_new_tokens']} tokens, T={s['temperature']:g}, k={s['num_draft_tokens']} | {doc['created'][:10]}",
                 fontsize=10)
    fig.tight_layout()
    p = Path(path)
    try:
        with atomic_file(p) as tmp:
            fig.savefig(tmp, dpi=110, format=p.suffix[1:] or "png")
    finally:
        plt.close(fig)
