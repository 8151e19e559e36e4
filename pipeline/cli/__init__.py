"""The `wmctl` command line, one module per command group; each command parses its options, builds the stage's
config, calls `run_<stage>(cfg)` and prints. Errors become one red line and an exit code in one place
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

from pipeline.lerobot_io import offline_env

offline_env()  # nothing downloads at run time: Hub clients see HF_HUB_OFFLINE=1 unless the user set it otherwise

import typer  # noqa: E402

from pipeline.cli import bench, data, encode, evaluate, ingest, plan, train  # noqa: E402
from pipeline.cli.base import new_app  # noqa: E402
from pipeline.cli.progress import setup_logging  # noqa: E402

app = new_app("Latent world models from LeRobot video: data -> ingest -> encode -> train -> eval -> plan.",
              name="wmctl")
app.add_typer(data.app, name="data")
app.add_typer(encode.encoder_app, name="encoder")
app.add_typer(evaluate.decoder_app, name="decoder")
app.add_typer(plan.app, name="plan")
app.add_typer(bench.app, name="bench")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    setup_logging(verbose)


app.command()(ingest.ingest)
app.command()(ingest.datasets)
app.command()(encode.encode)
app.command()(encode.status)
app.command()(encode.probe)
app.command()(train.train)
app.command("eval")(evaluate.eval_)
app.command()(evaluate.visualize)


def run() -> None:  # pragma: no cover - console entry for `python -m pipeline.cli`
    sys.exit(app())
