"""Progress of the long phases of `distill` and `eval-drafter`, on stderr (stdout stays clean for --json).

- `Counter`: many small units (tokens the target generates, rows scored): a rich bar on a terminal, else a
  plain line at every further 10 % (and after a silent minute) with the elapsed and estimated remaining time.
- `TrainProgress`: the training bar (step, live loss, per-step greedy acceptance, last held-out tau); off a
  terminal the same as plain lines, every ~10 % of the steps.

MTPKIT_QUIET=1 silences both (mtpkit.progress); `enabled=False` (--no-progress) too.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from mtpkit.progress import _quiet, note


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def _bar(*columns: Any):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn
    return Progress(columns[0], BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    *columns[1:], console=Console(stderr=True), transient=False)


class _Lines:
    """Plain-line mode: `due(done)` is true once per further 10 % of `total` (and at the end), and after a minute
    without a line if anything was done meanwhile."""

    HEARTBEAT = 60.0

    def __init__(self, total: int, done: int = 0):
        self.total, self.start, self.t0 = max(total, 1), done, time.monotonic()
        self.next, self.last = self._mark(done), (self.t0, done)

    def _mark(self, done: int) -> int:
        m = done * 10 // self.total  # the next tenth of `total` above `done`
        while m * self.total // 10 <= done:
            m += 1
        return min(self.total, m * self.total // 10)

    def due(self, done: int) -> bool:
        now = time.monotonic()
        if done < self.next and not (now - self.last[0] >= self.HEARTBEAT and done > self.last[1]):
            return False
        if done >= self.next:
            self.next = self._mark(done) if done < self.total else self.total + 1
        self.last = (now, done)
        return True

    def times(self, done: int) -> str:
        el = time.monotonic() - self.t0
        rate = (done - self.start) / el if el > 0 else 0.0
        left = f", ~{duration((self.total - done) / rate)} left" if rate > 0 and done < self.total else ""
        return f"{duration(el)}{left}"


class Counter:
    """with Counter("distill: generating data", total, "tokens") as c: c.advance(n) per unit of work done."""

    def __init__(self, title: str, total: int, unit: str, enabled: bool = True):
        self.title, self.total, self.unit, self.done = title, total, unit, 0
        self.on = enabled and not _quiet() and total > 0
        self.bar = _bar(_text(f"[bold]{title}[/] ({unit})")) if self.on and sys.stderr.isatty() else None
        self.lines = _Lines(total)

    def __enter__(self) -> Counter:
        if self.bar is not None:
            self.task = self.bar.add_task("", total=self.total)
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif self.on and self.lines.due(self.done):
            note(f"{self.title}: {100 * self.done // max(self.total, 1)}% ({self.done}/{self.total} {self.unit}, "
                 f"{self.lines.times(self.done)})")

    def log(self, msg: str) -> None:
        """A line that does not break the bar."""
        if self.bar is not None:
            self.bar.console.print(msg, markup=False, highlight=False)
        elif not _quiet():
            note(msg)


def _text(fmt: str):
    from rich.progress import TextColumn
    return TextColumn(fmt)


class TrainProgress:
    def __init__(self, total: int, done: int, k: int, enabled: bool = True):
        self.k, self.total = k, total
        self.on = enabled and not _quiet()
        self.bar = _bar(_text("distill"), _text("{task.fields[info]}")) if self.on and sys.stderr.isatty() else None
        if self.bar is not None:
            self.task = self.bar.add_task("distill", total=total, completed=done, info="")
        self.lines = _Lines(total, done)
        self.info = ""

    def __enter__(self) -> TrainProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, rec: dict[str, Any], last_eval: dict[str, Any] | None) -> None:
        if not self.on:
            return
        acc = rec.get("accept0") or rec.get("accept1") or []
        info = f"loss {rec['loss']:.4f}  acc " + "/".join(f"{a:.2f}" for a in acc)
        for t in ("tau0", "tau1"):  # the loop's walk on held-out rows
            if last_eval and last_eval.get(f"{t}_loop") is not None:
                info += f"  {t} {last_eval[f'{t}_loop']:.3f}"
        self.info = info
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.lines.due(step):
            note(f"distill: step {step}/{self.total}  {info} ({self.lines.times(step)})")

    def phase(self, step: int, what: str) -> None:
        """A stretch without steps (held-out evaluation, checkpoint) shown in the bar, or as one line."""
        if self.bar is not None:
            self.bar.update(self.task, info=f"{self.info}  [{what}]")
        elif self.on:
            note(f"distill: step {step}/{self.total}: {what}")
