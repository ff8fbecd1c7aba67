"""Typer commands `distill` and `eval-drafter` (registered by mtpkit.cli; `python -m mtpkit.distill` and
`torchrun -m mtpkit.distill` run `distill` alone). User errors: one `error: ...` line, exit code 2, and every
option, path and suite is checked before the target loads. `distill --device cpu` sizes the run settings the user
does not give for a CPU (config.device_defaults) and says so in one stderr line; `eval-drafter` without --drafter
evaluates the drafter shipped for the target, as `mtpkit run` does."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from mtpkit.errors import MtpkitError


def _hp(field: str, text: str = "") -> str:
    """Help for an option that sets DistillConfig.`field`."""
    from mtpkit.distill.config import CPU_DEFAULTS, DistillConfig
    cpu = {**CPU_DEFAULTS, "warmup_steps": "steps // 5", "eval_every": "steps, at most 200"}.get(field)
    cpu = "" if cpu is None else f"; --device cpu: {cpu}"
    return f"{text} (run setting, default {getattr(DistillConfig, field)}{cpu})".strip()


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise MtpkitError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise MtpkitError("--device cuda, but torch sees no CUDA device")



def _errors(fn: Callable) -> Callable:
    """mtpkit.cli.one_line_errors (imported at call time: mtpkit.cli may import this module), printed by
    rank 0 only under torchrun."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mtpkit.cli import one_line_errors
        if os.environ.get("RANK", "0") == "0":
            return one_line_errors(fn)(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except MtpkitError:
            raise typer.Exit(2) from None
    return wrapper


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise MtpkitError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = json.loads(val)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = val
    return out


def resolve_config(out: Path, overrides: dict[str, Any], resume: bool, force: bool, device: str = "cuda"):
    """(DistillConfig, the device defaults it took) from the defaults of `device` (config.device_defaults) plus
    the explicitly given options; when resuming, (the saved run's, None)."""
    from mtpkit.distill.config import DistillConfig, device_defaults
    saved_path = out / "hparams.json"
    if resume and not force and saved_path.is_file():
        saved = DistillConfig.load(saved_path)
        merged = DistillConfig.from_dict({**saved.to_dict(), **overrides})
        diff = [f"{k}={getattr(merged, k)!r} (saved: {getattr(saved, k)!r})" for k in overrides
                if getattr(merged, k) != getattr(saved, k)]
        if diff:
            raise MtpkitError(f"--resume keeps the saved settings; these differ: {', '.join(diff)} (use --force to restart)")
        return saved, None
    picked = device_defaults(device, overrides, int(os.environ.get("WORLD_SIZE", "1")))
    return DistillConfig.from_dict({**DistillConfig().to_dict(), **picked, **overrides}), picked


def _defaults_line(device: str, cfg, overrides: dict[str, Any]) -> str | None:
    """The one stderr line that says which size of run the defaults picked (None if every such option was given)."""
    from mtpkit.distill.config import CPU_DEFAULTS, DistillConfig
    names = [n for n in (*CPU_DEFAULTS, "warmup_steps", "eval_every") if n not in overrides]
    if not names:
        return None
    vals = " ".join(f"{n}={getattr(cfg, n)}" for n in names)
    if device == "cpu":
        gpu = DistillConfig()
        return (f"distill: --device cpu defaults, sized to finish in minutes: {vals} (an option or --set changes any "
                f"of them; a useful drafter needs a GPU: --device cuda defaults to {gpu.num_sequences} sequences x "
                f"{gpu.gen_len} tokens, {gpu.steps} steps)")
    return f"distill: --device {device} defaults: {vals} (an option or --set changes any of them)"


@_errors
def distill_command(
    out: str = typer.Option(..., "--out", help="Run directory (data, checkpoints, log, hparams.json)."),
    target: str | None = typer.Option(None, help="Target name, .gguf file or HF directory (default gemma3-270m)."),
    corpus: str | None = typer.Option(None, help="Prompt corpus: .jsonl (prompt/text) or .txt (default: the Python stdlib)."),
    steps: int | None = typer.Option(None, help=_hp("steps", "Optimizer steps.")),
    num_draft_tokens: int | None = typer.Option(None, "--num-draft-tokens", help=_hp("num_draft_tokens", "k: draft steps unrolled.")),
    batch_size: int | None = typer.Option(None, "--batch-size", help=_hp("batch_size", "Global sequences per step.")),
    lr: float | None = typer.Option(None, help=_hp("lr", "Peak learning rate.")),
    num_sequences: int | None = typer.Option(None, "--num-sequences", help=_hp("num_sequences", "Training sequences to generate.")),
    gen_len: int | None = typer.Option(None, "--gen-len", help=_hp("gen_len", "Continuation tokens per sequence.")),
    head: str | None = typer.Option(None, help=_hp("head", "dense | centroid.")),
    loss: str | None = typer.Option(None, help=_hp("loss", "kl | tv | mix.")),
    eval_every: int | None = typer.Option(None, "--eval-every", help=_hp("eval_every", "Steps between held-out evaluations.")),
    settings: list[str] = typer.Option([], "--set", help="Any DistillConfig field as KEY=VALUE (JSON value); repeatable."),  # noqa: B008
    device: str = typer.Option("cpu", help="cpu | cuda (bf16 autocast; torchrun: one GPU per process). cpu picks "
                                           "small defaults for the run settings you do not give (a run of minutes)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (a missing --out starts one)."),
    force: bool = typer.Option(False, "--force", help="Delete --out and start over."),
    time_budget_min: float | None = typer.Option(None, "--time-budget-min", help="Stop cleanly with a checkpoint in time."),
    stop_at: int | None = typer.Option(None, "--stop-at", help="Stop after this step (same schedule; --resume continues)."),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="Progress on stderr: a bar on a terminal, else a line per ~10 %."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Data shards here instead of OUT/data: another run's "
                                        "are reused when its data settings are the same (a sweep generates once)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
) -> None:
    """Distill a drafter against a frozen target on target-regenerated text.

    Options marked (run setting), and any DistillConfig field via --set, are saved in OUT/hparams.json;
    --resume reuses the saved values and refuses a different one.
    """
    from mtpkit.progress import note
    _check_device(device)  # every option is checked before the slow work (run_distill checks the run directory)
    if time_budget_min is not None and not time_budget_min > 0:
        raise MtpkitError(f"--time-budget-min must be positive, got {time_budget_min}")
    if stop_at is not None and stop_at < 0:
        raise MtpkitError(f"--stop-at must be a step >= 0, got {stop_at}")
    given = dict(target=target, corpus=corpus, steps=steps, num_draft_tokens=num_draft_tokens, batch_size=batch_size,
                 lr=lr, num_sequences=num_sequences, gen_len=gen_len, head=head, loss=loss, eval_every=eval_every)
    overrides = {**_parse_set(settings), **{k: v for k, v in given.items() if v is not None}}
    cfg, picked = resolve_config(Path(out), overrides, resume, force, device)
    main = os.environ.get("RANK", "0") == "0"
    log = note if main else (lambda _msg: None)
    line = None if picked is None else _defaults_line(device, cfg, overrides)
    if line:
        log(line)
    from mtpkit.distill.train import RunOptions, run_distill
    summary = run_distill(cfg, out, RunOptions(device=device, resume=resume, force=force, time_budget_min=time_budget_min,
                                               stop_at=stop_at, progress=progress, log=log, data_dir=data_dir))
    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        typer.echo(json.dumps(summary))
        return
    final, best = summary.get("final") or {}, summary.get("best") or {}
    typer.echo(f"stopped: {summary['stopped']} at step {summary['step']}/{summary['steps']}")
    if final:
        typer.echo(f"held-out tau (loop walk): T=0 {final.get('tau0_loop')}  T=1 {final.get('tau1_loop')}; "
                   f"simulated: T=0 {final.get('tau0')}  T=1 {final.get('tau1')}  accept0 {final.get('accept0')}")
    if best:
        typer.echo(f"best: step {best['step']} loop tau0 {best.get('tau0_loop')} tau1 {best.get('tau1_loop')} "
                   f"-> {summary['checkpoint']}")


def _eval_drafter_dir(target: str, drafter: str | None, centroid_top_k: int | None) -> tuple[str, int]:
    """(the drafter directory to evaluate, its training k (else 4)): --drafter, else the one shipped for `target`;
    refused here, before any loading, if it is no drafter or cannot take --centroid-top-k."""
    import dataclasses

    from mtpkit.api import check_drafter_dir, resolve_drafter
    if drafter is None:
        shipped = resolve_drafter(target, None)
        if shipped is None:
            raise MtpkitError(f"no drafter ships for target {target!r}: pass --drafter DIR (e.g. a distill run's best/)")
        drafter = shipped
    config = check_drafter_dir(drafter)
    d = Path(drafter).expanduser()
    if centroid_top_k is not None:
        if config.head != "centroid":
            raise MtpkitError("--centroid-top-k needs a drafter with the centroid head")
        dataclasses.replace(config, centroid_top_k=centroid_top_k)  # validates it against num_centroids
    try:
        k = json.loads((d / "meta.json").read_text()).get("num_draft_tokens", 4)
    except (OSError, ValueError, AttributeError):
        k = 4
    return drafter, k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else 4


@_errors
def eval_drafter_command(
    drafter: str | None = typer.Option(None, help="Drafter directory (e.g. a run's best/); default: the one shipped "
                                                  "for --target, as `mtpkit run` uses."),
    suite: list[str] = typer.Option(..., help="humaneval | mtbench | everyday | a .jsonl file (prompt or turns, optional category); "  # noqa: B008
                                    "repeat it or separate with commas for several suites."),
    target: str = typer.Option("gemma3-270m", help="Target name, .gguf file or HF directory."),
    limit: int | None = typer.Option(None, help="Use the first N prompts of each suite."),
    num_draft_tokens: int | None = typer.Option(None, "--num-draft-tokens", help="k (default: the drafter's training k, else 4)."),
    gen_len: int = typer.Option(128, "--gen-len", help="Tokens generated per prompt (greedy and sampled)."),
    max_prompt_tokens: int | None = typer.Option(None, "--max-prompt-tokens",
                                                 help="Keep each prompt's last N tokens (default 4096 - --gen-len)."),
    centroid_top_k: int | None = typer.Option(None, "--centroid-top-k",
                                              help="Clusters the centroid head keeps per step (default: the drafter's)."),
    batch: int = typer.Option(8, help="Sequences per batch."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    seed: int = typer.Option(0, help="Seed of the T=1 continuations and of the T=1 walk's acceptance draws."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Loop tau (T=0 and T=1), simulated tau and acceptance per draft position and per category of a drafter
    on one or more prompt suites. One suite: a flat report; several: {"suites": {name: report}, "overall": worst}."""
    import torch

    from mtpkit.distill.evaluate import CONTEXT, eval_suites
    from mtpkit.model.load import load_drafter, load_target
    from mtpkit.progress import note
    from mtpkit.suites import load_suite
    # every option, the drafter and the suites are checked before the target loads
    _check_device(device)
    for name, v, least in (("--batch", batch, 1), ("--gen-len", gen_len, 2), ("--limit", limit, 1),
                           ("--num-draft-tokens", num_draft_tokens, 1), ("--centroid-top-k", centroid_top_k, 1),
                           ("--max-prompt-tokens", max_prompt_tokens, 1)):
        if v is not None and v < least:
            raise MtpkitError(f"{name} must be at least {least}, got {v}")
    if max_prompt_tokens is None and gen_len >= CONTEXT:
        raise MtpkitError(f"--gen-len {gen_len} leaves no room for the prompt in {CONTEXT} tokens: "
                          "give --max-prompt-tokens")
    drafter, k = _eval_drafter_dir(target, drafter, centroid_top_k)
    k = num_draft_tokens or k
    names = list(dict.fromkeys(n.strip() for item in suite for n in item.split(",") if n.strip()))
    if not names:
        raise MtpkitError("--suite names no suite")
    suites = {name: load_suite(name, limit) for name in names}
    note(f"eval-drafter: loading the target {target} and the drafter {drafter}")
    t = load_target(target, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    d = load_drafter(drafter, t.model, device=device)
    kw = dict(k=k, gen_len=gen_len, batch=batch, device=device, seed=seed, max_prompt_tokens=max_prompt_tokens,
              centroid_top_k=centroid_top_k, progress=True)
    nested = eval_suites(t, d, suites, **kw)
    reports, head = nested["suites"], {"target": target, "drafter": str(drafter)}
    first = next(iter(reports.values()))
    if len(reports) == 1:
        res = {**head, **first}
    else:
        res = {**head, **{key: first[key] for key in ("num_draft_tokens", "gen_len", "max_prompt_tokens", "centroid_top_k")},
               **nested}
    if as_json:
        typer.echo(json.dumps(res))
        return
    from rich.console import Console
    from rich.table import Table
    console = Console()
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for name, r in reports.items():
        top_k = "" if r["centroid_top_k"] is None else f", top-{r['centroid_top_k']} clusters"
        tab = Table(title=f"{drafter} on {name} ({r['prompts']} prompts, k={k}, {gen_len} tokens each, "
                          f"prompts cut to {r['max_prompt_tokens']} tokens: {r['truncated_prompts']}{top_k})")
        for col in ("", "loop tau", "loop: accepted >= i", "simulated tau", "accept per position", "given previous accepted"):
            tab.add_column(col)
        tab.add_row("T=0", f(r["tau0"]), str(r["loop_accept0"]), f(r["tau0_sim"]), str(r["accept0"]), str(r["cond_accept0"]))
        tab.add_row("T=1", f(r["tau1"]), str(r["loop_accept1"]), f(r["tau1_sim"]), str(r["accept1"]), str(r["cond_accept1"]))
        console.print(tab)
        cats = Table(title=f"{name} per category (worst: T=0 {r['min_category_tau0_at']}, T=1 {r['min_category_tau1_at']})")
        for col in ("category", "prompts", "tau0", "tau1", "tau0 sim", "tau1 sim", "outside clusters"):
            cats.add_column(col)
        for cat, v in r["per_category"].items():
            out_rate = "n/a" if v["outside_rate"] is None else f"{v['outside_rate']:.2%}"
            cats.add_row(cat, str(v["prompts"]), f(v["tau0"]), f(v["tau1"]), f(v["tau0_sim"]), f(v["tau1_sim"]), out_rate)
        console.print(cats)
        if r["outside_rate"] is not None:
            typer.echo(f"target argmax outside the chosen clusters: {r['outside_rate']:.2%} of draft steps")
    if len(reports) > 1:
        o = res["overall"]
        at = lambda v: "n/a" if v is None else ": ".join(v)  # noqa: E731
        typer.echo(f"overall worst suite: T=0 {f(o['min_tau0'])} ({o['min_tau0_at']}), T=1 {f(o['min_tau1'])} ({o['min_tau1_at']}); "
                   f"worst category: T=0 {f(o['min_category_tau0'])} ({at(o['min_category_tau0_at'])}), "
                   f"T=1 {f(o['min_category_tau1'])} ({at(o['min_category_tau1_at'])})")
