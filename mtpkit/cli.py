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

from mtpkit.errors import MtpkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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
    """Turn MtpkitError (and a few OS errors users cause) into `error: ...` + exit 2."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MtpkitError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            typer.echo(f"error: {e.strerror or e}: {e.filename}", err=True)
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


def main() -> None:  # pragma: no cover - console entry for `python -m mtpkit`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
