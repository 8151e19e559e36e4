"""Progress of the long stages: the plain lines of a batch log (no terminal) carry done/total, percent, rate and ETA,
and `wmctl eval` reports its windows through them."""

from __future__ import annotations

import json
import logging
import re

from typer.testing import CliRunner

import pipeline.cli.progress as progress_mod
from pipeline.cli import app
from pipeline.cli.progress import duration, progress


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _plain(monkeypatch) -> tuple[_Clock, list[str]]:
    """A fake clock, no terminal, and the list the progress lines are logged into."""
    clock, lines = _Clock(), []
    monkeypatch.setattr(progress_mod.time, "monotonic", clock)
    monkeypatch.setattr(progress_mod, "is_interactive", lambda: False)
    monkeypatch.setattr(logging.getLogger("wmctl.progress"), "info", lambda fmt, *args: lines.append(fmt % args))
    return clock, lines


def test_plain_lines_carry_count_percent_rate_and_eta(monkeypatch):
    clock, lines = _plain(monkeypatch)
    total, every = 8, 10.0
    with progress("encode demo", total=total, unit="frames", every_s=every) as advance:
        clock.now += every / 2
        advance(2)
        assert lines == []  # sooner than every_s after the start: no line
        clock.now += every
        advance(2)
        elapsed, done = 1.5 * every, 4
        rate = done / elapsed
        assert lines == [f"encode demo: {done}/{total} frames, {100 * done // total}% ({rate:.1f} frames/s, eta "
                         f"{duration((total - done) / rate)})"]
        clock.now += 1
        advance(total - done, loss="0.5")  # the total reached: a line whatever the time
    assert len(lines) == 2
    assert lines[1] == f"encode demo: {total}/{total} frames, 100% ({total / (elapsed + 1):.1f} frames/s, eta 0s, " \
                       "loss=0.5)"


def test_a_total_known_later_gives_percent_and_eta_and_none_gives_neither(monkeypatch):
    clock, lines = _plain(monkeypatch)
    with progress("eval", total=None, unit="windows", every_s=1) as advance:
        clock.now += 2
        advance(3)
        advance.set_total(12)
        clock.now += 2
        advance(3)
    assert re.fullmatch(r"eval: 3/\? windows \(1\.5 windows/s\)", lines[0])
    assert lines[1] == f"eval: 6/12 windows, 50% ({6 / 4:.1f} windows/s, eta {duration(6 / (6 / 4))})"


def test_durations_read_as_seconds_minutes_and_hours():
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600 + 7 * 60 + 30, -3)] == \
        ["0s", "59s", "1m01s", "59m59s", "1h07m", "0s"]


def test_eval_reports_its_windows_with_a_percentage(tiny_run, tmp_path):
    r = CliRunner().invoke(app, ["eval", "--run", str(tiny_run), "--horizons", "1,2", "--episodes", "1",
                                 "--out", str(tmp_path), "--tracker", "none"])
    assert r.exit_code == 0, r.output
    found = re.findall(r"eval: (\d+)/(\d+) windows, (\d+)% \(([\d.]+) windows/s, eta (\w+)\)", r.output)
    assert found, r.output
    done, total, percent, _, eta = found[-1]
    res = json.loads((tmp_path / "eval.json").read_text())
    wins, sweep = res["windows"], res["k_sweep"]
    # every condition's windows (labelled: with and without actions; action-free), then the labelled ones per K
    expected = 2 * wins["labelled"] + wins["free"] + len(sweep["mean_mse"]) * wins["labelled"]
    assert int(done) == int(total) == expected and percent == "100" and eta == "0s"
