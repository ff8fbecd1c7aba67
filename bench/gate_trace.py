"""Where the gated speculative loop gains or loses against plain decoding, round by round (issue 17).

For each prompt, plain decoding and the gated speculative loop run in turn on one session (as `mtpkit bench` runs
them); every round's wall time is taken between consecutive rounds as the caller sees them (the loop's own
overhead included). The speculative run's time is split into
  plain rounds   (the gate's k = 0: single steps or fused chunks): seconds per token against plain decoding's
  drafting rounds: their tokens, their seconds, and what those tokens would have cost at plain decoding's rate
so `speedup - 1 ~= drafting gain - plain-round overhead`, and the gate's cost estimates R(k) are set beside the
measured wall time of rounds that chose k (they should agree). Also: rounds by outcome (drafts proposed, stopped
early) with their median wall, draft and verify times, and for the drafting rounds the gate chose because drafting
paid ("pays") or to probe or measure ("probe") the tokens it expected of them when it chose against those they gave.

    python bench/gate_trace.py --target T [--backend torch|llamacpp|mlx|onnx] [--device cpu|cuda] [--threads N]
        [--suite S] [--limit N] [--temperature T] [--repeats R] [--verify-rows lazy|all] [--json F]

Prints one JSON object: per prompt and in total.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict


def trace(session, ids: list[int], n: int, temperature: float, use_drafter: bool, chosen: list[dict],
          lazy_rows: bool = True) -> list[dict]:
    """Rounds after the prefill: the gate's k (and what it expected of it), tokens emitted, wall seconds."""
    rounds, last = [], None
    for r in session.stream(ids, max_new_tokens=n, temperature=temperature, use_drafter=use_drafter, num_draft_tokens=5,
                            lazy_rows=lazy_rows):
        now = time.perf_counter()
        if r.prefill:
            last = now
            chosen.clear()
            continue
        c = chosen[-1] if use_drafter and chosen else {"k": 0}
        rounds.append({**c, "tokens": len(r.tokens), "s": now - last, "drafted": r.drafted, "accepted": r.accepted,
                       "draft_s": r.draft_s, "verify_s": r.verify_s})
        last = now
    return rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--drafter", default=None)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--suite", default="mtbench")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--verify-rows", default="lazy", choices=["lazy", "all"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import mtpkit
    from mtpkit.bench.runner import spread
    from mtpkit.runtime import gate as gate_mod
    from mtpkit.suites import load_suite
    opts = {k: v for k, v in (("device", a.device), ("threads", a.threads)) if v is not None}
    s = mtpkit.load(a.target, drafter=a.drafter, backend=a.backend, **opts)
    chosen: list[dict] = []
    choose = gate_mod.Gate.choose

    def recording_choose(self, limit: int) -> int:
        """The gate's k, and at that moment its expected tokens for k and whether k beat plain (else a probe or
        a measurement)."""
        k = choose(self, limit)
        tokens = gate_mod.expected_tokens(self.rates(), k)[k]
        r = self.costs
        pays = bool(k and r.known(k) and r.known(0) and tokens / r(k) > 1.0 / r(0))
        chosen.append({"k": k, "expected": tokens, "pays": pays})
        return k
    gate_mod.Gate.choose = recording_choose
    prompts = spread(load_suite(a.suite), a.limit)
    ids0 = s.tokenizer.encode(prompts[0].text)
    for use in (False, True):  # warm-up: captures, first calls; the gate learns its costs as in the bench's warm-up
        trace(s, ids0, 16, a.temperature, use, chosen, a.verify_rows == "lazy")

    rows, tot = [], defaultdict(float)
    wall_by_k: dict[int, list[float]] = defaultdict(list)
    drafting: dict[str, list[float]] = defaultdict(list)  # "pays" / "probe": expected and realized tokens a round
    outcomes: dict[str, list[tuple[float, float, float]]] = defaultdict(list)  # "d/stopped" -> (wall, draft, verify)
    for p in prompts:
        ids = s.tokenizer.encode(p.text)
        plain_s = plain_t = 0.0
        spec: dict[str, float] = defaultdict(float)
        for rep in range(a.repeats):
            for use in ((False, True) if rep % 2 == 0 else (True, False)):
                rs = trace(s, ids, a.max_new_tokens, a.temperature, use, chosen, a.verify_rows == "lazy")
                if not use:
                    plain_s += sum(r["s"] for r in rs)
                    plain_t += sum(r["tokens"] for r in rs)
                    continue
                for r in rs:
                    kind = "draft" if r["k"] else "plain"
                    spec[f"{kind}_s"] += r["s"]
                    spec[f"{kind}_tokens"] += r["tokens"]
                    spec[f"{kind}_rounds"] += 1
                    if r["tokens"]:
                        key = f"{r['drafted']}/{int(r['drafted'] < r['k'])}" if r["k"] else "plain"
                        outcomes[key].append((r["s"], r["draft_s"], r["verify_s"]))
                    if r["k"] and r["tokens"]:
                        wall_by_k[r["k"]].append(r["s"])
                        why = "pays" if r["pays"] else "probe"
                        drafting[f"{why}_expected"].append(r["expected"])
                        drafting[f"{why}_tokens"].append(r["tokens"])
        rate = plain_s / max(plain_t, 1)  # plain decoding's seconds per token on this prompt
        spec_s = spec["plain_s"] + spec["draft_s"]
        spec_t = spec["plain_tokens"] + spec["draft_tokens"]
        row = {"id": p.id, "category": p.category, "prompt_tokens": len(ids),
               "plain_tok_per_s": plain_t / plain_s if plain_s else None,
               "spec_tok_per_s": spec_t / spec_s if spec_s else None,
               "speedup": (spec_t / spec_s) / (plain_t / plain_s) if spec_s and plain_s else None,
               # k = 0 rounds: their seconds per token over plain decoding's (1.0 = no overhead)
               "plain_round_rel": spec["plain_s"] / spec["plain_tokens"] / rate if spec["plain_tokens"] else None,
               "draft_rounds": int(spec["draft_rounds"]), "draft_tokens": int(spec["draft_tokens"]),
               # seconds saved by drafting rounds, as a share of the speculative run's time (negative = lost)
               "draft_gain": (spec["draft_tokens"] * rate - spec["draft_s"]) / spec_s if spec_s else None,
               "plain_overhead": (spec["plain_s"] - spec["plain_tokens"] * rate) / spec_s if spec_s else None}
        rows.append(row)
        for k in ("plain_s", "draft_s", "plain_tokens", "draft_tokens"):
            tot[k] += spec[k]
        tot["base_s"] += rate * spec_t  # plain decoding's time for the speculative run's tokens
        tot["plain_excess_s"] += spec["plain_s"] - spec["plain_tokens"] * rate
        tot["draft_saved_s"] += spec["draft_tokens"] * rate - spec["draft_s"]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    costs = next(iter(s.gates.values())).costs  # one gate: this run's temperature, one chain, the default rows
    out = {
        "settings": vars(a),
        # speedup = plain decoding's time for the speculative runs' tokens / their time; the two terms are shares
        # of that time: k = 0 rounds' excess over plain decoding, and the time drafting rounds saved
        "total": {"speedup": tot["base_s"] / (tot["plain_s"] + tot["draft_s"]),
                  "plain_overhead": tot["plain_excess_s"] / (tot["plain_s"] + tot["draft_s"]),
                  "draft_gain": tot["draft_saved_s"] / (tot["plain_s"] + tot["draft_s"]),
                  "draft_share_of_tokens": tot["draft_tokens"] / max(tot["plain_tokens"] + tot["draft_tokens"], 1)},
        # the gate's R(k) (its last rounds at k, each priced by its outcome) vs the median wall time of rounds that chose k
        "round_cost_ms": {k: {"gate": round(1e3 * costs(k), 3) if k in costs.measured else None,
                              "wall": round(1e3 * statistics.median(v), 3), "rounds": len(v)}
                          for k, v in sorted(wall_by_k.items())},
        "gate_plain_step_ms": round(1e3 * costs.measured[0], 3) if 0 in costs.measured else None,
        # rounds by outcome (drafts proposed / stopped early; plain: k = 0): their count and median wall, draft and
        # verify milliseconds (the loop's own overhead is the wall less the other two)
        "outcomes_ms": {key: {"rounds": len(v), "wall": round(1e3 * statistics.median(x[0] for x in v), 3),
                              "draft": round(1e3 * statistics.median(x[1] for x in v), 3),
                              "verify": round(1e3 * statistics.median(x[2] for x in v), 3)}
                        for key, v in sorted(outcomes.items())},
        # drafting rounds the gate chose because k beat plain ("pays") or to probe / measure a k: how many, the
        # tokens a round it expected when it chose, and the tokens they gave (a round that ends the text may
        # give fewer)
        "drafting_rounds": {why: {"rounds": len(drafting[f"{why}_tokens"]),
                                  "expected_tokens": round(statistics.fmean(drafting[f"{why}_expected"]), 3),
                                  "tokens": round(statistics.fmean(drafting[f"{why}_tokens"]), 3)}
                            for why in ("pays", "probe") if drafting[f"{why}_tokens"]},
        "prompts": rows,
    }
    print(json.dumps(out["total"]), json.dumps(out["round_cost_ms"]), out["gate_plain_step_ms"],
          json.dumps(out["drafting_rounds"]), json.dumps(out["outcomes_ms"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
