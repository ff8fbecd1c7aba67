"""Expected speculative speedup on a device profile, from a bench document's tau, k and model sizes.

Cost of one forward of n tokens through a model with P weights read, W of them per token in matmuls,
L dispatch units (layers + head), on a device with memory bandwidth B and matmul throughput F:

    T(n) = L * o  +  P * bytes_per_weight / (eta_bw * B)  +  2 * W * (n - 1) / (eta_f * F)

o is the runtime's dispatch overhead per layer; the first token's matmuls hide under the weight reads
(memory-bound), each further token costs its FLOPs (the marginal throughput F). One speculative round = s drafter steps + one target
forward of (1 + s) tokens and yields tau tokens, so

    speedup = tau * T_target(1) / (s * T_drafter(1) + T_target(1 + s))

with s = draft steps per target forward (k, or fewer with adaptive drafting) and tau from the bench.
Profiles (`devices/profiles/*.json`) give B and F: vendor peak figures (eta_bw 0.7, eta_f 0.3 of them,
o from the runtime table below: assumptions, stated in every prediction) or figures measured on the
device (`mtpkit profile-device`: eta = 1, as measured). Validation: on a measured profile the per-layer
overhead o is fitted from the bench's *plain* decode step alone; the speculative speedup predicted from
that is compared with the measured one (`validation`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtpkit.errors import MtpkitError

PROFILES_DIR = Path(__file__).resolve().parents[2] / "devices" / "profiles"
# runtime -> bytes per weight of its usual precision, assumed dispatch overhead per layer (seconds)
RUNTIMES = {
    "torch-cuda": {"bytes_per_weight": 2.0, "overhead_s": 20e-6, "precision": "bf16, CUDA graphs"},
    "torch-cpu": {"bytes_per_weight": 4.0, "overhead_s": 30e-6, "precision": "fp32"},
    "llamacpp": {"bytes_per_weight": 4.85 / 8, "overhead_s": 15e-6, "precision": "Q4_K_M"},
    "mlx": {"bytes_per_weight": 2.0, "overhead_s": 25e-6, "precision": "bf16"},
    "coreml": {"bytes_per_weight": 2.0, "overhead_s": 40e-6, "precision": "fp16"},
}
VENDOR_ETA_BW, VENDOR_ETA_F = 0.7, 0.3


def load_profiles(names: list[str] | None = None) -> list[dict[str, Any]]:
    """Profiles by name (devices/profiles/NAME.json) or path; None = every profile in devices/profiles."""
    if names is None:
        if not PROFILES_DIR.is_dir():
            raise MtpkitError(f"no profiles directory {PROFILES_DIR} (a source checkout has it): pass --profile FILE")
        paths = sorted(PROFILES_DIR.glob("*.json"))
    else:
        paths = []
        for n in names:
            p = Path(n) if n.endswith(".json") else PROFILES_DIR / f"{n}.json"
            if not p.is_file():
                have = ", ".join(sorted(q.stem for q in PROFILES_DIR.glob("*.json"))) if PROFILES_DIR.is_dir() else "none"
                raise MtpkitError(f"unknown profile {n!r} (have: {have})")
            paths.append(p)
    out = []
    for p in paths:
        try:
            prof = json.loads(p.read_text())
            float(prof["memory_bandwidth_gbs"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise MtpkitError(f"bad profile {p}: {e}") from None
        out.append(prof)
    return out


def _throughput(prof: dict[str, Any], runtime: str) -> tuple[float, float]:
    """(effective bytes/s, effective matmul FLOP/s) of a profile for a runtime's precision."""
    measured = prof.get("figures") == "measured"
    bw = float(prof["memory_bandwidth_gbs"]) * 1e9 * (1.0 if measured else VENDOR_ETA_BW)
    fl = prof.get("compute_tflops") or {}
    key = "fp32" if RUNTIMES[runtime]["bytes_per_weight"] >= 4 else "fp16"
    f = fl.get(key) or fl.get("fp16") or fl.get("fp32")
    if not f:
        raise MtpkitError(f"profile {prof['name']} has no compute_tflops")
    return bw, float(f) * 1e12 * (1.0 if measured else VENDOR_ETA_F)


def forward_s(params_read: float, matmul_params: float, layers: int, n: int, bw: float, flops: float,
              bytes_per_weight: float, overhead_s: float) -> float:
    return layers * overhead_s + params_read * bytes_per_weight / bw + 2.0 * matmul_params * (n - 1) / flops


def _inputs(doc: dict[str, Any]) -> dict[str, float]:
    spec = doc["summary"].get("speculative")
    models = doc.get("models") or {}
    if not spec or not spec.get("tau") or not models.get("drafter"):
        raise MtpkitError("the bench document has no speculative results with a drafter")
    t, d = models["target"], models["drafter"]
    s = spec.get("draft_steps_per_forward")
    s = float(doc["settings"]["num_draft_tokens"]) if s is None else s
    return {"tau": spec["tau"], "s": s, "tP": t["params"], "tL": t["layers"] + 1,
            # the embedding lookup reads a few rows; the tied head multiplies by all of them
            "tW": t["params"], "dP": d["params_read_per_step"], "dW": d["params_read_per_step"], "dL": d["blocks"] + 1}


def predict(doc: dict[str, Any], prof: dict[str, Any], runtime: str | None = None,
            overhead_s: float | None = None) -> dict[str, Any]:
    x = _inputs(doc)
    runtime = runtime or prof.get("runtime") or _default_runtime(prof)
    rt = RUNTIMES[runtime]
    bw, fl = _throughput(prof, runtime)
    o = rt["overhead_s"] if overhead_s is None else overhead_s
    b = rt["bytes_per_weight"]
    t1 = forward_s(x["tP"], x["tW"], x["tL"], 1, bw, fl, b, o)
    tv = forward_s(x["tP"], x["tW"], x["tL"], 1 + x["s"], bw, fl, b, o)
    td = forward_s(x["dP"], x["dW"], x["dL"], 1, bw, fl, b, o)
    sp = x["tau"] * t1 / (x["s"] * td + tv)
    return {"profile": prof["name"], "runtime": runtime, "precision": rt["precision"],
            "figures": prof.get("figures", "vendor"), "overhead_us_per_layer": o * 1e6,
            "target_step_ms": t1 * 1e3, "drafter_step_ms": td * 1e3, "c": td / t1, "verify_rel": tv / t1,
            "plain_tok_per_s": 1 / t1, "speedup": sp, "tau": x["tau"], "draft_steps_per_forward": x["s"]}


def _default_runtime(prof: dict[str, Any]) -> str:
    rts = prof.get("runtimes") or []
    kind = prof.get("kind", "")
    if "torch" in rts or kind == "datacenter-gpu":
        return "torch-cuda"
    for r in ("mlx", "llamacpp", "coreml"):
        if r in rts:
            return r
    return "torch-cpu"


def predict_all(doc: dict[str, Any], profiles: list[dict[str, Any]], runtime: str | None = None) -> list[dict[str, Any]]:
    return [predict(doc, p, runtime) for p in profiles]


def _measured_runtime(doc: dict[str, Any]) -> str:
    if doc["settings"].get("backend") == "mlx":
        return "mlx"
    return "torch-cuda" if doc["machine"].get("gpu") else "torch-cpu"


def fit_overhead(doc: dict[str, Any], prof: dict[str, Any]) -> float:
    """Per-layer dispatch overhead that makes the model reproduce the bench's plain decode step."""
    x = _inputs(doc)
    runtime = _measured_runtime(doc)
    bw, fl = _throughput(prof, runtime)
    measured = 1.0 / doc["summary"]["plain"]["tok_per_s"]
    rest = forward_s(x["tP"], x["tW"], 0, 1, bw, fl, RUNTIMES[runtime]["bytes_per_weight"], 0.0)
    return max(measured - rest, 0.0) / x["tL"]


def matching_profile(doc: dict[str, Any], profiles: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The profile describing the machine that produced `doc` (its `match` strings), if any."""
    m = doc["machine"]
    key = f"{m.get('gpu') or ''} | {m.get('cpu') or ''} | threads={doc['settings'].get('threads')}"
    for p in profiles:
        pats = p.get("match") or []
        if pats and all(s in key for s in pats):
            return p
    return None


def validation(doc: dict[str, Any], profiles: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Predicted vs measured speedup on the machine that produced `doc`, when a profile matches it."""
    prof = matching_profile(doc, profiles)
    if prof is None:
        return None
    o = fit_overhead(doc, prof)
    pred = predict(doc, prof, runtime=_measured_runtime(doc), overhead_s=o)
    spec = doc["summary"]["speculative"]
    x = _inputs(doc)
    costs = x["tau"] / (spec["verify_rel"] + x["s"] * spec["c"]) if spec.get("verify_rel") and spec.get("c") else None
    return {"profile": prof["name"], "fitted_overhead_us_per_layer": o * 1e6, "measured_speedup": spec["speedup"],
            "predicted_speedup": pred["speedup"], "error": pred["speedup"] / spec["speedup"] - 1,
            "predicted_c": pred["c"], "measured_c": spec["c"], "predicted_verify_rel": pred["verify_rel"],
            "measured_verify_rel": spec["verify_rel"], "from_measured_costs": costs,
            "from_measured_costs_error": costs / spec["speedup"] - 1 if costs else None}
