"""The training progress bar (rich, on stderr): step, live loss, per-step greedy acceptance, last held-out tau."""

from __future__ import annotations

from typing import Any


class TrainProgress:
    def __init__(self, total: int, done: int, k: int, enabled: bool = True):
        self.enabled, self.k = enabled, k
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        self.progress = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=Console(stderr=True), transient=False)
        self.task = self.progress.add_task("distill", total=total, completed=done, info="")

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, step: int, rec: dict[str, Any], last_eval: dict[str, Any] | None) -> None:
        if not self.enabled:
            return
        acc = rec.get("accept0") or rec.get("accept1") or []
        info = f"loss {rec['loss']:.4f}  acc " + "/".join(f"{a:.2f}" for a in acc)
        if last_eval and last_eval.get("tau0") is not None:
            info += f"  tau0 {last_eval['tau0']:.3f}"
        if last_eval and last_eval.get("tau1") is not None:
            info += f"  tau1 {last_eval['tau1']:.3f}"
        self.progress.update(self.task, completed=step, info=info)
