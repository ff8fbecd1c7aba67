"""Measure a device profile with torch: the effective bandwidth and marginal matmul throughput that a
decode step of a small LLM actually sees (`mtpkit profile-device`).

Both come from one matrix shaped like a 262k-vocabulary output head (the largest read of a decode step):
  bandwidth  = its bytes / time of y = x @ W.T for 1 row (a memory-bound GEMV)
  throughput = 2 * params * 7 / (time for 8 rows - time for 1 row): what each extra verified token costs
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import torch


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.no_grad()
def measure(device: str | None = None, dtype: str | None = None, threads: int | None = None, rows: int = 262144,
            cols: int = 640, repeats: int = 20) -> dict[str, Any]:
    from mtpkit.runtime.torch_backend import torch_device_dtype
    dev, dt = torch_device_dtype(device, dtype)
    if threads is not None:
        torch.set_num_threads(threads)
    w = torch.randn(rows, cols, device=dev, dtype=dt)
    x1, x8 = torch.randn(1, cols, device=dev, dtype=dt), torch.randn(8, cols, device=dev, dtype=dt)
    if dev.type == "cuda":  # CUDA graphs remove launch overhead, as the runtime's own graphs do
        outs = {}
        for name, x in (("1", x1), ("8", x8)):
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                x @ w.T
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                outs[name] = x @ w.T
            outs[name + "g"] = g
        t1 = _time(outs["1g"].replay, dev, repeats)
        t8 = _time(outs["8g"].replay, dev, repeats)
    else:
        t1 = _time(lambda: x1 @ w.T, dev, repeats)
        t8 = _time(lambda: x8 @ w.T, dev, repeats)
    p = rows * cols
    bw = p * w.element_size() / t1
    fl = 2 * p * 7 / max(t8 - t1, 1e-9)
    key = "fp32" if dt == torch.float32 else "fp16"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {"memory_bandwidth_gbs": round(bw / 1e9, 2), "compute_tflops": {key: round(fl / 1e12, 4)},
            "measured_with": {"device": str(dev), "dtype": str(dt).removeprefix("torch."),
                              "threads": torch.get_num_threads(), "matrix": [rows, cols], "gemv_ms": t1 * 1e3,
                              "gemm8_ms": t8 * 1e3, "torch": torch.__version__, "platform": platform.platform()},
            "device_name": name}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile(name: str, kind: str, m: dict[str, Any]) -> dict[str, Any]:
    """A profile JSON (same keys as the vendor ones) from a measurement."""
    threads = m["measured_with"]["threads"]
    gpu = m["measured_with"]["device"].startswith("cuda")
    return {"name": name, "kind": kind, "description": f"{m['device_name']}" + ("" if gpu else f", {threads} threads"),
            "memory_gb": None, "memory_bandwidth_gbs": m["memory_bandwidth_gbs"], "compute_tflops": m["compute_tflops"],
            "compute_unit": "gpu" if gpu else "cpu", "npu_tops": None,
            "runtimes": ["torch"] if gpu else ["torch", "llamacpp"], "runtime": "torch-cuda" if gpu else "torch-cpu",
            "figures": "measured", "match": [m["device_name"]] + ([] if gpu else [f"threads={threads}"]),
            "sources": ["mtpkit profile-device"], "measured_with": m["measured_with"],
            "notes": "effective GEMV bandwidth and marginal 8-row matmul throughput on a 262144x640 matrix"}
