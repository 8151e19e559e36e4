"""Commands mounted by name (Click's LazyGroup pattern on typer's groups): a `LazyGroup` lists the commands of its
table without importing them and imports one ("module:attribute") the first time it runs or shows its own help, so
`wmctl --help` and `wmctl ingest --help` load no stage they do not show (no torch, transformers, lerobot or zarr).

A loaded command is the click command typer builds for `add_typer` (a `typer.Typer`: a group) or `command` (a
function), and runs under the error mapping of `WmctlGroup` (exit 2/4/5, one line) like every command.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from difflib import get_close_matches
from typing import Any, ClassVar

import typer
from typer.core import TyperCommand
from typer.main import get_command, get_group

from pipeline.cli.base import WmctlGroup

try:
    from typer._click.exceptions import UsageError  # typer 0.2x ships its own click
except ImportError:  # pragma: no cover - a typer that builds on click
    from click.exceptions import UsageError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Lazy:
    """One command of a table: `target`, "module:attribute" of a function (a command) or a `typer.Typer` (a group);
    `summary`, its line in the group's listing: the first paragraph of its help, as typer shows it (the tests hold
    it to the command's own help), so that listing a group imports none of its commands."""

    target: str
    summary: str


def load(target: str) -> Any:
    """The object that "module:attribute" names, its module imported now."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def click_command(name: str, obj: Any) -> Any:
    """`obj` as the click command typer mounts under `name`: a `typer.Typer` as its group (`add_typer`), a function
    as a command (`command`)."""
    if isinstance(obj, typer.Typer):
        group = get_group(obj)
        group.name = name
        return group
    if not callable(obj):
        raise TypeError(f"command {name!r}: {obj!r} is neither a typer.Typer nor a function")
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name)(obj)
    return get_command(single)


class LazyGroup(WmctlGroup):
    """A `WmctlGroup` whose commands are the entries of `table` (name -> `Lazy`), listed in its order and imported
    on first use. A subclass names its table: `class Root(LazyGroup): table = COMMANDS`."""

    table: ClassVar[dict[str, Lazy]] = {}

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self._loaded: dict[str, Any] = {}
        self._listing = False

    def list_commands(self, ctx: typer.Context) -> list[str]:  # noqa: D102 - click's signature
        return list(self.table)

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        """The command `cmd_name`, imported now if it was not; while this group prints its help, a stand-in
        that carries only what the listing shows (name and summary)."""
        entry = self.table.get(cmd_name)
        if entry is None:
            return super().get_command(ctx, cmd_name)
        if self._listing:
            return TyperCommand(cmd_name, help=entry.summary)
        if cmd_name not in self._loaded:
            log.debug("loading %s from %s", cmd_name, entry.target)
            self._loaded[cmd_name] = click_command(cmd_name, load(entry.target))
        return self._loaded[cmd_name]

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:  # noqa: D102 - click's signature
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> Any:  # noqa: D102 - click's signature
        try:
            return super().resolve_command(ctx, args)
        except UsageError as e:  # typer suggests the close names among the commands it holds: here the table's
            matches = get_close_matches(args[0], list(self.table)) if args else []
            if matches and getattr(self, "suggest_commands", True):
                e.message = f"{e.message.rstrip('.')}. Did you mean {', '.join(repr(m) for m in matches)}?"
            raise
