"""Progress for long work, on stderr: a rich bar on a terminal, one plain line per step otherwise (logs, CI, pipes).

    with steps("export gguf", 4) as say:
        say("reading the target")      # starts step 1 of 4
        ...
        say("writing target.gguf")     # step 2 of 4

Off a terminal each step prints `export gguf [2/4] writing target.gguf (12 s)` (seconds since the start), and the
end `export gguf: done in 31 s`; stdout stays clean for `--json`. MTPKIT_QUIET=1 silences both.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator


def _quiet() -> bool:
    return os.environ.get("MTPKIT_QUIET", "") not in ("", "0")


def note(msg: str) -> None:
    """One line on stderr (unless MTPKIT_QUIET)."""
    if not _quiet():
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def steps(title: str, total: int) -> Iterator[Callable[[str], None]]:
    """Yield say(description), which starts the next of `total` steps."""
    t0 = time.perf_counter()
    done = [0]
    if _quiet():
        yield lambda what: None
        return
    if not sys.stderr.isatty():
        def say(what: str) -> None:
            done[0] += 1
            at = f" ({time.perf_counter() - t0:.0f} s)" if done[0] > 1 else ""
            print(f"{title} [{done[0]}/{total}] {what}{at}", file=sys.stderr, flush=True)
        yield say
        print(f"{title}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    bar = Progress(TextColumn(f"[bold]{title}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task("", total=total)

    def say_bar(what: str) -> None:
        bar.update(task, description=what, completed=done[0])
        done[0] += 1
    with bar:
        yield say_bar
