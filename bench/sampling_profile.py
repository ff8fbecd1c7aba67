"""What sampling costs on one CUDA GPU: a T = 1 round's acceptance (k drafts against k + 1 target rows of a
262k vocabulary) and a sampled plain step's pick, as CUDA graphs, on random logits (cost does not depend on values).
Issue 17: a sampled round cost 0.24 ms more than a greedy one on the H100 (results: bench/results/gpu_sampling/).

Variants: `accept_probs` = the rule before (probabilities of all k + 1 rows, then sampling.accept_rejection);
`accept_lse` = sampling.accept_rejection_logits (each row's log-sum-exp, p only at the drafts and the one row drawn
from); `accept_padded` = that with k as a device scalar (the backend's one graph for every k); `accept_greedy` = T = 0
on the device, for scale; `plain_probs` / `plain_argmax` = a sampled / greedy plain step's pick; `+pick2` = the
inverse CDF in two levels (pick_two_level, not shipped); `compiled` = torch.compile'd before capture (as the backend
does with --compile). Each sampled variant's outcome is compared with `accept_probs` / `plain_probs` eager on random
rounds (`differs_from_before`: float rounding can move a pick that falls within rounding of a boundary).

    python bench/sampling_profile.py [-k 5] [--trials 200] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_step_profile import gpu_ms, kernels  # noqa: E402

from mtpkit.runtime import sampling  # noqa: E402
from mtpkit.runtime.sampling import SamplingParams  # noqa: E402
from mtpkit.runtime.torch_backend import TorchOps  # noqa: E402

V, CANDIDATES = 262144, 4096


def pick_two_level(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """TorchOps.pick as two short scans instead of one over all of p (measured here, not shipped): block sums and
    their cumsum find the block, a cumsum within it the index; never past the block's last p > 0."""
    n = p.numel()
    b = 1 << (max(n - 1, 1).bit_length() + 1) // 2  # a power of two >= sqrt(n)
    blocks = torch.nn.functional.pad(p.double(), (0, -n % b)).view(-1, b)
    c = blocks.sum(1).cumsum(0)
    t = u.double() * c[-1]
    i = (c <= t).sum().clamp_max(c.numel() - 1)
    base = torch.cat([c.new_zeros(1), c]).index_select(0, i.view(1))
    blk = blocks.index_select(0, i.view(1))[0]
    j = (blk.cumsum(0) + base <= t).sum()
    last = ((blk > 0) * torch.arange(b, device=p.device)).amax()
    return (i * b + torch.minimum(j, last)).clamp_max(n - 1)


def capture(fn, inputs):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*inputs)
    return g, out


def variants(ops, kt=None) -> dict:
    """kt: k as a 0-d device tensor (made before any capture)."""
    sp = SamplingParams(temperature=1.0)

    def accept_probs(lg, toks, picks, q, ids, u):  # the rule before (probabilities of all k + 1 rows)
        return torch.stack(sampling.accept_rejection(ops, toks, picks, q, ids, sampling.probs(ops, lg, sp), u))

    def accept_lse(lg, toks, picks, q, ids, u):
        return torch.stack(sampling.accept_rejection_logits(ops, toks, picks, q, ids, lg, sp, u))

    def accept_padded(lg, toks, picks, q, ids, u):  # as the backend's graph: k live of max_draft = k here
        return torch.stack(sampling.accept_rejection_logits(ops, toks, picks, q, ids, lg, sp, u, kt))

    def accept_greedy(lg, toks, picks, q, ids, u):
        return torch.stack(sampling.accept_greedy_device(ops, toks, lg))

    def plain_probs(lg, u):
        return ops.pick(sampling.probs(ops, lg[0], sp), u[0])

    def plain_argmax(lg, u):
        return lg[0].argmax()
    return {f.__name__: f for f in (accept_probs, accept_lse, accept_padded, accept_greedy, plain_probs, plain_argmax)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--trials", type=int, default=200, help="random rounds each variant's outcome is checked on")
    ap.add_argument("--json")
    a = ap.parse_args()
    t0 = time.perf_counter()
    dev, k = torch.device("cuda"), a.k
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "k": k, "vocab": V}
    g = torch.Generator(device=dev).manual_seed(0)
    lg = (torch.randn(k + 1, V, device=dev, generator=g) * 3).bfloat16()
    ids = torch.stack([torch.randperm(V, device=dev, generator=g)[:CANDIDATES] for _ in range(k)])
    q = torch.softmax(torch.randn(k, CANDIDATES, device=dev, generator=g) * 2, -1)
    picks = torch.multinomial(q, 1, generator=g)[:, 0]
    toks = ids.gather(1, picks[:, None])[:, 0]
    u = torch.rand(k + 1, device=dev, generator=g)
    kt = torch.tensor(k, device=dev)
    ins = {"accept": (lg, toks, picks, q, ids, u), "plain": (lg, u)}
    rows = []
    for mode in ("eager", "compiled"):
        for pick2 in (False, True):
            ops = TorchOps(dev)
            if pick2:
                ops.pick = pick_two_level
            for name, fn in variants(ops, kt).items():
                if pick2 and name in ("plain_argmax", "accept_greedy", "accept_padded"):
                    continue
                if mode == "compiled" and name not in ("accept_lse", "accept_padded", "plain_probs"):
                    continue  # (a compile takes seconds: only the candidates)
                f = torch.compile(fn, fullgraph=True, dynamic=False) if mode == "compiled" else fn
                inputs = ins[name.split("_")[0]]
                try:
                    graph, out = capture(f, inputs)
                    nk, busy, top = kernels(graph.replay)
                    row = {"name": name + ("+pick2" if pick2 else ""), "mode": mode, "ms": gpu_ms(graph.replay, 200),
                           "kernels": nk, "kernel_ms": busy, "top": top[:8]}
                except Exception as e:  # a variant that does not compile is reported, not fatal
                    row = {"name": name + ("+pick2" if pick2 else ""), "mode": mode, "error": f"{type(e).__name__}: {e}"[:300]}
                rows.append(row)
                if "error" not in row and "argmax" not in name and "greedy" not in name:
                    row["differs_from_before"] = check(f, name, k, dev, a.trials)
                print(json.dumps({x: y for x, y in row.items() if x != "top"}), flush=True)
    res["variants"] = rows
    res["wall_s"] = time.perf_counter() - t0
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


def check(f, name: str, k: int, dev, trials: int) -> int:
    """Rounds (of `trials`, random logits and drafts) where f's outcome differs from the shipped eager rule's."""
    ref = variants(TorchOps(dev))["accept_probs" if name.startswith("accept") else "plain_probs"]
    g = torch.Generator(device=dev).manual_seed(1)
    bad = 0
    for _ in range(trials):
        lg = (torch.randn(k + 1, V, device=dev, generator=g) * 3).bfloat16()
        # candidates: the target's top 64 first (so rounds accept some and reject some), then others, all distinct
        order = torch.stack([torch.randperm(V, device=dev, generator=g) for _ in range(k)])
        order.scatter_(1, lg[:k].float().topk(64, -1).indices, -1)  # (a sort by this puts them first)
        ids = order.argsort(1)[:, :CANDIDATES]
        q = torch.softmax(torch.randn(k, CANDIDATES, device=dev, generator=g) + (torch.arange(CANDIDATES, device=dev) < 64) * 6, -1)
        picks = torch.multinomial(q, 1, generator=g)[:, 0]
        toks = ids.gather(1, picks[:, None])[:, 0]
        u = torch.rand(k + 1, device=dev, generator=g)
        args = (lg, toks, picks, q, ids, u) if name.startswith("accept") else (lg, u)
        bad += int(not torch.equal(f(*args), ref(*args)))
    return bad


if __name__ == "__main__":
    main()
