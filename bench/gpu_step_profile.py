"""Per-step costs of the torch backend on one CUDA GPU, with random Gemma 3 270M weights and a real drafter.

Timing does not depend on weight values, so this needs no target download. It reports, for CUDA-graph
replays timed with CUDA events: one plain step, one verify of k + 1 tokens and one k-step greedy draft
(GPU ms and kernels per replay), then the decode loop itself (plain ms/token with and without the fused
plain chunks, the bench's c and verify_rel) and whether speculative greedy output equals plain greedy on a
few random prompts.

    python bench/gpu_step_profile.py [--compile drafter|all] [--max-draft 16] [--no-fuse] [-k 5] [--drafter DIR]
                                     [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mtpkit.model.config import GemmaConfig
from mtpkit.model.gemma import GemmaModel
from mtpkit.model.load import load_drafter
from mtpkit.runtime.loop import PLAIN_CHUNK, GenerationParams, generate
from mtpkit.runtime.torch_backend import TorchBackend


def build(drafter: str, compile: str | None, max_len: int, max_draft: int, fuse: bool) -> TorchBackend:
    torch.manual_seed(0)
    with torch.device("cuda"):
        t = GemmaModel(GemmaConfig())
    t.to(dtype=torch.bfloat16).eval().requires_grad_(False)  # as load_target does
    d = load_drafter(drafter, t, dtype=torch.bfloat16, device="cuda")
    return TorchBackend(t, d, max_len=max_len, max_draft=max_draft, cuda_graphs=True, compile=compile, fuse=fuse)


def gpu_ms(fn, n: int = 100) -> float:
    """Median GPU ms of fn() over n calls, 5 groups timed with CUDA events."""
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n // 5):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / (n // 5))
    return statistics.median(times)


def kernels(fn) -> tuple[int, float, list]:
    """(kernels launched, their summed GPU ms, the 20 costliest kernel names [name, count, ms]) for one fn() call."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    ks = [e for e in p.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name and "Memset" not in e.name]
    by: dict[str, list] = {}
    for e in ks:
        row = by.setdefault(e.name[:90], [e.name[:90], 0, 0.0])
        row[1] += 1
        row[2] += e.device_time / 1000.0
    top = sorted(by.values(), key=lambda r: -r[2])[:20]
    return len(ks), sum(e.device_time for e in ks) / 1000.0, top


def steps(be: TorchBackend, k: int) -> dict:
    """GPU time of the three captured steps, replayed at a fixed position after a 200-token prompt."""
    torch.manual_seed(1)
    logits, h = be.start(torch.randint(0, 200_000, (200,)).tolist())
    tok = logits.argmax()
    p0 = be.length
    res = {}
    t0 = time.perf_counter()
    for n in (1, k + 1):
        be.verify(torch.full((n,), 7, device="cuda"))  # captures (and compiles) width n
        be.rollback(p0)
    be.fused_greedy_draft(tok, h, k)
    torch.cuda.synchronize()
    res["capture_s"] = time.perf_counter() - t0
    gr = be._graphs

    def draft():
        gr.draft_prep[0].replay()
        for g, _ in gr.draft_steps[:k]:
            g.replay()
    for name, replay in [("plain", gr.verify_graphs[gr.width or 1][0].replay),
                         (f"verify{k + 1}", gr.verify_graphs[gr.width or k + 1][0].replay), (f"draft{k}", draft)]:
        n, busy, top = kernels(replay)
        res[name] = {"ms": gpu_ms(replay), "kernels": n, "kernel_ms": busy, "top": top,
                     # each replay after a host sync, as in the decode loop: the launch is no longer hidden
                     "ms_synced": gpu_ms(lambda r=replay: (r(), torch.cuda.synchronize()))}
    sp = GenerationParams().sampling

    def chunk():  # 16 fused plain steps (graph + feed replays), then back to p0
        be.fused_plain(tok.view(1), 16, sp, None)
        be.rollback(p0)
    chunk()
    res["plain_chunk16_ms_per_token"] = gpu_ms(chunk, 20) / 16
    res["plain_chunk16_synced_ms_per_token"] = gpu_ms(lambda: (chunk(), torch.cuda.synchronize()), 20) / 16
    res["c_graph"] = res[f"draft{k}"]["ms"] / k / res["plain"]["ms"]
    res["verify_rel_graph"] = res[f"verify{k + 1}"]["ms"] / res["plain"]["ms"]
    try:
        res |= sampled_steps(be, tok, h, k, p0)
    except Exception as e:  # (a measuring aid: the rest of the profile stands without it)
        res["sampled_error"] = f"{type(e).__name__}: {e}"
    return res


def sampled_steps(be: TorchBackend, tok: torch.Tensor, h: torch.Tensor, k: int, p0: int) -> dict:
    """What a T = 1 round adds to a greedy one: the sampled draft graphs and the sampled acceptance graph (probs on
    k + 1 rows of the vocabulary, the residual, the pick; block verification, and token-wise rejection as
    `..._token`), beside acceptance at T = 0 on the device."""
    from mtpkit.runtime.sampling import SamplingParams, accept_greedy_device
    t1 = SamplingParams(temperature=1.0)
    d = be.fused_sampled_draft(tok, h, k, t1, torch.rand(k, device="cuda"))  # captures the sampled steps
    logits, _ = be.verify(torch.cat([tok.view(1), d.tokens]))
    be.rollback(p0)
    for verify in ("block", "token"):  # captures each rule's acceptance graph
        be.fused_accept(d, logits, t1, torch.rand(k + 1, device="cuda"), verify)
    gr = be._graphs

    def draft():
        gr.draft_prep[0].replay()
        for g, _ in gr.sampled_steps[t1][:k]:
            g.replay()
    out = {}
    for name, fn in [(f"draft{k}_t1", draft), (f"accept{k + 1}_t1", gr.accepts[t1, "block"][0].replay),
                     (f"accept{k + 1}_t1_token", gr.accepts[t1, "token"][0].replay),
                     (f"accept{k + 1}_greedy_device", lambda: accept_greedy_device(be.ops, d.tokens, logits))]:
        n, busy, top = kernels(fn)
        out[name] = {"ms": gpu_ms(fn), "kernels": n, "kernel_ms": busy, "top": top}
    return out


def invariance(be: TorchBackend, k: int) -> dict:
    """Max |difference| between a verify of n tokens (n = 2..k+1) and n single-token steps on the same tokens,
    after prompts of 100 and 700 tokens (a full sliding ring): 0 means a verify row is bitwise what plain
    decoding computes, so greedy speculative output cannot differ from plain."""
    worst = {"logits": 0.0, "hidden": 0.0, "argmax_equal": True}
    for plen in (100, 700):
        torch.manual_seed(3)
        be.start(torch.randint(0, 200_000, (plen,), device="cuda"))
        p0 = be.length
        for n in range(2, k + 2):
            toks = torch.randint(0, 200_000, (n,), device="cuda")
            lw, hw = (x.clone() for x in be.verify(toks))
            be.rollback(p0)
            rows = [tuple(x.clone() for x in be.verify(toks[i:i + 1])) for i in range(n)]
            be.rollback(p0)
            l1, h1 = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
            worst["logits"] = max(worst["logits"], float((lw - l1).abs().max()))
            worst["hidden"] = max(worst["hidden"], float((hw - h1).abs().max()))
            worst["argmax_equal"] &= bool((lw.argmax(-1) == l1.argmax(-1)).all())
    return worst


def timeline(be: TorchBackend, k: int, drafter: bool, rounds: int = 10) -> dict:
    """Profile `rounds` decode rounds: wall ms per round, GPU-busy ms per round, the costliest host ops."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(4)
    prompt = torch.randint(0, 200_000, (100,)).tolist()
    # (plain decoding: a round is a fused chunk of PLAIN_CHUNK tokens)
    gen = generate(be, prompt, GenerationParams(max_new_tokens=(rounds + 20) * PLAIN_CHUNK, num_draft_tokens=k), set(),
                   drafter)
    for _ in range(5):
        next(gen)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        for _ in range(rounds):
            next(gen)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    spans = sorted((e.time_range.start, e.time_range.end) for e in p.events() if e.device_type.name == "CUDA")
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    ops = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    return {"wall_ms_per_round": wall * 1e3 / rounds, "gpu_busy_ms_per_round": busy / 1e3 / rounds,
            "host_ops": [[e.key, e.count // rounds, e.self_cpu_time_total / 1e3 / rounds] for e in ops]}


def round_costs(be: TorchBackend, k: int, rounds: int = 150, repeats: int = 3, branches: tuple[int, ...] = ()) -> dict:
    """Wall ms per speculative round with k drafts (gate off, so every round drafts k whatever is accepted), greedy
    and sampled at T = 1: rounds queued ahead of the host (the default: loop.pipelined) and one at a time (`_sync`),
    sampled acceptance as one graph (fused_accept) and eager (the generic rule, host-synced twice), and draft trees
    of w chains (`t1_tree{w}`, pipelined; `_sync`: one at a time), alternated `repeats` times (median)."""
    from mtpkit.runtime.sampling import SamplingParams
    torch.manual_seed(5)
    prompt = torch.randint(0, 200_000, (100,)).tolist()
    fused = be.fused_accept

    def per_round(sp: SamplingParams, fa, pipeline: bool, w: int = 1) -> float:
        be.fused_accept = fa
        params = GenerationParams(max_new_tokens=(rounds + 10) * (k + 1), sampling=sp, num_draft_tokens=k, gate=False,
                                  pipeline=pipeline, branches=w)
        gen = generate(be, prompt, params, set())
        for _ in range(5):  # the prefill, then rounds that capture graphs
            next(gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(rounds):
            next(gen)
        torch.cuda.synchronize()
        gen.close()
        return (time.perf_counter() - t0) * 1e3 / rounds
    t1 = SamplingParams(temperature=1.0)
    variants = {"greedy": (SamplingParams(), fused, True), "greedy_sync": (SamplingParams(), fused, False),
                "t1_fused_accept": (t1, fused, True), "t1_fused_accept_sync": (t1, fused, False),
                "t1_eager_accept_sync": (t1, None, False)}
    for w in branches:
        variants |= {f"t1_tree{w}": (t1, fused, True, w), f"t1_tree{w}_sync": (t1, fused, False, w)}
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, v in variants.items():
            runs[name].append(per_round(*v))
    be.fused_accept = fused
    return {name: statistics.median(v) for name, v in runs.items()} | {"k": k, "rounds": rounds, "runs": runs}


def decode(be: TorchBackend, prompt: list[int], k: int, drafter: bool, new: int) -> dict:
    params = GenerationParams(max_new_tokens=new, num_draft_tokens=k)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rounds = list(generate(be, prompt, params, eos=set(), use_drafter=drafter))
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0 - rounds[0].verify_s
    dec = rounds[1:]
    toks = [t for r in rounds for t in r.tokens]
    return {"tokens": toks, "decode_s": wall, "forwards": sum(r.forwards for r in dec), "drafted": sum(r.drafted for r in dec),
            "accepted": sum(r.accepted for r in dec), "draft_s": sum(r.draft_s for r in dec),
            "verify_s": sum(r.verify_s for r in dec)}


def loop(be: TorchBackend, k: int, prompts: int, new: int) -> dict:
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(0, 200_000, (64 + 32 * i,), generator=g).tolist() for i in range(prompts)]
    decode(be, ps[0], k, False, 16)  # warm-up: every graph width gets captured here
    decode(be, ps[0], k, True, 16)
    plain = [decode(be, p, k, False, new) for p in ps]
    spec = [decode(be, p, k, True, new) for p in ps]
    fused, be.fused_plain = be.fused_plain, None  # plain decoding one host-synced step at a time, as before
    decode(be, ps[0], k, False, 16)
    single = [decode(be, p, k, False, new) for p in ps]
    be.fused_plain = fused
    ntok = sum(len(r["tokens"]) - 1 for r in plain)
    step = sum(r["decode_s"] for r in plain) / ntok
    fwd = sum(r["verify_s"] for r in plain) / sum(r["forwards"] for r in plain)
    return {"plain_ms_per_token": step * 1e3,
            "plain_single_steps_ms_per_token": sum(r["decode_s"] for r in single) / ntok * 1e3,
            "plain_single_equal": sum(a["tokens"] == b["tokens"] for a, b in zip(plain, single, strict=True)),
            "plain_gpu_ms_per_forward": fwd * 1e3,
            "spec_ms_per_token": sum(r["decode_s"] for r in spec) / sum(len(r["tokens"]) - 1 for r in spec) * 1e3,
            "tau": sum(len(r["tokens"]) - 1 for r in spec) / sum(r["forwards"] for r in spec),
            "c": sum(r["draft_s"] for r in spec) / sum(r["drafted"] for r in spec) / step,
            "verify_rel": sum(r["verify_s"] for r in spec) / sum(r["forwards"] for r in spec) / fwd,
            "greedy_identical": sum(a["tokens"] == b["tokens"] for a, b in zip(plain, spec, strict=True)), "prompts": len(ps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile", choices=["drafter", "all"])
    ap.add_argument("--max-draft", type=int, default=16, help="the backend's max_draft (compile all: steps of "
                    "max_draft + 1 rows)")
    ap.add_argument("--no-fuse", action="store_true", help="q/k/v and gate/up as separate GEMMs")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--drafter", default="mtpkit/drafters/gemma3-270m")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rows", type=int, help="override mtpkit.model.layers.SMALL_QUERY_ROWS")
    ap.add_argument("--branches", default="", help="round costs of draft trees of these widths too, e.g. 2,3,4")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="steps and the loop on 2 prompts only (no invariance check, "
                    "no timeline)")
    a = ap.parse_args()
    if a.quick:
        a.prompts = 2
    if a.rows:
        import mtpkit.model.layers
        mtpkit.model.layers.SMALL_QUERY_ROWS = a.rows
    t0 = time.perf_counter()
    be = build(a.drafter, a.compile, 4096, a.max_draft, not a.no_fuse)
    res = {"compile": a.compile, "k": a.k, "rows": a.rows, "max_draft": a.max_draft, "fuse": not a.no_fuse, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "steps": steps(be, a.k)}
    res["invariance"] = None if a.quick else invariance(be, a.k)
    res["loop"] = loop(be, a.k, a.prompts, a.new)
    res["round_costs"] = round_costs(be, a.k, branches=tuple(int(x) for x in a.branches.split(",") if x))
    res["timeline"] = {} if a.quick else {"plain": timeline(be, a.k, False), "spec": timeline(be, a.k, True)}
    res["wall_s"] = time.perf_counter() - t0
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    s, lp = res["steps"], res["loop"]
    print(f"compile={a.compile} max_draft={a.max_draft} fuse={not a.no_fuse} capture {s['capture_s']:.1f}s | " + " | ".join(
        f"{n} {s[n]['ms']:.3f} ms, synced {s[n]['ms_synced']:.3f} ({s[n]['kernels']} kernels, {s[n]['kernel_ms']:.3f} busy)"
        for n in ("plain", f"verify{a.k + 1}", f"draft{a.k}")))
    print(f"  graphs: c {s['c_graph']:.3f} verify_rel {s['verify_rel_graph']:.2f} | loop: plain "
          f"{lp['plain_ms_per_token']:.3f} ms/token (GPU per forward {lp['plain_gpu_ms_per_forward']:.3f}), "
          f"c {lp['c']:.3f}, verify_rel {lp['verify_rel']:.2f}, tau {lp['tau']:.2f}, "
          f"greedy identical {lp['greedy_identical']}/{lp['prompts']} | {res['wall_s']:.0f}s")
    print(f"  plain chunks of 16: {s['plain_chunk16_ms_per_token']:.3f} ms/token GPU, "
          f"{s['plain_chunk16_synced_ms_per_token']:.3f} synced | loop single steps "
          f"{lp['plain_single_steps_ms_per_token']:.3f} ms/token, same tokens {lp['plain_single_equal']}/{lp['prompts']}")
    print(f"  verify vs single steps: {res['invariance']} | " + " | ".join(
        f"{n} round {t['wall_ms_per_round']:.3f} ms, GPU busy {t['gpu_busy_ms_per_round']:.3f} ms"
        for n, t in res["timeline"].items()))
    print("  T = 1 parts: " + (s.get("sampled_error") or " | ".join(
        f"{n} {s[n]['ms']:.3f} ms ({s[n]['kernels']} kernels)" for n in s if n.endswith(("_t1", "_greedy_device")))))
    rc = res["round_costs"]
    print(f"  a round of {a.k} drafts (gate off), queued ahead / one at a time: greedy {rc['greedy']:.3f} / "
          f"{rc['greedy_sync']:.3f} ms, T = 1 {rc['t1_fused_accept']:.3f} / {rc['t1_fused_accept_sync']:.3f} ms "
          f"(acceptance as a graph), one at a time with eager acceptance {rc['t1_eager_accept_sync']:.3f} ms")
    trees = sorted(n for n in rc if n.startswith("t1_tree") and not n.endswith("_sync"))
    if trees:
        print("  T = 1 draft trees, queued ahead / one at a time: " + " | ".join(
            f"w = {n[7:]} {rc[n]:.3f} / {rc[n + '_sync']:.3f} ms" for n in trees))


if __name__ == "__main__":
    main()
