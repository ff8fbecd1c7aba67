"""Typer commands `distill` and `eval-drafter` (registered by mtpkit.cli; `python -m mtpkit.distill` and
`torchrun -m mtpkit.distill` run `distill` alone). User errors: one `error: ...` line, exit code 2."""

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
    from mtpkit.distill.config import DistillConfig
    return f"{text} (run setting, default {getattr(DistillConfig, field)})".strip()



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


def resolve_config(out: Path, overrides: dict[str, Any], resume: bool, force: bool):
    """DistillConfig from defaults (or the saved run when resuming) plus explicitly given options."""
    from mtpkit.distill.config import DistillConfig
    saved_path = out / "hparams.json"
    if resume and not force and saved_path.is_file():
        saved = DistillConfig.load(saved_path)
        merged = DistillConfig.from_dict({**saved.to_dict(), **overrides})
        diff = [f"{k}={getattr(merged, k)!r} (saved: {getattr(saved, k)!r})" for k in overrides
                if getattr(merged, k) != getattr(saved, k)]
        if diff:
            raise MtpkitError(f"--resume keeps the saved settings; these differ: {', '.join(diff)} (use --force to restart)")
        return saved
    return DistillConfig.from_dict({**DistillConfig().to_dict(), **overrides})


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
    device: str = typer.Option("cpu", help="cpu | cuda (bf16 autocast; torchrun: one GPU per process)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (a missing --out starts one)."),
    force: bool = typer.Option(False, "--force", help="Delete --out and start over."),
    time_budget_min: float | None = typer.Option(None, "--time-budget-min", help="Stop cleanly with a checkpoint in time."),
    stop_at: int | None = typer.Option(None, "--stop-at", help="Stop after this step (same schedule; --resume continues)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
) -> None:
    """Distill a drafter against a frozen target on target-regenerated text.

    Options marked (run setting), and any DistillConfig field via --set, are saved in OUT/hparams.json;
    --resume reuses the saved values and refuses a different one.
    """
    from mtpkit.distill.train import RunOptions, run_distill
    given = dict(target=target, corpus=corpus, steps=steps, num_draft_tokens=num_draft_tokens, batch_size=batch_size,
                 lr=lr, num_sequences=num_sequences, gen_len=gen_len, head=head, loss=loss, eval_every=eval_every)
    overrides = {**_parse_set(settings), **{k: v for k, v in given.items() if v is not None}}
    cfg = resolve_config(Path(out), overrides, resume, force)
    log = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    summary = run_distill(cfg, out, RunOptions(device=device, resume=resume, force=force, time_budget_min=time_budget_min,
                                               stop_at=stop_at, progress=progress, log=log))
    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        typer.echo(json.dumps(summary))
        return
    final, best = summary.get("final") or {}, summary.get("best") or {}
    typer.echo(f"stopped: {summary['stopped']} at step {summary['step']}/{summary['steps']}")
    if final:
        typer.echo(f"held-out simulated tau: T=0 {final.get('tau0')}  T=1 {final.get('tau1')}  "
                   f"accept0 {final.get('accept0')}")
    if best:
        typer.echo(f"best: step {best['step']} tau0 {best['tau0']} tau1 {best['tau1']} -> {summary['checkpoint']}")


@_errors
def eval_drafter_command(
    drafter: str = typer.Option(..., help="Drafter directory (e.g. a run's best/)."),
    suite: str = typer.Option(..., help="humaneval | mtbench | a .jsonl file (prompt or turns)."),
    target: str = typer.Option("gemma3-270m", help="Target name, .gguf file or HF directory."),
    limit: int | None = typer.Option(None, help="Use the first N prompts."),
    num_draft_tokens: int | None = typer.Option(None, "--num-draft-tokens", help="k (default: the drafter's training k, else 4)."),
    gen_len: int = typer.Option(128, "--gen-len", help="Tokens generated per prompt (greedy and sampled)."),
    batch: int = typer.Option(8, help="Sequences per batch."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    seed: int = typer.Option(0, help="Sampling seed for the T=1 continuations."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Simulated tau (T=0 and T=1) and acceptance per draft position of a drafter on a prompt suite."""
    import torch

    from mtpkit.distill.evaluate import eval_drafter
    from mtpkit.model.load import load_drafter, load_target
    from mtpkit.suites import load_suite
    if device == "cuda" and not torch.cuda.is_available():
        raise MtpkitError("--device cuda, but torch sees no CUDA device")
    if batch <= 0:
        raise MtpkitError("--batch must be positive")
    prompts = load_suite(suite, limit)
    t = load_target(target, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    d = load_drafter(drafter, t.model, device=device)
    k = num_draft_tokens
    if k is None:
        try:
            k = int(json.loads((Path(drafter) / "meta.json").read_text()).get("num_draft_tokens", 4))
        except (OSError, ValueError):
            k = 4
    if k <= 0:
        raise MtpkitError("--num-draft-tokens must be positive")
    res = {"suite": suite, "target": target, "drafter": str(drafter),
           **eval_drafter(t, d, prompts, k=k, gen_len=gen_len, batch=batch, device=device, seed=seed)}
    if as_json:
        typer.echo(json.dumps(res))
        return
    from rich.console import Console
    from rich.table import Table
    tab = Table(title=f"{drafter} on {suite} ({res['prompts']} prompts, k={k}, {gen_len} tokens each)")
    for col in ("", "tau", "accept per position", "given previous accepted"):
        tab.add_column(col)
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    tab.add_row("T=0", f"{f(res['tau0'])} (loop walk {f(res['tau0_loop'])})", str(res["accept0"]), str(res["cond_accept0"]))
    tab.add_row("T=1", f(res["tau1"]), str(res["accept1"]), str(res["cond_accept1"]))
    Console().print(tab)
    if res["outside_rate"] is not None:
        typer.echo(f"target argmax outside the chosen clusters: {res['outside_rate']:.2%} of draft steps")
