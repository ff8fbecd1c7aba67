"""Where an ONNX draft step spends its time: ONNX Runtime's profiler over repeated draft steps of DIR/drafter.onnx
(random inputs, a context of --context positions), summed per operator type and per node, in ms per step.

    mtpkit export --format onnx --out DIR
    python bench/onnx_node_profile.py DIR [--threads 2] [--context 300] [--steps 50] [--json F]

It found the centroid head's candidate logits run as a batched MatMul [32, 128, 640] @ [640] at 3.7 ms of a
9.7 ms step on this repo's CPU; as one Gemm (onnx_graphs.DrafterGraph) they take 0.4 ms.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import onnxruntime as ort
    d = Path(a.dir)
    m = json.loads((d / "onnx.json").read_text())
    c = m["target_config"]
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.enable_profiling = a.threads, True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "drafter")
    sess = ort.InferenceSession(str(d / m["drafter"]["file"]), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"token": np.array([5], np.int64), "position": np.array([a.context], np.int64),
            "h": rng.standard_normal((1, c["hidden_size"])).astype(np.float32)}
    for name in m["drafter"]["inputs"][3:]:
        feed[name] = rng.standard_normal((1, c["num_key_value_heads"], a.context, c["head_dim"])).astype(np.float32)
    ts = []
    for _ in range(2 * a.steps):  # the first half warms up (profiled too, and divided out below)
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t0)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op, by_node, count = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
            by_node[e["name"].removesuffix("_kernel_time")] += e["dur"]
    runs = 2 * a.steps
    out = {"dir": str(d), "threads": a.threads, "context": a.context,
           "step_ms": 1000 * statistics.median(ts[a.steps:]),
           "kernels_ms": sum(by_op.values()) / runs / 1000, "nodes_per_step": sum(count.values()) / runs,
           "by_op_ms": {k: round(v / runs / 1000, 4) for k, v in by_op.most_common()},
           "top_nodes_ms": {k: round(v / runs / 1000, 4) for k, v in by_node.most_common(12)}}
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
