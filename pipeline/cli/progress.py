"""Logging and progress bars, configured once at the command line (library code only logs).

On a terminal: rich log lines and rich progress bars. In batch jobs (no TTY, e.g. SLURM): plain
timestamped lines, and progress as a plain line every `every_s` seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

_CONFIGURED = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (a handler that kept the stream of its
    first call would write into a closed one after a test runner or a job wrapper swapped it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def is_interactive() -> bool:
    return sys.stderr.isatty()


def setup_logging(verbose: bool = False) -> None:
    global _CONFIGURED
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    if _CONFIGURED:
        root.setLevel(level)
        return
    if is_interactive():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="%H:%M:%S"))
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("distributed", "urllib3", "httpx", "matplotlib", "PIL", "numcodecs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _CONFIGURED = True


ProgressFn = Callable[..., None]


def duration(seconds: float) -> str:
    """A duration as people read it: 42s, 3m05s, 2h07m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def plain_line(description: str, done: int, total: int | None, unit: str, elapsed_s: float,
               fields: dict[str, Any] | None = None) -> str:
    """A progress line for a log (no terminal): `encode x: 120/400 frames, 30% (12.0 frames/s, eta 23s)`; without
    a total, `encode x: 120/? frames (12.0 frames/s)`."""
    rate = done / max(elapsed_s, 1e-9)
    if total:
        left = f", eta {duration((total - done) / rate)}" if rate > 0 else ""
        head = f"{description}: {done}/{total} {unit}, {100 * done / total:.0f}%"
    else:
        left, head = "", f"{description}: {done}/? {unit}"
    extra = "".join(f", {k}={v}" for k, v in (fields or {}).items())
    return f"{head} ({rate:.1f} {unit}/s{left}{extra})"


@contextmanager
def progress(description: str, total: int | None, unit: str = "frames", every_s: float = 30.0):
    """Yields `advance(n=1, **fields)` (and `advance.set_total(n)`, for a total known only once the work is
    planned). On a TTY a rich bar: done/total, percent, rate, elapsed and ETA; otherwise a plain log line
    (`plain_line`: done/total, percent, rate, ETA) every `every_s` seconds and when the total is reached."""
    if is_interactive():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(description, total=total, rate="")
            start = time.monotonic()
            done = 0

            def advance(n: int = 1, **fields: Any) -> None:
                nonlocal done
                done += n
                rate = done / max(time.monotonic() - start, 1e-9)
                bar.update(task, advance=n, rate=f"{rate:.1f} {unit}/s", **fields)

            advance.set_total = lambda n: bar.update(task, total=n)  # type: ignore[attr-defined]
            yield advance
        return

    log = logging.getLogger("wmctl.progress")
    start = last = time.monotonic()
    done = 0

    def advance_plain(n: int = 1, **fields: Any) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= every_s or (total is not None and done >= total):
            log.info("%s", plain_line(description, done, total, unit, now - start, fields))
            last = now

    def set_total(n: int) -> None:
        nonlocal total
        total = n

    advance_plain.set_total = set_total  # type: ignore[attr-defined]
    yield advance_plain
