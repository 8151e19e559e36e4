"""The `wmctl` command line: the root app, whose commands live with their stage (`pipeline/cli/` holds the pipeline
stage's, `featurestore/cli.py`, `trainer/cli.py` and `planner/cli.py` the others') and are mounted by name from the
command table (`pipeline.cli.table`), each imported on first use. Each command parses its options, builds the
stage's config, calls `run_<stage>(cfg)` and prints. Errors become one red line and an exit code in one place
(`pipeline.cli.base.WmctlGroup`).

Exit codes: 0 done (or nothing to do); 1 finished but some episodes failed (they are listed, the rest is
committed); 2 the user must act before anything can run (bad path, bad config, changed config, damaged file: the
line names it and the fix; also a path the operating system refuses as given: a file where a folder should be, a
name too long, a symlink loop); 3 stopped on request (training preempted after writing a checkpoint; `plan sim`
stopped with its finished trials kept): run the same command again to continue; 4 the machine failed (disk full,
quota, read-only file system, permission denied, I/O error): the line names the path and the fix, nothing half
written is committed, and the same command continues once it is fixed; 5 an unexpected error (a bug): the
traceback, then the line. No error exits 1.
"""

from __future__ import annotations

import sys
from typing import Annotated

from pipeline.lerobot_compat import offline_env

offline_env()  # nothing downloads at run time: Hub clients see HF_HUB_OFFLINE=1 unless the user set it otherwise

import typer  # noqa: E402

from pipeline.cli.base import new_app  # noqa: E402
from pipeline.cli.lazy import LazyGroup  # noqa: E402
from pipeline.cli.progress import setup_logging  # noqa: E402
from pipeline.cli.table import COMMANDS  # noqa: E402


class RootGroup(LazyGroup):
    table = COMMANDS


app = new_app("Latent world models from LeRobot video: data -> ingest -> encode -> train -> eval -> plan.",
              cls=RootGroup, name="wmctl")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    setup_logging(verbose)


def run() -> None:  # pragma: no cover - console entry for `python -m pipeline.cli`
    sys.exit(app())
