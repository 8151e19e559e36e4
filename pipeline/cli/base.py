"""What every command module shares: the app class that turns a `UserError` into exit code 2 (the one place),
the error line, the console, and the parsers of hand-written option values."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from pipeline.stage import UserError


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


class WmctlGroup(TyperGroup):
    """A command group in which any `UserError` a command raises becomes one red line and exit code 2."""

    def invoke(self, ctx):  # noqa: D102 - click's signature
        try:
            return super().invoke(ctx)
        except UserError as e:
            fail(str(e))


def new_app(help: str, **kw: Any) -> typer.Typer:
    return typer.Typer(help=help, cls=WmctlGroup, no_args_is_help=True, pretty_exceptions_enable=False,
                       add_completion=False, **kw)


def console():
    """A rich console; in batch logs (not a terminal: SLURM, CI) wide enough that tables keep their columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=160)


def split_list(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else ()


def int_list(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in split_list(text))
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {text!r}") from None


def hxw(text: str, option: str = "--image-size", example: str = "224 or 224x400") -> tuple[int, int]:
    """'N' or 'HxW' -> (H, W); a clear error naming the option otherwise."""
    try:
        h, _, w = text.lower().partition("x")
        size = int(h), int(w or h)
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise UserError(f"{option} {text!r}: expected N or HxW (positive integers), e.g. {example}")
    return size


def print_result(title: str, result: dict) -> None:
    """A benchmark's figures as a two-column table, then as one JSON line (the last line, for scripts)."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in result.items():
        table.add_row(k, f"{v:.3g}" if isinstance(v, float) else str(v))
    console().print(table)
    typer.echo(json.dumps(result))


def given_options(ctx: typer.Context) -> set[str]:
    """The parameters the command line set (not left at their defaults)."""
    return {p.name for p in ctx.command.params  # typer ships its own click: compare the source by name
            if getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
