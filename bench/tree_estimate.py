"""Estimate loop tau with w first-draft candidates (top-w at T=0; w draws without replacement and recursive rejection
at T=1), later drafts as one chain: teacher-forced drafts on the target's own continuations, walked as the loop walks.

    python bench/tree_estimate.py '{"everyday": 2, "mtbench": 8, "humaneval": 6}' 96   # prompts (everyday: a category)
"""
import json
import sys

import torch

from mtpkit.distill.data import generate_rows
from mtpkit.distill.objective import accept_from_logits, teacher_pass, unroll
from mtpkit.model.load import load_drafter, load_target
from mtpkit.suites import load_suite

torch.manual_seed(0)
torch.set_num_threads(2)
t = load_target("gemma3-270m", dtype=torch.float32, device="cpu")
d = load_drafter("mtpkit/drafters/gemma3-270m", t.model, device="cpu")
dt = d.config.draft_temperature
print("draft temperature", dt, "top_k", d.config.centroid_top_k, flush=True)
tok = t.tokenizer
K, W, S, GEN = 5, 4, 256, int(sys.argv[2]) if len(sys.argv) > 2 else 96
spec = json.loads(sys.argv[1])
res = {}
for suite, lim in spec.items():
    prompts = load_suite(suite, None)
    if suite == "everyday":  # 2 per category
        by = {}
        for p in prompts:
            by.setdefault(p.category, []).append(p)
        prompts = [p for v in by.values() for p in v[:lim]]
    else:
        prompts = prompts[:lim]
    ids = [tok.encode(p.text, add_bos=False)[-2000:] for p in prompts]
    items = [(x, False) for x in ids] + [(x, True) for x in ids]
    rows = generate_rows(t.model, items, GEN, batch=4, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=max(tok.pad_id, 0),
                         seed=0, max_tokens=4 * (max(map(len, ids)) + 1 + GEN))
    tot = {w: [0, 0, 0, 0] for w in range(1, W + 1)}  # tokens0, rounds0, tokens1, rounds1
    gen = torch.Generator().manual_seed(1)
    for i in range(len(rows)):
        b = rows.batch(torch.tensor([i]), torch.device("cpu"), extra=K + 1, pad=max(tok.pad_id, 0))
        with torch.no_grad():
            tp = teacher_pass(t.model, b.tokens)
            steps = unroll(t.model, d, b.tokens, tp, K, 0)
            T = b.tokens.shape[1]
            R = T - 1 - K
            pl, ln = int(b.prompt_len[0]), int(b.length[0])
            lo = max(0, pl - 1)
            t_logp = t.model.head(tp.hidden[:, lo + 1:R + K]).float().log_softmax(-1)[0]  # positions lo+1..
            acc = torch.zeros(R, K)
            first = {}
            for s in range(K):
                x, hn = steps[s]
                out = d.head(x[:, lo:], hn[:, lo:])
                lg, cid = out.logits[0], out.ids[0]  # [R-lo, N]
                tl = t_logp[s:s + R - lo]
                g, tv, _ = accept_from_logits(tl, out.dense_logits(t.model.config.vocab_size)[0], cid)
                sampled = bool(b.sampled[0])
                if sampled:
                    # recompute 1-TV at draft temperature dt
                    q = (lg / dt).softmax(-1)
                    pc = tl.exp().gather(-1, cid)
                    tv = 1 - 0.5 * ((pc - q).abs().sum(-1) + (1 - pc.sum(-1)).clamp_min(0))
                acc[lo:, s] = tv if sampled else g
                if s == 0:
                    first = (lg, cid, tl)
            lg, cid, tl = first
            a1 = torch.zeros(W, R)
            for r in range(R - lo):
                if not sampled:
                    top = cid[r][lg[r].topk(W).indices]
                    hit = (top == tl[r].argmax()).float().cumsum(0)
                    a1[:, lo + r] = hit
                else:
                    q = (lg[r] / dt).softmax(-1)
                    p = tl[r].exp()[cid[r]]
                    out_mass = (1 - p.sum()).clamp_min(0)
                    qs = q.expand(S, -1).clone()
                    ps = p.expand(S, -1).clone()
                    om = out_mass.expand(S).clone()
                    done = torch.zeros(S, dtype=torch.bool)
                    for w in range(W):
                        x = torch.multinomial(qs, 1, generator=gen)[:, 0]
                        px, qx = ps.gather(1, x[:, None])[:, 0], qs.gather(1, x[:, None])[:, 0]
                        ok = torch.rand(S, generator=gen) * qx < px
                        done = done | ok
                        a1[w, lo + r] = done.float().mean()
                        resid = (ps - qs).clamp_min(0)
                        z = resid.sum(1) + om
                        ps = resid / z[:, None]
                        om = om / z
                        qs = qs.scatter(1, x[:, None], 0.0)
                        qs = qs / qs.sum(1, keepdim=True).clamp_min(1e-30)
        for w in range(W):
            a = acc.clone()
            a[:, 0] = a1[w]
            p, tokens, rounds = pl, 0, 0
            while p < ln - 1:
                m = min(K, ln - 1 - p)
                row = a[p - 1]
                if sampled:
                    u = torch.rand(m, generator=gen).tolist()
                    lead = next((j for j in range(m) if not u[j] < float(row[j])), m)
                else:
                    lead = next((j for j in range(m) if not row[j] > 0.5), m)
                e = min(lead + 1, ln - 1 - p)
                tokens += e
                rounds += 1
                p += e
            o = 2 if sampled else 0
            tot[w + 1][o] += tokens
            tot[w + 1][o + 1] += rounds
    res[suite] = {w: (round(v[0] / v[1], 3), round(v[2] / v[3], 3)) for w, v in tot.items()}
    print(suite, res[suite], flush=True)
print(json.dumps(res))
