"""Typer commands `bench`, `report`, `predict` and `profile-device` (registered by mtpkit.cli)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mtpkit.errors import MtpkitError
from mtpkit.paths import check_writable


def _out_path(path: str | None, suffix: str, flag: str) -> Path | None:
    """Check an output path before the (long) run, so a typo fails in a second, not after the bench."""
    if path is None:
        return None
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise MtpkitError(f"{flag} expects a {suffix} file, got {path!r}")
    if p.is_dir():
        raise MtpkitError(f"{flag} {path} is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    check_writable(parent, f"{flag} {path}")
    return p


def bench_command(
        target: str = typer.Option("gemma3-270m", help="Target name, .gguf file or HF directory."),
        drafter: str = typer.Option(None, help="Drafter directory (default: the shipped one)."),
        backend: str = typer.Option("torch", help="Runtime backend for plain and speculative decoding."),
        device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
        dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)."),
        suite: str = typer.Option("humaneval", help="humaneval | mtbench | everyday | FILE.jsonl (lines with 'prompt' or 'turns')."),
        limit: int = typer.Option(8, help="Number of prompts: the first N, taken in turn from each category if several."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
        temperature: float = typer.Option(0.0, help="0 = greedy (then outputs are checked for identity)."),
        num_draft_tokens: int = typer.Option(5, "--num-draft-tokens", "-k",
                                             help="The most drafts per round (the gate picks 0..k; fixed k with --gate off)."),
        gate: str = typer.Option("on", help="on: the online gate picks each round's k (the default everywhere) | off: "
                                            "always k | both: also run `speculative_fixed_k` (always k) beside it."),
        branches: int = typer.Option(1, "--branches", help="Sampling: draft trees of this many first-draft candidates "
                                     "a round (torch backend); `speculative_chain` (one chain) runs beside them."),
        verify_rows: str = typer.Option("lazy", "--verify-rows", help="lazy: the target's head only for the rows "
                                        "acceptance reads, where the backend can (llama.cpp) | all | both: also run "
                                        "`speculative_all_rows` beside it."),
        pipeline: str = typer.Option("on", "--pipeline", help="on: drafting rounds queued ahead of the host where the "
                                     "backend can (torch on CUDA) | off | both: also run `speculative_sync` beside it."),
        verify: str = typer.Option("block", "--verify", help="Sampling: a chain's drafts (a tree's accepted one "
                                   "too) judged by block (block verification, the default) | token (token-wise "
                                   "rejection) | both: also run `speculative_token`."),
        min_confidence: float = typer.Option(None, "--min-confidence",
                                             help="Adaptive drafting threshold, as in `mtpkit run` (default: per backend, "
                                                  "off on GPU; 0 = off)."),
        repeats: int = typer.Option(3, help="Timed runs per prompt and method (median reported; a warm-up run is extra)."),
        threads: int = typer.Option(None, help="CPU threads for torch and llama.cpp (default: torch's)."),
        baselines: str = typer.Option("auto", help="auto (every installed one that fits the backend) | none | comma list of hf, llamacpp, llama_server, mlx_lm, torch."),
        llamacpp_bin: str = typer.Option(None, "--llamacpp-bin", help="Directory of llama.cpp's programs for the "
                                         "llama_server baseline (default: $MTPKIT_LLAMACPP_BIN, else the build of "
                                         "devices/llamacpp/build.sh)."),
        lookup_tokens: int = typer.Option(10, "--lookup-tokens", help="Draft length of the prompt-lookup baselines."),
        seed: int = typer.Option(0),
        compile: str = typer.Option(None, "--compile", help="torch on CUDA: torch.compile the graph-captured steps: "
                                                            "all (default: target and drafter), drafter, none."),
        json_out: str = typer.Option(None, "--json", help="Write the result document here (schema: docs/bench.md)."),
        markdown_out: str = typer.Option(None, "--markdown", help="Write the Markdown table here."),
        plot_out: str = typer.Option(None, "--plot", help="Write a PNG: acceptance per position, speedup per category."),
        quiet: bool = typer.Option(False, help="No progress bar and no table on stdout."),
) -> None:
    """Benchmark plain vs speculative decoding and the installed baselines, interleaved in one process."""
    from mtpkit.bench.report import markdown, plot
    from mtpkit.bench.runner import BenchConfig, run_bench
    from mtpkit.bench.schema import write_json
    jp = _out_path(json_out, ".json", "--json")
    mp = _out_path(markdown_out, ".md", "--markdown")
    pp = _out_path(plot_out, ".png", "--plot")
    if pp is not None:
        _need_matplotlib()
    cfg = BenchConfig(target=target, drafter=drafter, backend=backend, device=device, dtype=dtype, suite=suite,
                      limit=limit, max_new_tokens=max_new_tokens, temperature=temperature,
                      num_draft_tokens=num_draft_tokens, min_confidence="auto" if min_confidence is None else min_confidence,
                      repeats=repeats, seed=seed, threads=threads, baselines=baselines, lookup_tokens=lookup_tokens,
                      compile=compile, gate=gate, branches=branches, llamacpp_bin=llamacpp_bin,
                      verify_rows=verify_rows, pipeline=pipeline, verify=verify)
    doc = run_bench(cfg, note=lambda s: typer.echo(f"note: {s}", err=True), progress=not quiet)
    table = markdown(doc)
    if jp:
        write_json(doc, jp)
    if mp:
        mp.parent.mkdir(parents=True, exist_ok=True)
        mp.write_text(table)
    if pp:
        plot(doc, pp)
    if not quiet:
        typer.echo(table)
    if doc["greedy_mismatch"]:
        typer.echo(f"warning: greedy outputs differ from their reference for {', '.join(doc['greedy_mismatch'])}",
                   err=True)
        if "speculative" in doc["greedy_mismatch"]:
            raise typer.Exit(1)


def _read_doc(path: str) -> dict:
    from mtpkit.bench.schema import check_document
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise MtpkitError(f"{path} is not JSON: {e.msg}") from None
    check_document(doc, path)
    return doc


def report_command(
        results: str = typer.Argument(..., help="A bench JSON (from `mtpkit bench --json`)."),
        markdown_out: str = typer.Option(None, "--markdown", help="Write the Markdown table here."),
        plot_out: str = typer.Option(None, "--plot", help="Write the PNG plots here."),
) -> None:
    """Print the Markdown table of a bench JSON and draw its plots (e.g. for a run made on a phone)."""
    from mtpkit.bench.report import markdown, plot
    mp = _out_path(markdown_out, ".md", "--markdown")
    pp = _out_path(plot_out, ".png", "--plot")
    doc = _read_doc(results)
    table = markdown(doc)
    if mp:
        mp.parent.mkdir(parents=True, exist_ok=True)
        mp.write_text(table)
    if pp:
        _need_matplotlib()
        plot(doc, pp)
    typer.echo(table)


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MtpkitError("--plot needs matplotlib (pip install -e '.[bench]')") from None


def predict_command(
        results: str = typer.Argument(..., help="A bench JSON (from `mtpkit bench --json`)."),
        profile: str = typer.Option(None, "--profile", "-p",
                                    help="Comma list of profile names (devices/profiles) or JSON files; default: all."),
        runtime: str = typer.Option(None, help="The runtime to estimate for on every profile: torch-cuda | torch-cpu | "
                                               "llamacpp | mlx | coreml (default: each profile's own)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Expected speedup of the measured drafter on device profiles, from the bench's tau, k and costs."""
    from mtpkit.bench.predict import RUNTIMES, load_profiles, predict_all, validation
    if runtime is not None and runtime not in RUNTIMES:
        raise MtpkitError(f"--runtime {runtime!r}: one of {' | '.join(RUNTIMES)}")
    doc = _read_doc(results)
    profiles = load_profiles([p.strip() for p in profile.split(",") if p.strip()] if profile else None)
    rows = predict_all(doc, profiles, runtime)
    val = validation(doc, profiles)
    if as_json:
        typer.echo(json.dumps({"from": results, "predictions": rows, "validation": val}, indent=2))
        return
    typer.echo(f"{'profile':<16} {'runtime':<10} {'target step ms':>14} {'drafter step ms':>15} {'verify rel':>10} "
               f"{'speedup':>8}")
    for r in rows:
        typer.echo(f"{r['profile']:<16} {r['runtime']:<10} {r['target_step_ms']:>14.2f} {r['drafter_step_ms']:>15.3f} "
                   f"{r['verify_rel']:>10.2f} {r['speedup']:>7.2f}x")
    if val:
        costs = val["from_measured_costs"]
        typer.echo(f"\nmeasured on {val['profile']}: speedup {val['measured_speedup']:.2f}x, predicted "
                   f"{val['predicted_speedup']:.2f}x (error {100 * val['error']:+.0f}%) with the dispatch overhead fitted "
                   f"to plain decoding ({val['fitted_overhead_us_per_layer']:.0f} us/layer)"
                   + (f"; from the measured c and verify cost {costs:.2f}x" if costs else ""))


def profile_device_command(
        out: str = typer.Option(..., help="Where to write the profile JSON (e.g. devices/profiles/my-laptop.json)."),
        name: str = typer.Option(None, help="Profile name (default: the file's stem)."),
        kind: str = typer.Option("cpu", help="laptop | phone | consumer-gpu | datacenter-gpu | cpu"),
        device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
        dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)."),
        threads: int = typer.Option(None, help="CPU threads (default: torch's)."),
) -> None:
    """Measure this machine's effective bandwidth and matmul throughput into a device profile."""
    from mtpkit.bench.device import measure, profile
    from mtpkit.bench.schema import write_json
    p = _out_path(out, ".json", "--out")
    m = measure(device, dtype, threads)
    prof = profile(name or p.stem, kind, m)
    write_json(prof, p)
    typer.echo(json.dumps(prof, indent=2))
