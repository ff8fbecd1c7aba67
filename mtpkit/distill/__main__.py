"""`python -m mtpkit.distill ...` / `torchrun --nproc-per-node N -m mtpkit.distill ...`: the `distill` command alone."""

import typer

from mtpkit.distill.cli import distill_command

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(distill_command)

if __name__ == "__main__":
    app()
