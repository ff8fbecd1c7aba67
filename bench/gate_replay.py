"""The online gate replayed on recorded acceptance: gate designs compared on real texts, without timing noise.

`record` decodes each prompt of a suite token by token through a backend's steps and, at every position t, drafts
K tokens and verifies them, then keeps only the target's own next token (plain decoding's text):
  T = 0: L[t]     how many of the K greedy drafts the target accepts (the prefix that matches its argmax)
  T > 0: r[t][i]  P(draft i accepted | drafts 1..i-1 accepted) = 1 - TV(p_i, q_i) for the drafts drawn at t
         (p_i: the target's distribution after b, d_1..d_{i-1}; q_i: the drafter's, over its candidates); the
         text follows the target's own samples
  conf[t][i]      the drafter's top probability at step i (adaptive drafting stops where it is < min_confidence)
and the backend's costs as the loop pays them (`loop_costs`: the loop run with each fixed k on the first prompt;
medians): a plain round, a verify of n = 1..K + 1 tokens with its acceptance, a drafter step, and a drafting
round's own overhead.

`replay` runs gate modules (the committed one, and any `--gate FILE`) over the recorded texts in order, one
gate kept across prompts as api.Session keeps it: a round at t that chose k proposes d = min(k, the first step
whose conf < min_confidence) drafts and emits n + 1 tokens, n = min(L[t], d) (T > 0: each draft accepted with
its r, drawn per seed), then t advances by n + 1. A drafting round costs overhead + verify(d + 1) + (d + stopped)
drafter steps, a plain round its measured wall, 5 % lognormal jitter; plain decoding is the same text at a plain
round a token. `--costs FILE`
replays with another record's (another backend's) costs, `--draft-cost C --verify-slope S` with a synthetic
backend (a draft step and each verified token beyond the first at C and S plain steps: a GPU is ~0.1 / ~0.02).
`--by-length`: each prompt's costs scaled by its bare one-token verify (timed by `record`) over the one timed where
the costs were measured. At T = 0 it prints the bound no gate can pass: the least time over the text when each round's k is chosen knowing
how many drafts will be accepted.
At T > 0 the replayed text stays the recorded one whatever is accepted (drafts accepted by the ratio test follow
the target's distribution, not its recorded sample): acceptance is right per position, the text approximate.

    python bench/gate_replay.py record --target T [--backend llamacpp] [--threads 2] --suite S [--limit N]
        [--temperature 0] [--max-new-tokens 128] [--num-draft-tokens 5] --out F.json
    python bench/gate_replay.py costs --target T [--backend ...] --suite S --out C.json
    python bench/gate_replay.py replay F.json [F2.json ...] [--gate FILE ...] [--costs C.json] [--by-length]
        [--draft-cost C --verify-slope S] [--min-confidence 0.3] [--seeds 8] [--verify-rows all|lazy] [--json OUT]

A backend with verify_rows (llama.cpp) also gets the costs of that path measured (`row_costs`: the verify's body
without the head, the head's block costs, acceptance per row read); `replay --verify-rows lazy` prices drafting
rounds with them (the head for the blocks ggml_head.plan_blocks picks for the gate's reach, read up to n).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from mtpkit.runtime.ops import NumpyOps
from mtpkit.runtime.sampling import SamplingParams, accept_greedy, probs


# ---------------------------------------------------------------------------------------------------- record
def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)


def _verify1(backend, ids: list[int], reps: int = 5) -> float:
    """Seconds of a bare one-token verify after this prompt (median of `reps`)."""
    backend.start(list(ids))
    p0, walls = backend.length, []
    for _ in range(reps):
        t0 = time.perf_counter()
        backend.verify(backend.ops.tokens([int(ids[-1])]))
        walls.append(time.perf_counter() - t0)
        backend.rollback(p0)
    return statistics.median(walls)


def record_prompt(backend, ids: list[int], n: int, k: int, temperature: float, draft_temperature: float,
                  eos: set[int], rng: np.random.Generator) -> dict:
    """One prompt's positions: L (T = 0) or r (T > 0), and conf."""
    ops = backend.ops
    verify1 = _verify1(backend, ids)  # the replay scales the costs by it (`--by-length`)
    logits, h = backend.start(list(ids))
    lg = _np(logits)
    sp, dsp = SamplingParams(temperature), SamplingParams(temperature * draft_temperature)  # target / drafts
    bonus = int(lg.argmax()) if temperature <= 0 else int(rng.choice(lg.shape[-1], p=probs(NumpyOps, lg, sp)))
    out = {"tokens": [bonus], "conf": [], "L" if temperature <= 0 else "r": [], "verify1_s": verify1}
    while len(out["tokens"]) < n and bonus not in eos and backend.length + k + 1 < backend.max_len:
        token, hd, drafts, confs, qs = ops.tokens([bonus]), h, [], [], []
        for _ in range(k):
            s = backend.draft_step(token, hd)
            x = _np(s.logits)
            hd = s.h
            if temperature <= 0:
                j = int(x.argmax())
                q = None
            else:
                q = probs(NumpyOps, x, dsp)
                j = int(rng.choice(len(q), p=q / q.sum()))
            tok = j if s.ids is None else int(_np(s.ids)[j])
            confs.append(round(NumpyOps.top_prob(x) if temperature <= 0 else float(q.max()), 4))  # as draft.draft
            drafts.append(tok)
            qs.append((q, None if s.ids is None else _np(s.ids).astype(np.int64)))
            token = ops.tokens([tok])
        p0 = backend.length
        vl, hidden = backend.verify(ops.tokens([bonus] + drafts))
        vl = _np(vl)
        if temperature <= 0:
            m, _, _ = accept_greedy(NumpyOps, np.array(drafts), vl)
            out["L"].append(m)
            nxt = int(vl[0].argmax())  # the walk moves one position along the plain text
        else:
            p = probs(NumpyOps, vl, sp)
            rs = []
            for i, (q, cand) in enumerate(qs):  # 1 - TV(p_i, q_i) = sum min(p_i, q_i); q is 0 off its candidates
                pi = p[i][cand] if cand is not None else p[i]
                rs.append(round(float(np.minimum(pi, q).sum()), 4))
            out["r"].append(rs)
            nxt = int(rng.choice(p.shape[-1], p=p[0] / p[0].sum()))
        out["conf"].append(confs)
        backend.rollback(p0 + 1)
        h = hidden[0]
        bonus = nxt
        out["tokens"].append(bonus)
    return out


def loop_costs(session, ids: list[int], k: int, temperature: float, n: int = 64) -> dict:
    """The step costs as the loop pays them: plain decoding, then each fixed k in 1..K (gate off), over `ids`;
    per round the wall time between rounds, the draft and the verify (with acceptance) seconds -> medians: a
    plain round, a verify of n tokens, a drafter step (first and later), and a drafting round's own overhead
    (its wall less draft and verify)."""
    walls: dict[str, list[float]] = defaultdict(list)
    for kk in range(0, k + 1):
        for _ in range(2):  # the first pass warms this k up
            last, rounds = None, []
            for r in session.stream(ids, max_new_tokens=n, temperature=temperature, use_drafter=kk > 0,
                                    num_draft_tokens=max(kk, 1), gate=False, lazy_rows=False):
                now = time.perf_counter()
                if not r.prefill:
                    rounds.append((r, now - last))
                last = now
        for r, wall in rounds:
            if kk == 0:
                walls["plain"].append(wall)
                continue
            steps = r.drafted + (r.drafted < kk)
            walls[f"verify{r.drafted + 1}"].append(r.verify_s)
            walls["draft1" if steps == 1 else "draft"].append(r.draft_s if steps == 1 else r.draft_s / steps)
            walls["overhead"].append(wall - r.draft_s - r.verify_s)
    med = {key: statistics.median(v) for key, v in walls.items()}
    verify = [med.get(f"verify{m}") for m in range(1, k + 2)]
    measured = [i for i, v in enumerate(verify) if v is not None]
    for i, v in enumerate(verify):
        if v is None:  # a verify size no round reached: on the line through the two nearest measured sizes
            a, b = sorted(sorted(measured, key=lambda j: abs(j - i))[:2])
            verify[i] = verify[a] + (verify[b] - verify[a]) * (i - a) / (b - a)
    return {"plain": med["plain"], "verify1_bare": _verify1(session.backend, ids), "verify": verify, "verify_measured": [i in measured for i in range(k + 1)], "draft1": med.get("draft1", med.get("draft")),
            "draft": med.get("draft", med.get("draft1")), "overhead": med.get("overhead", 0.0),
            "rounds": {key: len(v) for key, v in walls.items()}, **row_costs(session.backend, ids, k, temperature)}


def row_costs(backend, ids: list[int], k: int, temperature: float, reps: int = 9) -> dict:
    """A backend with verify_rows (the head per row): its verify of n = 1..K + 1 tokens without any row read
    ("body"), its head's block costs by width ("head", RowHead.cost), and what acceptance adds per row read
    ("accept_row": argmax, or at T > 0 the row's probabilities). `replay --verify-rows lazy` prices rounds with them."""
    if getattr(backend, "verify_rows", None) is None:
        return {}
    from mtpkit.runtime.sampling import SamplingParams, probs
    backend.start(list(ids))
    p0, body = backend.length, []
    for m in range(1, k + 2):
        walls = []
        for _ in range(reps):
            t0 = time.perf_counter()
            rows, _ = backend.verify_rows(np.array(ids[-m:], np.int64))
            walls.append(time.perf_counter() - t0)
            backend.rollback(p0)
        body.append(statistics.median(walls))
    rows, _ = backend.verify_rows(np.array(ids[-1:], np.int64))
    x = rows(0)
    backend.rollback(p0)
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        int(x.argmax()) if temperature <= 0 else probs(NumpyOps, x, SamplingParams(temperature))
        walls.append(time.perf_counter() - t0)
    return {"body": body, "head": {str(w): c for w, c in backend._row_head.cost.items()},
            "accept_row": statistics.median(walls)}


def _session_and_costs(a, first_prompt: str):
    """`record` / `costs`: the session and its loop costs, measured on `first_prompt`."""
    import mtpkit
    opts = {k: v for k, v in (("device", a.device), ("threads", a.threads)) if v is not None}
    s = mtpkit.load(a.target, drafter=a.drafter, backend=a.backend, **opts)
    costs = loop_costs(s, s.tokenizer.encode(first_prompt), a.num_draft_tokens, a.temperature)
    print(json.dumps({"costs_ms": {k: ([round(1e3 * x, 2) for x in v] if isinstance(v, list) else round(1e3 * v, 2))
                                   for k, v in costs.items() if k not in ("rounds", "verify_measured", "head")},
                      "rounds": costs["rounds"]}), flush=True)
    return s, costs


def measure_costs(a) -> None:
    """`costs`: only the backend's loop costs (for `replay --costs`)."""
    from mtpkit.suites import load_suite
    s, costs = _session_and_costs(a, load_suite(a.suite)[0].text)
    info = s.backend.info()
    Path(a.out).write_text(json.dumps({"settings": {**vars(a), "backend_device": info.device}, "costs": costs}))


def record(a) -> None:
    from mtpkit.bench.runner import spread
    from mtpkit.suites import load_suite
    prompts = spread(load_suite(a.suite), a.limit) if a.limit else load_suite(a.suite)
    s, costs = _session_and_costs(a, prompts[0].text)
    rng = np.random.default_rng(a.seed)
    rows = []
    for j, p in enumerate(prompts):
        ids = s.tokenizer.encode(p.text)[-(s.backend.max_len - a.max_new_tokens - a.num_draft_tokens - 2):]
        row = record_prompt(s.backend, ids, a.max_new_tokens, a.num_draft_tokens, a.temperature,
                            s.draft_temperature, s.eos, rng)
        rows.append({"id": p.id, "category": p.category, **row})
        print(f"{j + 1}/{len(prompts)} {p.id}: {len(row['tokens'])} tokens", flush=True)
    info = s.backend.info()
    out = {"settings": {**vars(a), "backend_device": info.device, "threads_used": info.threads},
           "costs": costs, "prompts": rows}
    Path(a.out).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------------- replay
def _load_gate(path: str | None):
    if path is None:
        from mtpkit.runtime import gate
        return gate
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _takes_greedy(mod) -> bool:
    """Whether this gate module's Gate takes `greedy` (older ones do not)."""
    import inspect
    return "greedy" in inspect.signature(mod.Gate.__init__).parameters


def round_cost(costs: dict, drafted: int, steps: int) -> float:
    """Seconds of a drafting round that verified drafted + 1 tokens after `steps` drafter steps (a plain
    round: costs["plain"])."""
    return costs["overhead"] + costs["verify"][drafted] + costs["draft1"] + (steps - 1) * costs["draft"]


def scaled(costs: dict, row: dict, by_length: bool) -> dict:
    """The costs for this prompt (`--by-length`): scaled by its bare one-token verify over the one timed where the
    costs were measured (both recorded), as a longer prompt makes every step dearer."""
    if not by_length or "verify1_s" not in row or "verify1_bare" not in costs:
        return costs
    f = row["verify1_s"] / costs["verify1_bare"]
    out = {**costs, **{key: costs[key] * f for key in ("plain", "draft1", "draft", "overhead")},
           "verify": [v * f for v in costs["verify"]]}
    if "body" in costs:  # verify_rows: the head does not grow with the context, the body takes all of the growth
        head1 = costs["head"]["1"]
        fb = (row["verify1_s"] - head1) / (costs["verify1_bare"] - head1)
        out["body"] = [v * fb for v in costs["body"]]
    return out


def lazy_round_cost(costs: dict, drafted: int, steps: int, accepted: int, reach: list[float]) -> float:
    """(seconds, rows computed) of a drafting round verified through verify_rows: the verify's body, then the head for
    the blocks that acceptance reads (ggml_head.plan_blocks for the gate's `reach`, rows 0..accepted), then acceptance
    on those rows."""
    from functools import partial

    from mtpkit.runtime.ggml_head import plan_blocks, rows_seconds
    seconds = partial(rows_seconds, {int(w): c for w, c in costs["head"].items()})
    starts = plan_blocks(seconds, [1.0] + list(reach[1:drafted + 1]))
    ends = starts[1:] + [drafted + 1]
    read = [(b, e) for b, e in zip(starts, ends, strict=True) if b <= accepted]
    cost = (costs["overhead"] + costs["body"][drafted] + sum(seconds(e - b) for b, e in read)
            + (accepted + 1) * costs["accept_row"] + costs["draft1"] + (steps - 1) * costs["draft"])
    return cost, read[-1][1]  # and the rows computed (the loop's head_rows)


def replay_suite(mod, rows: list[dict], base: dict, k_max: int, min_conf: float | None, temperature: float,
                 seed: int, jitter: float = 0.05, by_length: bool = False, lazy: bool = False
                 ) -> dict[str, tuple[float, float]]:
    """Per prompt id: (speculative seconds, plain seconds) for its recorded text, one gate across the prompts.
    lazy: rounds verified through verify_rows (the costs' body, head and accept_row)."""
    rng = np.random.default_rng(seed)
    g = mod.Gate(k_max, mod.RoundCosts(), temperature <= 0) if _takes_greedy(mod) else mod.Gate(k_max, mod.RoundCosts())
    out = {}
    for row in rows:
        costs = scaled(base, row, by_length)
        plain_step = costs["plain"]
        n_tok = len(row["tokens"])
        positions = len(row["conf"])
        t, emitted, spec_s = 0, 1, 0.0
        while emitted < n_tok:
            k = g.choose(min(k_max, n_tok - emitted - 1)) if t < positions else 0
            if k == 0:
                cost = plain_step * rng.lognormal(0, jitter)
                g.observe(0, 0, cost)
                t, emitted, spec_s = t + 1, emitted + 1, spec_s + cost
                continue
            conf = row["conf"][t]
            d = k
            if min_conf is not None:
                d = next((i for i in range(k) if conf[i] < min_conf), k)
            stopped = d < k
            if temperature <= 0:
                n = min(row["L"][t], d)
            else:
                n = 0
                while n < d and rng.random() < row["r"][t][n]:
                    n += 1
            if lazy and d > 0:
                cost, rows_paid = lazy_round_cost(costs, d, d + stopped, n, g.reach(d))
                cost *= rng.lognormal(0, jitter)
                g.observe(d, n, cost, chose=k, head_rows=rows_paid)
            else:
                cost = round_cost(costs, d, d + stopped) * rng.lognormal(0, jitter)
                g.observe(d, n, cost, chose=k)
            t, emitted, spec_s = t + n + 1, emitted + n + 1, spec_s + cost
        out[row["id"]] = (spec_s, (n_tok - 1) * plain_step)
    return out


def oracle_seconds(row: dict, costs: dict, k_max: int) -> float:
    """T = 0: the least time any choice of each round's k could take over this text, knowing L in advance (a
    round at t proposes exactly the j <= L[t] drafts it will have accepted, no stops): the bound of every gate."""
    n_tok, positions = len(row["tokens"]), len(row["L"])
    plain_step = costs["plain"]
    best = [0.0] * n_tok  # best[t]: from t + 1 tokens emitted to n_tok
    for t in range(n_tok - 2, -1, -1):
        b = plain_step + best[t + 1]
        for j in range(1, min(k_max, row["L"][t] if t < positions else 0, n_tok - 2 - t) + 1):
            b = min(b, round_cost(costs, j, j) + best[t + j + 1])
        best[t] = b
    return best[0]


def read_json(path: str) -> dict:
    """A record or costs file, gzipped (.gz) or not."""
    import gzip
    raw = gzip.decompress(Path(path).read_bytes()) if path.endswith(".gz") else Path(path).read_bytes()
    return json.loads(raw)


def _speedups(label: str, name: str, spec: dict, plain: dict, worst: bool = True) -> dict:
    """Seconds by category -> speedup over plain, in all and by category; printed as one line."""
    cats = {c: plain[c] / spec[c] for c in sorted(spec)}
    total = sum(plain.values()) / sum(spec.values())
    w = min(cats.items(), key=lambda kv: kv[1])
    print(f"{label:28s} {name:22s} {total:.3f}x  " + (f"worst {w[0]} {w[1]:.3f}  " if worst else "")
          + " ".join(f"{c[:6]} {v:.3f}" for c, v in cats.items()), flush=True)
    return {"speedup": round(total, 4), "categories": {c: round(v, 4) for c, v in cats.items()}}


def replay(a) -> None:
    recs = [read_json(f) for f in a.records]
    mods = [("committed", _load_gate(None))] + [(Path(f).name, _load_gate(f)) for f in a.gate or []]
    result = {}
    for rec in recs:
        st = rec["settings"]
        costs = read_json(a.costs)["costs"] if a.costs else dict(rec["costs"])
        if a.draft_cost is not None:  # synthetic: in plain steps of this record's backend
            p = costs["plain"]
            costs = {"plain": p, "overhead": 0.0, "draft1": a.draft_cost * p, "draft": a.draft_cost * p,
                     "verify": [p * (1 + m * a.verify_slope) for m in range(len(costs["verify"]))]}
        k_max = st["num_draft_tokens"]
        label = f"{Path(st['suite']).stem} T={st['temperature']}"
        for name, mod in mods:
            spec, plain = defaultdict(float), defaultdict(float)
            for seed in range(a.seeds):
                res = replay_suite(mod, rec["prompts"], costs, k_max, a.min_confidence, st["temperature"], seed,
                                   by_length=a.by_length, lazy=a.verify_rows == "lazy")
                for row in rec["prompts"]:
                    sp, pl = res[row["id"]]
                    spec[row["category"]] += sp
                    plain[row["category"]] += pl
            result.setdefault(label, {})[name] = _speedups(label, name, spec, plain)
        if st["temperature"] <= 0:
            spec, plain = defaultdict(float), defaultdict(float)
            for row in rec["prompts"]:
                c = scaled(costs, row, a.by_length)
                spec[row["category"]] += oracle_seconds(row, c, k_max)
                plain[row["category"]] += (len(row["tokens"]) - 1) * c["plain"]
            result[label]["oracle"] = _speedups(label, "oracle (bound)", spec, plain, worst=False)
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "result": result}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    c = sub.add_parser("costs")
    for x in (r, c):
        x.add_argument("--target", default="gemma3-270m")
        x.add_argument("--drafter", default=None)
        x.add_argument("--backend", default="llamacpp")
        x.add_argument("--device", default=None)
        x.add_argument("--threads", type=int, default=None)
        x.add_argument("--suite", required=True)
        x.add_argument("--temperature", type=float, default=0.0)
        x.add_argument("--num-draft-tokens", type=int, default=5)
        x.add_argument("--out", required=True)
    r.add_argument("--limit", type=int, default=0, help="prompts spread over the categories (0: all)")
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("replay")
    p.add_argument("records", nargs="+")
    p.add_argument("--gate", action="append", help="another gate.py to replay beside the committed one")
    p.add_argument("--costs", default=None, help="a record whose costs to use (another backend's)")
    p.add_argument("--draft-cost", type=float, default=None)
    p.add_argument("--verify-slope", type=float, default=0.02)
    p.add_argument("--min-confidence", type=float, default=0.3, help="0: off (a GPU's default)")
    p.add_argument("--by-length", action="store_true", help="scale the costs per prompt by its one-token verify "
                   "(records that timed it)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--verify-rows", default="all", choices=["all", "lazy"],
                   help="lazy: price drafting rounds as verify_rows pays them (costs measured with body/head)")
    p.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.cmd == "replay" and not a.min_confidence:
        a.min_confidence = None
    {"record": record, "costs": measure_costs, "replay": replay}[a.cmd](a)


if __name__ == "__main__":
    main()
