"""The command line's layout: each stage owns its commands and the root mounts them by name from the command table
(`pipeline.cli.table`), importing one on first use. Every entry resolves to a click command of its name whose
listing line is the table's; the commands are the documented ones (docs/layout.md); the error mapping applies to
lazily loaded commands; and `wmctl --help` / `wmctl ingest --help` import no torch, transformers, lerobot or zarr and
take under a second."""

from __future__ import annotations

import errno
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.core import TyperCommand, TyperGroup
from typer.main import get_command
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.base import WmctlGroup
from pipeline.cli.lazy import LazyGroup, click_command, load
from pipeline.cli.table import BENCH, COMMANDS, MANIFEST_NOTES
from pipeline.stage import UserError

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"": COMMANDS, "bench": BENCH}
STAGES = {"pipeline", "featurestore", "trainer", "planner"}

EXPECTED = {  # every command of `wmctl`, groups' commands included
    "ingest", "datasets", "encode", "status", "probe", "train", "train-proposal", "eval", "visualize",
    "data pusht", "data multicam", "data metaworld", "encoder init-random", "encoder fetch", "decoder train",
    "plan offline", "plan sim", "plan compare", "export", "robot serve", "robot lerobot-eval",
    "bench decode", "bench encode", "bench rollout", "bench plan", "bench train",
}


def _listing(help_text: str | None) -> str:
    """The first paragraph of a help text: what typer lists for a command in its group's help."""
    return inspect.cleandoc(help_text or "").split("\n\n")[0].strip()


@pytest.mark.parametrize("group,name", [(g, n) for g, table in TABLES.items() for n in table])
def test_every_table_entry_imports_as_a_click_command_of_its_name(group, name):
    entry = TABLES[group][name]
    module = entry.target.partition(":")[0]
    assert module.split(".")[0] in STAGES
    assert module.startswith("pipeline.cli") or module.rpartition(".")[2].startswith("cli"), \
        f"{entry.target}: not a command module (<stage>/cli.py or <stage>/cli_<topic>.py)"
    cmd = click_command(name, load(entry.target))
    assert isinstance(cmd, (TyperCommand, TyperGroup)) and cmd.name == name
    assert not isinstance(cmd, TyperGroup) or isinstance(cmd, WmctlGroup), f"{name}: a group without error mapping"
    assert _listing(cmd.short_help or cmd.help) == entry.summary, f"{name}: the table's listing line is stale"


def test_manifest_notes_resolve_to_functions():
    for target in MANIFEST_NOTES:
        assert callable(load(target)) and target.partition(":")[0].endswith(".cli")


def _walk(cmd, path: tuple[str, ...] = ()):
    import typer

    ctx = typer.Context(cmd, info_name=path[-1] if path else "wmctl")
    if not hasattr(cmd, "list_commands"):
        yield " ".join(path)
        return
    for name in cmd.list_commands(ctx):
        yield from _walk(cmd.get_command(ctx, name), (*path, name))


def test_the_commands_are_the_documented_ones():
    root = get_command(app)
    assert isinstance(root, LazyGroup) and root.list_commands(None) == list(COMMANDS)
    assert set(_walk(root)) == EXPECTED
    rows = re.findall(r"^\| `wmctl ([a-z -]+)` \| `([\w.]+:\w+)` \|", (ROOT / "docs/layout.md").read_text(), re.M)
    table = {name: e.target for name, e in COMMANDS.items()} | {f"bench {n}": e.target for n, e in BENCH.items()}
    assert dict(rows) == table, "docs/layout.md's command table differs from pipeline/cli/table.py"


def test_a_mistyped_command_is_named_with_the_close_ones():
    r = CliRunner().invoke(app, ["ingst"])
    assert r.exit_code == 2 and "No such command 'ingst'. Did you mean 'ingest'?" in r.output
    r = CliRunner().invoke(app, ["bench", "trian"])
    assert r.exit_code == 2 and "Did you mean 'train'?" in r.output


def test_lazily_loaded_commands_keep_the_error_mapping(monkeypatch):
    """A command of a stage, and one of the `bench` table below the root: UserError 2, OSError 4, a bug 5; one
    error line each."""
    import featurestore.cli
    import trainer.cli

    def raises(e: BaseException):
        def f(*args, **kwargs):
            raise e
        return f

    for module, attr, args in ((featurestore.cli, "store_status", ["status"]),
                               (trainer.cli, "bench_train", ["bench", "train", "--preset", "tiny"])):
        for exc, code in ((UserError("bad input"), 2), (OSError(errno.ENOSPC, "No space left on device"), 4),
                          (ZeroDivisionError("division by zero"), 5)):
            monkeypatch.setattr(module, attr, raises(exc))
            r = CliRunner().invoke(app, args)
            assert r.exit_code == code, (args, exc, r.output)
            assert len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1, r.output


PROBE = """
import io, json, sys, time
from contextlib import redirect_stdout

start = time.process_time()  # CPU seconds: what the import costs, not how busy the machine is
from pipeline.cli import app

out = io.StringIO()
with redirect_stdout(out):
    try:
        app(sys.argv[1:], prog_name="wmctl")
        code = 0
    except SystemExit as e:
        code = e.code
heavy = [m for m in ("torch", "transformers", "lerobot", "zarr") if m in sys.modules]
print(json.dumps({"code": code, "seconds": time.process_time() - start, "heavy": heavy,
                  "help": "Usage: wmctl" in out.getvalue()}))
"""


def _probe(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120")
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["ingest", "--help"]], ids=["wmctl --help", "wmctl ingest --help"])
def test_help_imports_no_stage_it_does_not_show_and_takes_under_a_second(args):
    got = _probe(*args)
    assert got["code"] == 0 and got["help"], got
    assert got["heavy"] == [], f"wmctl {' '.join(args)} imported {got['heavy']}"
    if got["seconds"] >= 1.0:  # CPU time still grows a little on a loaded machine (caches): measure once more
        got = _probe(*args)
    assert got["seconds"] < 1.0, f"wmctl {' '.join(args)} took {got['seconds']:.2f} CPU seconds"


def test_the_console_script_and_python_m_run_the_same_app():
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120")
    script = Path(sys.executable).parent / "wmctl"
    runs = [[sys.executable, "-m", "pipeline.cli", "--help"]] + ([[str(script), "--help"]] if script.exists() else [])
    for cmd in runs:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        listed = re.findall(r"^│ (\S+) ", r.stdout, re.M)
        assert r.returncode == 0 and listed[-len(COMMANDS):] == list(COMMANDS), (cmd, r.stdout, r.stderr)


@pytest.mark.parametrize("command", ["serve", "lerobot-eval"])
def test_the_robot_commands_name_the_lerobot_they_need(command, monkeypatch, tmp_path):
    from packaging.version import Version

    import pipeline.lerobot_compat as compat

    monkeypatch.setattr(compat, "LEROBOT_VERSION", Version("0.4.4"))  # the previous stack's
    r = CliRunner().invoke(app, ["robot", command, "--run", str(tmp_path)])
    assert r.exit_code == 2 and f"wmctl robot {command} needs lerobot >= 0.6" in r.output, r.output
    assert "lerobot 0.4.4" in r.output and "Traceback" not in r.output
