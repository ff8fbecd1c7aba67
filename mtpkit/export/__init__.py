"""Exporters: each writes a format from the reference weights and checks it against the reference.

One module per format, found by name in `FORMATS` (`mtpkit export --format NAME`). Every format module has the
same shape:

    QUANTS: tuple[str, ...]   the `--quant` values it accepts: always `COMMON_QUANTS` (none | int8 | int4), then
                              its own names (GGUF: source, f32, q8_0, q4_k_m, ...)
    export(target: str, drafter: str | None, out: Path, *, quant: str | None, dtype: str | None,
           **format_options) -> dict
                              writes everything through a staging directory (`staged`: an OSError while
                              writing is one line), checks the exported target against the reference before
                              anything lands in OUT, shows its steps on stderr (`mtpkit.progress.steps`),
                              returns a JSON-able result: format, out, quant, wrote (human list of what it
                              wrote), removed (entries of an earlier export it replaced with nothing:
                              `stale_entries`), vs_reference (compare_logits), probe_tokens, seconds, plus its
                              own keys
    check_target(ref, path, tokens, tolerance, what) -> dict
                              its parity check: the format's runtime vs the float32 reference through
                              `mtpkit.export.parity.compare_logits`, which raises beyond the tolerance

Heavy dependencies (torch, mlx, gguf, llama_cpp, coremltools, onnx, onnxruntime) are imported inside the functions
that need them: a format module imports without any of them. The CLI (export/cli.py) refuses a non-empty OUT
without --force and an OUT it cannot write before calling `export`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from mtpkit.errors import MtpkitError
from mtpkit.paths import atomic_entries

FORMATS = {"mlx": "mtpkit.export.mlx", "gguf": "mtpkit.export.gguf", "onnx": "mtpkit.export.onnx",
           "coreml": "mtpkit.export.coreml"}

# the --quant values every format accepts; `none` = no quantization added by the export (each format says what
# it writes then), int8 / int4 = the format's usual 8- and 4-bit weights
COMMON_QUANTS = ("none", "int8", "int4")


def export_module(name: str) -> ModuleType:
    """The module of export format `name` (see FORMATS)."""
    if name not in FORMATS:
        raise MtpkitError(f"export format {name!r} is not available (have: {', '.join(FORMATS)})")
    return importlib.import_module(FORMATS[name])


def check_quant(fmt: str, quant: str | None, accepted: Sequence[str]) -> str:
    """`--quant` for format `fmt` -> its value (None -> "none"); anything else is one line listing `accepted`.
    Called before the (slow) target load."""
    q = "none" if quant is None else quant
    if q in accepted:
        return q
    if q in ("4", "8"):  # the bits of MLX's earlier --quant
        raise MtpkitError(f"--quant {q}: write --quant int{q} (--format {fmt} accepts: {', '.join(accepted)})")
    raise MtpkitError(f"--quant {q!r} is not accepted by --format {fmt} (accepted: {', '.join(accepted)})")


def no_options(fmt: str, options: dict[str, Any]) -> None:
    """Refuse format options (CLI flags of other formats) that `fmt` does not take."""
    if options:
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise MtpkitError(f"{flags}: not an option of --format {fmt}")


@contextlib.contextmanager
def staged(out: Path, names: Sequence[str]) -> Iterator[Path]:
    """`mtpkit.paths.atomic_entries(out, names)`; an OSError while writing (a full disk, a read-only or vanished
    directory) becomes one line naming the path and the cause, and as with any error nothing lands in OUT."""
    stage: Path | None = None
    try:
        with atomic_entries(out, names) as stage:
            yield stage
    except OSError as e:
        path = e.filename
        if path and stage is not None:  # name the entry of OUT, not its staging copy
            with contextlib.suppress(ValueError):
                path = str(Path(out) / Path(path).relative_to(stage))
        raise MtpkitError(f"cannot write {path or out}: {e.strerror or e}; nothing written to {out}") from None


def stale_entries(out: Path, stage: Path, names: Sequence[str]) -> list[str]:
    """Entries of OUT (of `names`) that an earlier export wrote and this one does not: `atomic_entries` removes
    them (a drafter left beside this target would be loaded as its drafter), and the result says so."""
    return [f"{out}/{n}" for n in names
            if n != "export.json" and (Path(out) / n).exists() and not (stage / n).exists()]


def summary_line(res: dict[str, Any]) -> str:
    """One human line from any format's export result."""
    v = res["vs_reference"]
    line = (f"wrote {' and '.join(res['wrote'])}; target vs reference over {res['probe_tokens']} tokens: max |logit "
            f"diff| {v['max_abs_logit_diff']:.3g} (tolerance {v['tolerance']}), argmax agreement "
            f"{100 * v['argmax_agreement']:.0f}%")
    if res.get("drafter_check"):
        line += f"; drafter step vs reference: max |logit diff| {res['drafter_check']['max_abs_logit_diff']:.3g}"
    if res.get("removed"):
        line += f"; removed {' and '.join(res['removed'])} (an earlier export's)"
    return line + f"; {res['seconds']} s"
