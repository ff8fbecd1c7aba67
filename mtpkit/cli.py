"""The `mtpkit` command line (typer). Heavy optional dependencies are imported inside commands.

Every user-caused failure is an MtpkitError: printed as one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import typer
import typer.core

from mtpkit.errors import MtpkitError


class _OneLineUsageErrors(typer.core.TyperGroup):
    """Usage errors (a missing option, `--steps abc`, an unknown command) as one `error:` line, exit 2, like every
    other refusal (click draws them as a multi-line box)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:  # recent typer vendors click as typer._click
            from typer._click.exceptions import ClickException, NoArgsIsHelpError
            from typer.exceptions import Abort
        except ImportError:  # pragma: no cover - typer on click
            from click.exceptions import Abort, ClickException, NoArgsIsHelpError
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as e:  # `mtpkit` or `mtpkit export` alone: the help, as click shows it
            typer.echo(e.ctx.get_help())
            sys.exit(e.exit_code)
        except ClickException as e:
            where = f" (see {e.ctx.command_path} --help)" if getattr(e, "ctx", None) is not None else ""
            typer.echo(f"error: {e.format_message()}{where}", err=True)
            sys.exit(e.exit_code)
        except Abort:
            typer.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)  # typer.Exit(n) comes back as n in this mode


app = typer.Typer(cls=_OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill, export and run Gemma-style multi-token-prediction drafters.")


def _version(value: bool) -> None:
    if value:
        from mtpkit import __version__
        typer.echo(f"mtpkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Distill, export and run Gemma-style multi-token-prediction drafters."""


def one_line_errors(fn: Callable) -> Callable:
    """Turn MtpkitError and OS errors (missing/unwritable paths, a full disk) into `error: ...` + exit 2."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MtpkitError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:  # a missing or unwritable path, a full disk, ...: the system's own words + the path
            if e.errno is None or not e.strerror:
                raise
            where = f": {e.filename}" if e.filename else ""
            typer.echo(f"error: {e.strerror}{where}", err=True)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as e:
            if e.name != "torch":
                raise
            typer.echo("error: this needs PyTorch (pip install 'mtpkit[torch]'); exported pairs run without it: "
                       "--backend llamacpp|mlx|onnx|coreml", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
    return wrapper


def _count(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    emb = model.embed_tokens.weight.numel()
    return {"total": total, "embedding": emb, "non_embedding": total - emb}


@app.command()
@one_line_errors
def info(target: str = typer.Option("gemma3-270m", help="Target name, .gguf file or HF directory."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Show the resolved target config, parameter counts and where the weights came from."""
    from mtpkit.model.load import load_target
    t0 = time.perf_counter()
    t = load_target(target)
    load_s = time.perf_counter() - t0
    c = t.config
    tok = t.tokenizer
    out = {
        "target": target,
        "config": c.to_dict(),
        "parameters": _count(t.model),
        "full_attention_layers": [i for i, k in enumerate(c.layer_types) if k == "full_attention"],
        "drafter_reads_layers": {"sliding": c.last_layer_of("sliding_attention") if "sliding_attention" in c.layer_types
                                 else None, "full": c.last_layer_of("full_attention")},
        "tokenizer": None if tok is None else {"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id},
        "source": t.source,
        "load_seconds": round(load_s, 2),
    }
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    con = Console()
    tab = Table(title=f"target {target}", show_header=False)
    p = out["parameters"]
    rows = [("layers", f"{c.num_hidden_layers} ({len(out['full_attention_layers'])} full at {out['full_attention_layers']},"
                       f" sliding window {c.sliding_window})"),
            ("hidden / FFN", f"{c.hidden_size} / {c.intermediate_size}"),
            ("heads (q / kv) x dim", f"{c.num_attention_heads} / {c.num_key_value_heads} x {c.head_dim}"),
            ("vocab", f"{c.vocab_size:,}"),
            ("RoPE theta (full / sliding)", f"{c.rope_theta:g} / {c.rope_local_base_freq:g}"),
            ("parameters", f"{p['total']:,} ({p['embedding']:,} embedding, {p['non_embedding']:,} other)"),
            ("drafter reads layers", f"{out['drafter_reads_layers']}"),
            ("tokenizer", "none" if tok is None else f"sentencepiece, {tok.vocab_size:,} pieces, bos={tok.bos_id} eos={tok.eos_id}"),
            *[(f"source {k}", str(v)) for k, v in t.source.items()],
            ("load time", f"{load_s:.1f} s")]
    for k, v in rows:
        tab.add_row(k, v)
    con.print(tab)


def _stats_line(st) -> str:
    acc = ", ".join(f"{a:.2f}" for a in st.acceptance)
    split = st.draft_s + st.verify_s
    share = f" | draft {100 * st.draft_s / split:.0f}% of decode time" if split and st.drafted else ""
    return (f"{st.new_tokens} tokens | {st.tok_per_s:.1f} tok/s | tau {st.tau:.2f}"
            + (f" | acceptance per position [{acc}]" if acc else "") + share + f" | finish: {st.finish}")


@app.command()
@one_line_errors
def run(prompt: str = typer.Argument(None, help="Text to continue (or --prompt-file)."),
        prompt_file: str = typer.Option(None, "--prompt-file", "-f",
                                        help="Read the prompt from this UTF-8 file ('-' = standard input)."),
        context: int = typer.Option(None, "--context", help="Positions the cache holds: prompt + new tokens "
                                                            "(default 4096, or the target's maximum if smaller)."),
        target: str = typer.Option("gemma3-270m", help="Target name, .gguf file or HF directory."),
        drafter: str = typer.Option(None, help="Drafter directory, 'none' for plain decoding; default: the shipped one."),
        backend: str = typer.Option("torch", help="Runtime backend: torch | llamacpp (DIR/target.gguf from mtpkit "
                                                  "export) | mlx (DIR/target) | onnx (DIR/target.onnx) | coreml (DIR, "
                                                  "macOS 15+)."),
        device: str = typer.Option(None, help="torch: cpu or cuda (default: cuda if available); mlx: cpu or gpu; "
                                              "coreml: gpu | ane | cpu | all (default: what it was exported for)."),
        dtype: str = typer.Option(None, help="torch: float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)."),
        threads: int = typer.Option(None, help="CPU threads (torch, llamacpp, onnx; mlx on Linux: its OpenBLAS)."),
        compile: str = typer.Option(None, "--compile", help="torch on CUDA: torch.compile the graph-captured steps: "
                                                            "all (default; ~1 min the first time, cached), drafter, none."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
        temperature: float = typer.Option(0.0, help="0 = greedy."),
        top_p: float = typer.Option(1.0, "--top-p"),
        top_k: int = typer.Option(0, "--top-k"),
        num_draft_tokens: int = typer.Option(5, "--num-draft-tokens", "-k",
                                             help="The most drafts per round: the gate picks 0..k each round."),
        gate: bool = typer.Option(True, "--gate/--no-gate",
                                  help="--no-gate: draft exactly k every round (fixed k, for benchmarks)."),
        min_confidence: float = typer.Option(None, "--min-confidence",
                                             help="Adaptive drafting: stop a draft when the drafter's top probability "
                                                  "drops below this (default: 0.3 on CPU with llama.cpp, ONNX, Core ML, MLX at T = 0; "
                                                  "off otherwise; 0 = off)."),
        draft_temperature: float = typer.Option(None, "--draft-temperature",
                                                help="Sampling: draw drafts at temperature x this (default: the "
                                                     "drafter's calibrated factor); the output stays the target's."),
        branches: int = typer.Option(1, "--branches", help="Sampling, torch backend: draft trees of this many "
                                     "first-draft candidates a round, each with its chain (1 = one chain)."),
        verify: str = typer.Option("block", "--verify", help="Sampling: a chain's drafts (a tree's accepted one "
                                   "too) judged by block (block verification: at least as many drafts accepted) | "
                                   "token (token-wise rejection)."),
        seed: int = typer.Option(0),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object (tokens, text, stats)."),
        compare: bool = typer.Option(False, help="Also run plain decoding and print the speedup.")) -> None:
    """Generate with the shared-cache speculative loop (streams text; stats on stderr)."""
    import mtpkit
    from mtpkit.api import acceptance_warning
    from mtpkit.runtime.loop import GenerationParams
    from mtpkit.runtime.sampling import SamplingParams
    # validate before the slow load (the loop builds the same objects again)
    GenerationParams(max_new_tokens, SamplingParams(temperature, top_p, top_k), num_draft_tokens,
                     draft_temperature=1.0 if draft_temperature is None else draft_temperature, branches=branches,
                     verify=verify)
    prompt = _prompt(prompt, prompt_file)
    s = mtpkit.load(target=target, drafter=drafter, backend=backend, max_draft=max(16, num_draft_tokens),
                    max_len=context, device=device, dtype=dtype, threads=threads, compile=compile)
    if compare and s.drafter_path is None:
        raise MtpkitError("--compare needs a drafter (there is nothing to compare plain decoding with)")
    if s.drafter_path is None and drafter != "none":
        typer.echo(f"note: no drafter for target {target!r}: plain decoding (train one with `mtpkit distill`)", err=True)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
              num_draft_tokens=num_draft_tokens, min_confidence="auto" if min_confidence is None else min_confidence,
              draft_temperature=draft_temperature, gate=gate, branches=branches, verify=verify)
    if as_json:
        r = s.generate(prompt, **kw)
        st = r.stats
        out = {"tokens": r.tokens, "text": r.text, "stats": st.to_dict(), "drafter": s.drafter_path}
    else:
        from mtpkit.api import Stats
        st, toks, echoed = Stats(), [], False
        dec = s.tokenizer.stream()
        for rnd in s.stream(prompt, stats=st, **kw):
            if not echoed:  # the prompt is echoed once it has been accepted (a refused one leaves only the error)
                typer.echo(prompt, nl=False)
                echoed = True
            toks += rnd.tokens
            typer.echo(dec.push(rnd.tokens), nl=False)
        typer.echo(dec.flush())
        typer.echo(_stats_line(st), err=True)
        out = {"tokens": toks, "stats": st.to_dict()}
    warning = acceptance_warning(st)
    if warning:
        out["warning"] = warning
        typer.echo(warning, err=True)
    if compare:
        from mtpkit.progress import note
        note(f"plain decoding of the same {out['stats']['new_tokens']} tokens for --compare ...")
        base = s.generate(prompt, use_drafter=False, **kw)
        speedup = out["stats"]["tok_per_s"] / base.stats.tok_per_s if base.stats.tok_per_s else 0.0
        out["plain"] = {"stats": base.stats.to_dict(), "identical": base.tokens == out["tokens"]}
        out["speedup"] = speedup
        if not as_json:
            same = "identical tokens" if out["plain"]["identical"] else "tokens DIFFER"
            typer.echo(f"plain: {_stats_line(base.stats)}\nspeedup {speedup:.2f}x ({same})", err=True)
    if as_json:
        typer.echo(json.dumps(out))


def _prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt from the argument or from --prompt-file (a path, or '-' for standard input), checked as text."""
    from mtpkit.api import check_text
    if (prompt is None) == (prompt_file is None):
        raise MtpkitError("give the prompt as an argument or with --prompt-file FILE ('-' = stdin), not both"
                          if prompt is not None else "no prompt: give it as an argument or with --prompt-file FILE "
                          "('-' = stdin)")
    if prompt is None:
        what = "standard input" if prompt_file == "-" else prompt_file
        data = sys.stdin.buffer.read() if prompt_file == "-" else open(prompt_file, "rb").read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MtpkitError(f"the prompt in {what} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
                              ) from None
    if not prompt:
        raise MtpkitError("empty prompt")
    check_text(prompt)
    return prompt


def _register_distill() -> None:
    from mtpkit.distill.cli import distill_command, eval_drafter_command
    app.command("distill", help="Train an assistant drafter against a frozen target.")(distill_command)
    app.command("eval-drafter", help="Loop tau at T=0 and T=1 per suite and category (and the simulated mean).")(eval_drafter_command)


_register_distill()


def _register_bench() -> None:
    from mtpkit.bench.cli import bench_command, predict_command, profile_device_command, report_command
    app.command("bench", help="Plain vs speculative decoding vs installed baselines: JSON, Markdown, PNG.")(
        one_line_errors(bench_command))
    app.command("report", help="Markdown table and PNG plots of a bench JSON.")(one_line_errors(report_command))
    app.command("predict", help="Expected speedup on device profiles from a bench JSON.")(
        one_line_errors(predict_command))
    app.command("profile-device", help="Measure this machine into a device profile JSON.")(
        one_line_errors(profile_device_command))
    from mtpkit.export.cli import export_command
    app.command("export", help="Export target + drafter (mlx, gguf, onnx, coreml) and check them against the "
                               "reference.")(
        one_line_errors(export_command))


_register_bench()


def main() -> None:  # pragma: no cover - console entry for `python -m mtpkit`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
