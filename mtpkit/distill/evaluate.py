"""`eval-drafter`: acceptance of a drafter on prompt suites, on continuations that the target generates
from the suite's prompts (greedy for T=0, sampled at T=1), teacher-forced through one target pass.

Headline (`tau0`, `tau1`): what the speculative loop achieves. A walk goes over each continuation the
way the loop does: a round at p drafts k tokens, accepts a leading run, emits it plus the bonus token
(bounded by the sequence end), and the next round starts after them; tau = tokens after the first
(which prefill yields) / rounds (= target verify forwards). T=0 accepts the leading argmax matches, so
it is exactly the loop's tau on the same prompts and max tokens, given the same argmaxes. T=1 accepts
draft i (earlier ones accepted) with probability a_i = 1 - TV(target, drafter) at that step, drawing a
seeded uniform per draft: the rejection-sampling loop's tau on these sampled continuations.

Simulated (`tau0_sim`, `tau1_sim`): every position of the continuation counts as a round start,
tau = 1 + sum_i accept_i with accept_i = mean over rounds of prod_{j<=i} a_j (bonus included); it
weighs all positions alike, so it reads higher than the walk when easy stretches come in runs.
`accept0/1` and `cond_accept0/1` (a_i given all earlier accepted) are the per-position rates behind it;
`loop_accept0/1` are the walk's own (share of its full rounds that accepted at least i drafts), where rounds
start after a rejection: their first entry against accept0's shows how much harder those positions are.

`per_category` repeats the taus per SuitePrompt.category (uncategorized prompts: the suite's name), and
`min_category_tau0/1` is the worst of them; `eval_suites` runs several suites on one loaded model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from mtpkit.distill.data import generate_rows
from mtpkit.distill.objective import Accept, Batch, Objective, StepResult, acceptance_sums, distill_step, summarize
from mtpkit.errors import MtpkitError
from mtpkit.suites import SuitePrompt

CONTEXT = 4096  # prompt + continuation tokens kept by default (--max-prompt-tokens = CONTEXT - gen_len)


def _walk(prompt_len: int, length: int, k: int, accepted: Callable[[int, int], int],
          leads: list[int] | None = None) -> tuple[int, int]:
    """The loop's walk: `accepted(p, m)` drafts of m accepted at the round starting at p -> (tokens after the first,
    rounds). `leads`: each full round's (m = k) number of accepted drafts is appended to it."""
    p, tokens, rounds = prompt_len, 0, 0
    while p < length - 1:
        m = min(k, length - 1 - p)
        lead = accepted(p, m)
        if leads is not None and m == k:
            leads.append(lead)
        emitted = min(lead + 1, length - 1 - p)
        tokens, rounds, p = tokens + emitted, rounds + 1, p + emitted
    return tokens, rounds


def loop_tau(greedy: torch.Tensor, prompt_len: int, length: int, leads: list[int] | None = None) -> tuple[int, int]:
    """greedy [R, k] (round r starts at p = r + 1) of one sequence -> (tokens after the first, rounds) at T=0."""
    g = greedy.tolist()
    lead = lambda p, m: next((i for i in range(m) if not g[p - 1][i]), m)  # noqa: E731
    return _walk(prompt_len, length, greedy.shape[1], lead, leads)


def loop_tau_sampled(accept: torch.Tensor, prompt_len: int, length: int,
                     generator: torch.Generator | None = None, leads: list[int] | None = None) -> tuple[int, int]:
    """accept [R, k] (round r starts at p = r + 1; a_i = 1 - TV given earlier drafts accepted) of one sampled
    sequence -> (tokens after the first, rounds) at T=1: draft i is accepted iff u_i < a_i, u_i uniform."""
    a = accept.float().tolist()

    def lead(p: int, m: int) -> int:
        u = torch.rand(m, generator=generator).tolist()
        return next((i for i in range(m) if not u[i] < a[p - 1][i]), m)
    return _walk(prompt_len, length, accept.shape[1], lead, leads)


def walk_accept(leads: list[int], k: int) -> list[float] | None:
    """Per draft position i = 1..k, the share of the walk's full rounds that accepted at least i drafts: the
    loop's acceptance by position (the first is acceptance where rounds actually start, after a rejection
    or a fully accepted round, not at every position alike as the simulated rates are)."""
    if not leads:
        return None
    return [round(sum(x >= i for x in leads) / len(leads), 4) for i in range(1, k + 1)]


def walk_rows(res: StepResult, b: Batch, seeds: list[int], leads: list[list[int]] | None = None) -> torch.Tensor:
    """A scored batch walked row by row as the loop goes -> [rows, 4] per row [tokens0, rounds0, tokens1, rounds1]:
    greedy rows fill the first two, sampled rows the last two, drawing their uniforms from a generator seeded with
    seeds[j] (the row's own: independent of the batching); `leads[j]`: the row's full rounds (`_walk`)."""
    greedy, tv = res.accept.greedy.cpu(), res.accept.tv.cpu()
    out = torch.zeros(len(seeds), 4, dtype=torch.long)
    for j, seed in enumerate(seeds):
        pl, ln = int(b.prompt_len[j]) - res.first, int(b.length[j]) - res.first
        row_leads = None if leads is None else leads[j]
        if bool(b.sampled[j]):
            out[j, 2:] = torch.tensor(loop_tau_sampled(tv[j], pl, ln, torch.Generator().manual_seed(seed), row_leads))
        else:
            out[j, :2] = torch.tensor(loop_tau(greedy[j], pl, ln, row_leads))
    return out


def _row(res: StepResult, j: int) -> StepResult:
    return res._replace(mask=res.mask[j:j + 1], accept=Accept(*(x[j:j + 1] for x in res.accept)))


def _report(sums: torch.Tensor, walk: torch.Tensor, k: int) -> dict[str, Any]:
    """Summed acceptance_sums and walk [tokens0, rounds0, tokens1, rounds1] -> taus and rates."""
    s = summarize(sums, k)
    t0, r0, t1, r1 = (int(v) for v in walk)
    return {"tau0": t0 / r0 if r0 else None, "tau1": t1 / r1 if r1 else None,
            "tau0_sim": s["tau0"], "tau1_sim": s["tau1"], "outside_rate": s["outside_rate"], "summary": s,
            "loop_rounds0": r0, "loop_rounds1": r1}


def _argmin(vals: dict[Any, float | None]) -> tuple[float | None, Any]:
    """The smallest non-None value and its key (None, None if there is none)."""
    return min(((v, n) for n, v in vals.items() if v is not None), default=(None, None))


@torch.no_grad()
def eval_drafter(target, drafter, prompts: list[SuitePrompt], *, k: int, gen_len: int = 128, batch: int = 8,
                 device: str = "cpu", seed: int = 0, loss_chunk: int = 512, max_prompt_tokens: int | None = None,
                 centroid_top_k: int | None = None, name: str = "", progress: bool = False) -> dict[str, Any]:
    """target: mtpkit.model.load.Target; drafter: DrafterModel bound to it -> the report dict.

    max_prompt_tokens: keep each prompt's last N tokens (default CONTEXT - gen_len); centroid_top_k: the
    centroid head's clusters kept per step for this evaluation (default the drafter's own); name: the suite
    (the category of uncategorized prompts); progress: count the generated tokens and scored rows on stderr.
    """
    tok = target.tokenizer
    if tok is None:
        raise MtpkitError("the target has no tokenizer: eval-drafter needs one to encode the suite's prompts")
    if gen_len <= 1:
        raise MtpkitError("--gen-len must be at least 2")
    if max_prompt_tokens is None:
        max_prompt_tokens = CONTEXT - gen_len
    if max_prompt_tokens <= 0:
        raise MtpkitError(f"--max-prompt-tokens must be positive (default {CONTEXT} - --gen-len), got {max_prompt_tokens}")
    if not prompts:
        raise MtpkitError(f"suite {name!r} has no prompts")
    saved = drafter.config
    if centroid_top_k is not None:
        if saved.head != "centroid":
            raise MtpkitError("--centroid-top-k needs a drafter with the centroid head")
        drafter.config = dataclasses.replace(saved, centroid_top_k=centroid_top_k)  # validates it
    try:
        return _eval(target, drafter, prompts, k=k, gen_len=gen_len, batch=batch, device=device, seed=seed,
                     loss_chunk=loss_chunk, max_prompt_tokens=max_prompt_tokens, name=name, progress=progress)
    finally:
        drafter.config = saved


def _eval(target, drafter, prompts: list[SuitePrompt], *, k: int, gen_len: int, batch: int, device: str, seed: int,
          loss_chunk: int, max_prompt_tokens: int, name: str, progress: bool) -> dict[str, Any]:
    from mtpkit.distill.progress import Counter
    t0 = time.monotonic()
    tok, model, dev, c = target.tokenizer, target.model, torch.device(device), drafter.config
    full = [tok.encode(p.text, add_bos=False) for p in prompts]
    ids = [x[-max_prompt_tokens:] for x in full]
    n = len(prompts)
    items = [(x, False) for x in ids] + [(x, True) for x in ids]  # row i: prompt i % n, sampled iff i >= n
    # prompts whole, batched by length and left-padded (the pad keys are masked: same continuations as alone)
    with Counter(f"eval-drafter {name}: generating continuations", len(items) * gen_len, "tokens", progress) as bar:
        rows = generate_rows(model, items, gen_len, batch=batch, bos_id=tok.bos_id, eos_id=tok.eos_id,
                             pad_id=max(tok.pad_id, 0), seed=seed, max_tokens=batch * (max(map(len, ids)) + 1 + gen_len),
                             progress=bar.advance)
    t_gen = time.monotonic() - t0
    obj = Objective(k=k, chunk=loss_chunk)
    sums = torch.zeros(len(rows), 4 + 2 * k)  # per row acceptance_sums
    walk = torch.zeros(len(rows), 4, dtype=torch.long)  # per row [tokens0, rounds0, tokens1, rounds1]
    leads: list[list[int]] = [[] for _ in range(len(rows))]  # per row: drafts accepted in each full round
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    # similar lengths together: a batch is padded to its longest row, and its rounds start at its shortest prompt
    order = sorted(range(len(rows)), key=lambda i: (int(rows.prompt_len[i]), int(rows.length[i]), i))
    with Counter(f"eval-drafter {name}: scoring the drafter", len(rows), "sequences", progress) as bar:
        for s in range(0, len(rows), batch):
            idx = torch.tensor(order[s:s + batch])
            b = rows.batch(idx, dev, extra=k + 1, pad=max(tok.pad_id, 0))  # every position can start a round
            with autocast:
                res = distill_step(model, drafter, b, obj, backward=False)
            for j, i in enumerate(idx.tolist()):
                sums[i] = acceptance_sums(_row(res, j), b.sampled[j:j + 1]).cpu()
            walk[idx] = walk_rows(res, b, [seed * 1_000_003 + i for i in idx.tolist()], [leads[i] for i in idx.tolist()])
            bar.advance(len(idx))
    head = _report(sums.sum(0), walk.sum(0), k)
    s = head.pop("summary")
    cats: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        cats.setdefault(p.category or name or "all", []).append(i)
    per_category = {}
    for cat, members in cats.items():
        r = torch.tensor(members + [i + n for i in members])
        rep = _report(sums[r].sum(0), walk[r].sum(0), k)
        per_category[cat] = {"prompts": len(members), **{key: rep[key] for key in
                             ("tau0", "tau1", "tau0_sim", "tau1_sim", "outside_rate")}}
    min0, at0 = _argmin({cat: v["tau0"] for cat, v in per_category.items()})
    min1, at1 = _argmin({cat: v["tau1"] for cat, v in per_category.items()})
    cond = lambda acc: None if acc is None else [round(a / b, 4) if b else 0.0 for a, b in zip(acc, [1.0, *acc[:-1]], strict=True)]  # noqa: E731
    centroid = c.head == "centroid"
    return {
        "suite": name, "prompts": n, "num_draft_tokens": k, "gen_len": gen_len, "max_prompt_tokens": max_prompt_tokens,
        "truncated_prompts": sum(len(x) > max_prompt_tokens for x in full),
        "centroid_top_k": c.centroid_top_k if centroid else None,
        "candidates_per_step": c.centroid_top_k * c.tokens_per_centroid if centroid else None,
        "tau0": head["tau0"], "tau1": head["tau1"], "tau0_sim": head["tau0_sim"], "tau1_sim": head["tau1_sim"],
        "accept0": s["accept0"], "accept1": s["accept1"], "cond_accept0": cond(s["accept0"]), "cond_accept1": cond(s["accept1"]),
        "loop_accept0": walk_accept([x for row in leads[:n] for x in row], k),
        "loop_accept1": walk_accept([x for row in leads[n:] for x in row], k),
        "outside_rate": head["outside_rate"] if centroid else None,
        "per_category": per_category if centroid else {
            cat: {**v, "outside_rate": None} for cat, v in per_category.items()},
        "min_category_tau0": min0, "min_category_tau0_at": at0, "min_category_tau1": min1, "min_category_tau1_at": at1,
        "rounds_greedy": s["rounds_greedy"], "rounds_sampled": s["rounds_sampled"],
        "loop_rounds0": head["loop_rounds0"], "loop_rounds1": head["loop_rounds1"],
        "generated_tokens": int((rows.length - rows.prompt_len).sum()),
        "seconds": {"generate": round(t_gen, 1), "total": round(time.monotonic() - t0, 1)},
    }


def overall(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Worst suite and worst category ([suite, category]) at T=0 and T=1 over several suites' reports."""
    out: dict[str, Any] = {}
    for t in ("tau0", "tau1"):
        out[f"min_{t}"], out[f"min_{t}_at"] = _argmin({s: r[t] for s, r in reports.items()})
        val, at = _argmin({(s, cat): v[t] for s, r in reports.items() for cat, v in r["per_category"].items()})
        out[f"min_category_{t}"], out[f"min_category_{t}_at"] = val, None if at is None else list(at)
    return out


def eval_suites(target, drafter, suites: dict[str, list[SuitePrompt]], **kw: Any) -> dict[str, Any]:
    """{suite name: prompts} -> {"suites": {name: eval_drafter report}, "overall": overall(...)} (one loaded model)."""
    reports = {name: eval_drafter(target, drafter, prompts, name=name, **kw) for name, prompts in suites.items()}
    return {"suites": reports, "overall": overall(reports)}
