"""`mtpkit export --format mlx|gguf ...` (registered by mtpkit.cli). Core ML and ONNX are not built yet."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from mtpkit.errors import MtpkitError

FORMATS = ("mlx", "gguf")


def export_command(
        format: str = typer.Option(..., "--format", help="mlx | gguf (coreml, onnx: not built yet)."),
        target: str = typer.Option("gemma3-270m", help="Target name, .gguf file or HF directory."),
        drafter: str = typer.Option(None, help="Drafter directory (default: the shipped one); 'none' = target only."),
        out: str = typer.Option(..., help="Output directory: OUT/target and OUT/drafter (MLX), OUT/target.gguf and "
                                          "OUT/drafter.gguf (GGUF)."),
        quant: str = typer.Option(None, help="MLX: 4 or 8 (bits, group size 64). GGUF: the target's type: source "
                                             "(default: a GGUF target's own tensors, byte for byte), f32 f16 bf16 q8_0 "
                                             "q5_0 q5_1 q4_0 q4_1, or a llama.cpp K-quant (q4_k_m ...)."),
        drafter_quant: str = typer.Option("q8_0", "--drafter-quant",
                                          help="GGUF: the drafter's type (q8_0 keeps the centroid head's rows exact "
                                               "enough and readable by mtpkit's llama.cpp backend)."),
        dtype: str = typer.Option("bfloat16", help="float32 | bfloat16 | float16 for unquantized tensors."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Export target and drafter, then load the target back and compare its logits with the reference."""
    if format not in FORMATS:
        raise MtpkitError(f"export format {format!r} is not available (have: {', '.join(FORMATS)})")
    o = Path(out)
    if o.exists() and not o.is_dir():
        raise MtpkitError(f"--out {out} exists and is not a directory")
    if format == "gguf":
        from mtpkit.export.gguf import export_gguf
        res = export_gguf(target, drafter, o, quant or "source", drafter_quant, dtype_given=dtype != "bfloat16")
        if as_json:
            typer.echo(json.dumps(res))
        else:
            v = res["vs_reference"]
            typer.echo(f"wrote {o}/target.gguf ({res['quant']}, {res['target']['mb']} MB)"
                       + (f" and {o}/drafter.gguf ({res['drafter_quant']}, {res['drafter']['mb']} MB)" if res["drafter"] else "")
                       + f"; llama.cpp target vs reference over {res['probe_tokens']} tokens: max |logit diff| "
                       f"{v['max_abs_logit_diff']:.3g} (tolerance {v['tolerance']}), argmax agreement "
                       f"{100 * v['argmax_agreement']:.0f}%"
                       + (f"; drafter step vs reference: max |logit diff| {res['drafter_check']['max_abs_logit_diff']:.3g}"
                          if res.get("drafter_check") else "") + f"; {res['seconds']} s")
        return
    try:
        quant = None if quant is None else int(quant)
    except ValueError:
        raise MtpkitError(f"--quant must be 4 or 8 for MLX, got {quant!r}") from None
    from mtpkit.runtime.mlx_blas import use_openblas
    use_openblas()  # Linux: MLX's float32 matmuls through OpenBLAS (the export's check runs the model)
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError:
        raise MtpkitError("--format mlx needs mlx and mlx-lm (pip install -e '.[mlx]')") from None
    from mtpkit.api import resolve_drafter
    from mtpkit.export.mlx import QUANT_BITS, check_target, mlx_config, write_target
    from mtpkit.model.load import load_drafter, load_target, save_drafter
    if quant is not None and quant not in QUANT_BITS:  # before the (slow) target load
        raise MtpkitError(f"--quant must be one of {QUANT_BITS} for MLX, got {quant}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise MtpkitError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    import torch
    t0 = time.perf_counter()
    t = load_target(target)
    mlx_config(t.config, quant)  # refuse what mlx-lm cannot express before writing anything
    dpath = resolve_drafter(target, drafter)
    d = load_drafter(dpath, t.config) if dpath is not None else None
    write_target(t.model, t.tokenizer, o / "target", dtype=dtype, quant=quant)
    if d is not None:
        save_drafter(d, o / "drafter", dtype=getattr(torch, dtype))
    probe = (t.tokenizer.encode("def fibonacci(n):\n    ") if t.tokenizer is not None else [2, 3, 4, 5])[:32]
    check = check_target(t.model, o / "target", probe)
    res = {"format": "mlx", "out": str(o), "target": str(o / "target"), "drafter": str(o / "drafter") if d else None,
           "dtype": dtype, "quant": quant, "vs_reference": check, "probe_tokens": len(probe),
           "seconds": round(time.perf_counter() - t0, 1)}
    (o / "export.json").write_text(json.dumps(res, indent=2))
    if as_json:
        typer.echo(json.dumps(res))
    else:
        typer.echo(f"wrote {o}/target" + (f" and {o}/drafter" if d else "") + f" ({dtype}"
                   + (f", {quant}-bit" if quant else "") + f"); target vs reference over {len(probe)} tokens: max |logit diff| "
                   f"{check['max_abs_logit_diff']:.3g}, argmax agreement {100 * check['argmax_agreement']:.0f}%; "
                   f"{res['seconds']} s")
