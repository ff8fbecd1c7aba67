"""`eval-drafter`: simulated acceptance of a drafter on a prompt suite, teacher-forced on continuations
that the target generates from the suite's prompts (greedy for T=0, sampled for T=1).

Reported per draft position i: accept = P(draft i accepted) = mean over rounds of prod_{j<=i} a_j, and
the conditional rate a_i given all earlier accepted. tau = 1 + sum_i accept_i (bonus included),
averaged over every position of the continuation as a possible round start. `tau0_loop` walks the
greedy continuation the way the speculative loop does (a round at p accepts the leading matches, emits
them plus the bonus, and the next round starts after them) and divides the tokens after the first
(which prefill yields) by the number of rounds = target verify forwards: at T=0 that is exactly the
loop's tau on the same prompts and max tokens, given the same argmaxes.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from mtpkit.distill.data import generate_rows
from mtpkit.distill.objective import Objective, acceptance_sums, distill_step, summarize
from mtpkit.errors import MtpkitError
from mtpkit.suites import SuitePrompt


def loop_tau(greedy: torch.Tensor, prompt_len: int, length: int) -> tuple[int, int]:
    """greedy [R, k] (round r starts at p = r + 1) of one sequence -> (tokens after the first, rounds)."""
    k = greedy.shape[1]
    p, tokens, rounds = prompt_len, 0, 0
    while p < length - 1:
        m = min(k, length - 1 - p)
        row = greedy[p - 1, :m]
        n = int(row.cumprod(0).sum())
        emitted = min(n + 1, length - 1 - p)
        tokens, rounds, p = tokens + emitted, rounds + 1, p + emitted
    return tokens, rounds


@torch.no_grad()
def eval_drafter(target, drafter, prompts: list[SuitePrompt], *, k: int, gen_len: int = 128, batch: int = 8,
                 device: str = "cpu", seed: int = 0, loss_chunk: int = 512, max_prompt_tokens: int = 1024) -> dict[str, Any]:
    """target: mtpkit.model.load.Target; drafter: DrafterModel bound to it -> the report dict."""
    tok = target.tokenizer
    if tok is None:
        raise MtpkitError("the target has no tokenizer: eval-drafter needs one to encode the suite's prompts")
    if gen_len <= 1:
        raise MtpkitError("--gen-len must be at least 2")
    t0 = time.monotonic()
    model = target.model
    dev = torch.device(device)
    ids = [tok.encode(p.text, add_bos=False)[-max_prompt_tokens:] for p in prompts]
    items = [(x, False) for x in ids] + [(x, True) for x in ids]
    rows = generate_rows(model, items, gen_len, batch=batch, bos_id=tok.bos_id, eos_id=tok.eos_id,
                         pad_id=max(tok.pad_id, 0), seed=seed, truncate=False)
    t_gen = time.monotonic() - t0
    obj = Objective(k=k, chunk=loss_chunk)
    sums = torch.zeros(4 + 2 * k, device=dev)
    walk_tokens = walk_rounds = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    for i in range(0, len(rows), batch):
        idx = torch.arange(i, min(i + batch, len(rows)))
        b = rows.batch(idx, dev, extra=k + 1, pad=max(tok.pad_id, 0))  # every position can start a round
        with autocast:
            res = distill_step(model, drafter, b, obj, backward=False)
        sums += acceptance_sums(res, b.sampled)
        for j in range(len(idx)):
            if not bool(b.sampled[j]):
                t, r = loop_tau(res.accept.greedy[j].cpu(), int(b.prompt_len[j]), int(b.length[j]))
                walk_tokens, walk_rounds = walk_tokens + t, walk_rounds + r
    s = summarize(sums, k)
    cond = lambda acc: None if acc is None else [round(a / b, 4) if b else 0.0 for a, b in zip(acc, [1.0, *acc[:-1]], strict=True)]  # noqa: E731
    return {
        "prompts": len(prompts), "num_draft_tokens": k, "gen_len": gen_len,
        "tau0": s["tau0"], "tau0_loop": walk_tokens / walk_rounds if walk_rounds else None, "tau1": s["tau1"],
        "accept0": s["accept0"], "accept1": s["accept1"], "cond_accept0": cond(s["accept0"]), "cond_accept1": cond(s["accept1"]),
        "outside_rate": s["outside_rate"] if drafter.config.head == "centroid" else None,
        "rounds_greedy": s["rounds_greedy"], "rounds_sampled": s["rounds_sampled"],
        "generated_tokens": int((rows.length - rows.prompt_len).sum()),
        "seconds": {"generate": round(t_gen, 1), "total": round(time.monotonic() - t0, 1)},
    }
