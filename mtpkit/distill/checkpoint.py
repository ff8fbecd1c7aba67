"""Training checkpoints: safetensors + JSON only (nothing is pickled), each written atomically.

Layout of a run directory:
  hparams.json        DistillConfig (the run's settings; --resume reads them)
  data/               token shards + index.json (mtpkit.distill.data)
  last/               drafter/ (save_drafter: config.json, model.safetensors, meta.json),
                      state.safetensors (AdamW moments and step per parameter name, RNG states),
                      state.json (next step = the data position, best score, last evaluation, elapsed time)
  best/               the drafter with the best held-out loop-walk tau0 + tau1 (save_drafter layout)
  log.jsonl           one JSON object per training step and per evaluation

`last/` is built in a temp dir and swapped in with renames; a crash between the two renames leaves
`.last.old`, which `read_last` falls back to. Every other temporary is a hidden name carrying its process id
(mtpkit.paths); `sweep_run` removes those of a killed process when the next run writes the directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from mtpkit.distill.data import atomic_save_tensors
from mtpkit.errors import MtpkitError
from mtpkit.model.drafter import DrafterModel
from mtpkit.model.load import load_state, read_safetensors, save_drafter
from mtpkit.paths import atomic_dir, atomic_write, sweep

_FIELDS = ("step", "exp_avg", "exp_avg_sq")


def _ordered_params(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for g in opt.param_groups for p in g["params"]]


def write_last(out: Path, drafter: DrafterModel, opt: torch.optim.Optimizer, state: dict[str, Any],
               meta: dict[str, Any]) -> Path:
    """Atomically (re)write `out/last` with the drafter, optimizer moments, RNG states and `state`."""
    names = {p: n for n, p in drafter.named_parameters()}
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for p in _ordered_params(opt):
        for f, v in opt.state.get(p, {}).items():
            if f in _FIELDS:
                tensors[f"optim.{names[p]}.{f}"] = torch.as_tensor(v).detach().float().reshape(p.shape if f != "step" else ())
    with atomic_dir(out / "last") as tmp:
        save_drafter(drafter, tmp / "drafter", meta=meta)
        atomic_save_tensors(tmp / "state.safetensors", tensors)
        atomic_write(tmp / "state.json", json.dumps(state, indent=2))
    return out / "last"


def last_dir(out: Path) -> Path | None:
    for d in (out / "last", out / ".last.old"):
        if (d / "state.json").is_file():
            return d
    return None


def read_last(out: Path, drafter: DrafterModel, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore drafter weights, optimizer moments and RNG states from `out/last`; return state.json."""
    d = last_dir(out)
    if d is None:
        raise MtpkitError(f"no checkpoint to resume in {out}")
    try:
        state = json.loads((d / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MtpkitError(f"cannot read {d / 'state.json'}: {e}") from None
    weights = read_safetensors([d / "drafter" / "model.safetensors"])
    load_state(drafter, weights, f"checkpoint {d}")
    t = read_safetensors([d / "state.safetensors"])
    names = {p: n for n, p in drafter.named_parameters()}
    sd = opt.state_dict()
    for i, p in enumerate(_ordered_params(opt)):
        keys = {f: f"optim.{names[p]}.{f}" for f in _FIELDS}
        if all(k in t for k in keys.values()):
            sd["state"][i] = {f: t[k] for f, k in keys.items()}
    opt.load_state_dict(sd)
    torch.set_rng_state(t["rng.cpu"])
    if "rng.cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng.cuda"])
    return state


def write_best(out: Path, drafter: DrafterModel, meta: dict[str, Any]) -> Path:
    save_drafter(drafter, out / "best", meta=meta)
    return out / "best"


def append_log(out: Path, record: dict[str, Any]) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(out: Path, step: int) -> None:
    """Drop log records from steps >= `step` (written after the checkpoint a resumed run starts from)."""
    path = out / "log.jsonl"
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        limit = step if rec.get("kind") == "train" else step + 1
        if rec.get("step", 0) < limit:
            keep.append(line)
    atomic_write(path, "".join(x + "\n" for x in keep))


def read_log(out: Path, kind: str = "train") -> list[dict[str, Any]]:
    path = out / "log.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # the line a killed process did not finish
            continue
    return [r for r in recs if isinstance(r, dict) and r.get("kind") == kind]


# temporaries of mtpkit.paths: `.{dest}-{pid}-{random}` (directories) and `.{dest}.{pid}.{random}.tmp` (files);
# {random}: tempfile's 8 characters
_TEMP = re.compile(r"\.(.+)([.-])(\d+)\2[a-z0-9_]{8}(\.tmp)?")


def sweep_run(out: Path) -> None:
    """Remove the temporaries that processes which are gone (kill -9) left in the run directory `out`."""
    for d in (out, out / "data"):
        try:
            names = [p.name for p in d.iterdir() if p.name.startswith(".")]
        except OSError:
            continue
        for prefix in {f".{m[1]}{m[2]}" for m in map(_TEMP.fullmatch, names) if m}:
            sweep(d, prefix)
