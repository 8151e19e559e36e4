"""The option types that the planner's command lines share (`planner/cli.py`: `plan`, `bench plan`;
`planner/cli_serve.py`: `robot serve | lerobot-eval`): one declaration each, so their help cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Run = Annotated[Path | None, typer.Option(help="Run folder (default: newest under runs/).")]
Ckpt = Annotated[Path | None, typer.Option(help="Checkpoint folder.")]
Planner = Annotated[str, typer.Option(help="cem | gd | cem+proposal (CEM started from the run's proposal) | "
                                      "proposal (its actions alone; `wmctl train-proposal` first).")]
Samples = Annotated[int, typer.Option(help="CEM candidate action sequences per iteration.")]
Elites = Annotated[int, typer.Option(help="CEM elites.")]
Iterations = Annotated[int, typer.Option(help="CEM iterations.")]
Seed = Annotated[int, typer.Option(help="Seed.")]
K = Annotated[int, typer.Option(help="Shortcut steps per frame in the planner's rollouts.")]
