"""Stopping and resuming a `plan sim`: the finished trials written down as they finish (`SimProgress`, the
partial-trial file `<out>/sim.partial.jsonl` and the strips waiting beside it), and SIGTERM turned into a stop that
keeps them (`sigterm_stops`, `SimStopped`: the same command continues after them)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.stage import atomic_write_bytes
from planner.results import POLICY_IDS, TrialStart, save_strip

log = logging.getLogger(__name__)

PARTIAL, PARTIAL_STRIPS = "sim.partial.jsonl", "sim.partial-strips"


class SimStopped(Exception):
    """SIGTERM during `plan sim`: the finished trials are kept (`SimProgress`); the same command continues."""

    def __init__(self, kept: int, total: int, partial: Path | None):
        self.kept, self.total = kept, total
        where = f" in {partial}" if partial else " (not written: no --out)"
        super().__init__(f"plan sim stopped on request: {kept} of {total} trials finished and kept{where}; run the "
                         "same command again to continue after them")


class Terminated(Exception):
    pass


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM (a scheduler's stop, `kill`) raises Terminated in the trial loop instead of ending the process."""
    def stop(signum, frame):
        raise Terminated()

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: the default action stays
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class SimProgress:
    """The finished trials of a `plan sim` in progress: `<out>/sim.partial.jsonl`, a header line (the run's
    configuration, model, simulator and trials), then one line per finished trial, appended and fsynced as it
    finishes (a line torn by a kill is dropped when read back); the PNG strips of finished trials wait in
    `<out>/sim.partial-strips/`. A run of the same configuration continues after them; one of another
    configuration starts over. sim.json replaces them at the end."""

    def __init__(self, out: Path | None, header: dict[str, Any]):
        self.header = json.loads(json.dumps(header))
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        self.strips: dict[int, Path] = {}
        self.file = Path(out) / PARTIAL if out is not None else None
        self.strips_dir = Path(out) / PARTIAL_STRIPS if out is not None else None
        if self.file is not None:
            self._resume()

    def _resume(self) -> None:
        lines = self.file.read_bytes().splitlines() if self.file.is_file() else []
        records = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:  # torn by a kill while being appended: it and anything after it are dropped
                break
            if records and not _is_trial_record(rec):
                break
            records.append(rec)
        if not records or records[0] != {"header": self.header}:
            if len(records) > 1:
                log.warning("%s holds %d finished trials of another configuration (or model): starting over",
                            self.file, len(records) - 1)
            shutil.rmtree(self.strips_dir, ignore_errors=True)
            atomic_write_bytes(self.file, _line({"header": self.header}))
            return
        if len(records) < len(lines):  # rewrite without the torn tail before appending after it
            atomic_write_bytes(self.file, b"".join(_line(r) for r in records))
        for r in records[1:]:
            self.done[(r["policy"], r["index"])] = r["result"]
            if r.get("strip"):
                self.strips[r["index"]] = self.strips_dir / r["strip"]
        if self.done:
            log.info("resuming from %s: %d finished trials kept", self.file, len(self.done))

    def add(self, policy: str, index: int, result: dict[str, Any], strip: tuple[TrialStart, dict[str, Any]] | None
            ) -> None:
        record: dict[str, Any] = {"policy": policy, "index": index, "result": result}
        if self.file is not None:
            if strip is not None:
                path = save_strip(*strip, self.strips_dir)
                self.strips[index] = path
                record["strip"] = path.name
            fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, _line(record))  # one write of one line: a kill leaves it whole or torn, never mixed
                os.fsync(fd)
            finally:
                os.close(fd)
        self.done[(policy, index)] = result

    def clear(self) -> None:
        if self.file is not None:
            self.file.unlink(missing_ok=True)
            shutil.rmtree(self.strips_dir, ignore_errors=True)


def _is_trial_record(rec: Any) -> bool:
    return (isinstance(rec, dict) and rec.get("policy") in POLICY_IDS and isinstance(rec.get("index"), int)
            and isinstance(rec.get("result"), dict) and "success" in rec["result"])


def _line(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()
