"""`wmctl export RUN --out DIR [--push-to-hub REPO]`, the command-line front end of `trainer.export` (mounted by
`pipeline/cli/table.py`). It parses its options and calls `export_run` (and `push_to_hub`); errors are `UserError`s
(exit 2 under `pipeline.cli.base.WmctlGroup`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)


def export(
    run: Annotated[Path, typer.Argument(help="Run folder (its best or newest checkpoint) or checkpoint folder.")],
    out: Annotated[Path, typer.Option(help="Folder to write the model to (config.json, model.safetensors, "
                                           "encoder.json, stats.json, README.md); new or empty.")],
    weights: Annotated[str, typer.Option(help="ema (default) | model: which weights of the checkpoint.")] = "ema",
    force: Annotated[bool, typer.Option(help="Replace an earlier export in --out.")] = False,
    push_to_hub: Annotated[str | None, typer.Option(help="Then upload it to this Hugging Face model repo "
                                                         "(owner/name; made if missing; needs network and a token: "
                                                         "`hf auth login`).")] = None,
    private: Annotated[bool, typer.Option(help="With --push-to-hub: make a new repo private.")] = False,
) -> None:
    """Export a trained world model as a self-contained folder (no paths of this machine in it), loadable by every
    command that takes --run; optionally push it to the Hugging Face Hub."""
    from trainer.export import export_run
    from trainer.export import push_to_hub as push

    folder = export_run(run, out, weights=weights, force=force)
    typer.echo(f"exported {run} to {folder}: load it with --run {folder} (and --store STORE made with its encoder)")
    if (folder / "proposal").is_dir():
        typer.echo(f"with the run's amortized proposal ({folder / 'proposal'}): --planner cem+proposal|proposal plan "
                   "with it")
    if push_to_hub:
        url = push(folder, push_to_hub, private=private)
        typer.echo(f"pushed to {url}: load it with --run {push_to_hub} once `hf download {push_to_hub}` has it in "
                   "the Hugging Face cache")
