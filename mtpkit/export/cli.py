"""`mtpkit export --format mlx|gguf|onnx|coreml ...` (registered by mtpkit.cli): checks --out, then dispatches to
the format's module (mtpkit.export).

Before any slow work --out must be a new or empty directory (or --force) that this process can create and write
into; a refusal is one line. A staging directory left by a killed export (`.staging-<pid>-*`) does not count: the
next export removes it (mtpkit.paths.sweep)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from mtpkit.errors import MtpkitError
from mtpkit.paths import check_writable

STAGING = re.compile(r"\.staging-\d+[-.]")  # mtpkit.paths.atomic_entries' temporaries


def check_out(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, not empty (unless `force`), or not writable; leaves nothing behind."""
    if out.exists() and not out.is_dir():
        raise MtpkitError(f"--out {out} exists and is not a directory")
    if out.is_dir() and not force:
        try:
            n = sum(1 for p in out.iterdir() if not STAGING.match(p.name))
        except OSError as e:
            raise MtpkitError(f"--out {out} cannot be read: {e.strerror or e}") from None
        if n:
            raise MtpkitError(f"--out {out} is not empty ({n} {'entry' if n == 1 else 'entries'}); pass --force to "
                              "replace what the export writes there")
    check_writable(out, f"--out {out}")  # a read-only directory, a parent that is a file: before the target loads


def export_command(
        format: str = typer.Option(..., "--format", help="mlx | gguf | onnx | coreml."),
        target: str = typer.Option("gemma3-270m", help="Target name, .gguf file or HF directory."),
        drafter: str = typer.Option(None, help="Drafter directory (default: the shipped one); 'none' = target only."),
        out: str = typer.Option(..., help="Output directory: OUT/target and OUT/drafter (MLX), OUT/target.gguf and "
                                          "OUT/drafter.gguf (GGUF), OUT/target.onnx and OUT/drafter.onnx (ONNX), "
                                          "OUT/target.mlpackage (+ drafter.mlpackage with --compute ane) (Core ML)."),
        quant: str = typer.Option(None, help="Every format: none (default) | int8 | int4. MLX: int8/int4 = 8/4-bit "
                                             "weights in groups of 64, none = unquantized in --dtype. GGUF: int8 = "
                                             "q8_0, int4 = q4_k_m, none = a GGUF target's own tensors byte for byte "
                                             "(source), any other target f32; or a GGUF type: source f32 f16 bf16 "
                                             "q8_0 q5_0 q5_1 q4_0 q4_1 q4_k_m (and llama.cpp's other K-quants). "
                                             "ONNX: none = float32, int8 / int4 = ONNX Runtime's MatMulNBits "
                                             "(int4: the embedding too, GatherBlockQuantized). Core ML: none = "
                                             "float16, int8 / int4 = per-block weights (int4 keeps the embedding at "
                                             "8 bits)."),
        drafter_quant: str = typer.Option(None, "--drafter-quant",
                                          help="GGUF: none = f32 | int8 = q8_0 (default: keeps the centroid head's "
                                               "rows exact enough and readable by mtpkit's llama.cpp backend) | int4 = "
                                               "q4_0, or a type: f32 f16 bf16 q8_0 q5_0 q5_1 q4_0 q4_1. ONNX: none | "
                                               "int8 | int4 (default: int8 with a float32 target, else --quant)."),
        dtype: str = typer.Option(None, help="MLX: float32 | bfloat16 (default) | float16 for unquantized tensors."),
        compute: str = typer.Option(None, help="Core ML: gpu (default: the KV cache in Core ML states shared by "
                                               "target and drafter) | ane (Neural Engine: explicit K/V inputs)."),
        context: int = typer.Option(None, help="Core ML: positions the exported cache holds (default 2048)."),
        max_draft: int = typer.Option(None, "--max-draft", help="Core ML: drafts the verify function takes in one "
                                                               "call (K; default 5)."),
        force: bool = typer.Option(False, "--force", help="Write into a non-empty --out: the export replaces its own "
                                                        "entries there (atomically, only once its checks passed) "
                                                        "and leaves other files alone; an entry of an earlier "
                                                        "export that this one does not write (drafter.gguf after "
                                                        "--drafter none) is removed, and the result says so."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Export target and drafter to MLX, GGUF, ONNX or Core ML, then load the exported target back and compare its
    logits with the reference; nothing lands in --out unless that check passed. Steps on stderr."""
    from mtpkit.export import export_module, summary_line
    fmt = export_module(format)
    o = Path(out)
    check_out(o, force)
    given = {"drafter_quant": drafter_quant, "compute": compute, "context": context, "max_draft": max_draft}
    options = {k: v for k, v in given.items() if v is not None}
    res = fmt.export(target, drafter, o, quant=quant, dtype=dtype, **options)  # OSErrors: mtpkit.cli's one line
    typer.echo(json.dumps(res) if as_json else summary_line(res))
