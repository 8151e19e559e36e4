"""`--set key=value` parsing: a command-line string into a value of a dataclass field's type annotation (bool,
int, float, str, Path, an optional, a tuple of these given as a Python literal), or a ValueError saying why not
(`coerce`); and `apply_set`, the `--set` of every stage command whose behaviour a frozen dataclass holds.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SET_HELP = "Change any config field: key=value (repeatable; dotted for nested fields); unknown keys are errors."


def apply_set(cfg: Any, items: Iterable[str] | None, *, what: str) -> Any:
    """`cfg` (a dataclass, frozen or not) with each `key=value` of `items` applied in order: `key` a field's name,
    dotted into nested dataclasses (`cem.samples=128`), the value parsed for the field's type (`coerce`) and the
    config rebuilt (`dataclasses.replace`: its own checks run). Any other key, a value that does not parse or a
    config that refuses it is a `UserError` naming the key (and for an unknown key, the known fields); `what`
    names the command ("plan sim") in it."""
    from pipeline.stage import UserError  # the stage module is heavier than this one

    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{what} --set {item!r}: expected key=value")
        try:
            cfg = _set(cfg, key.split("."), value, key, what)
        except UserError:
            raise
        except (ValueError, SyntaxError, TypeError, NameError, MemoryError, RecursionError) as e:
            raise UserError(f"{what} --set {key}={value}: {e}") from None
    return cfg


def _set(obj: Any, path: list[str], value: str, key: str, what: str) -> Any:
    from pipeline.stage import UserError

    name, rest = path[0], path[1:]
    fields = {f.name: f for f in dataclasses.fields(obj) if f.init}
    if name not in fields:
        where = f" of {'.'.join(key.split('.')[:-len(path)])}" if len(path) < len(key.split(".")) else ""
        raise UserError(f"{what} --set {key}: unknown field{where}; known: {', '.join(sorted(fields))}")
    current = getattr(obj, name)
    nested = dataclasses.is_dataclass(current) and not isinstance(current, type)
    if rest:
        if not nested:
            raise UserError(f"{what} --set {key}: {name} has no fields (set it as {name}=value)")
        new = _set(current, rest, value, key, what)
    elif nested:
        known = ", ".join(f"{name}.{f.name}" for f in dataclasses.fields(current) if f.init)
        raise UserError(f"{what} --set {key}: a group of fields; set one of them: {known}")
    else:
        new = coerce(value, _hints(type(obj)).get(name, fields[name].type))
    return dataclasses.replace(obj, **{name: new})


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (its fields' `type` strings where a name in them cannot be found:
    `coerce` then refuses those fields alone)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - a name imported only for type checking: resolve nothing, refuse per field
        return {}


def coerce(value: str, annotation: Any) -> Any:
    """Parse a --set value for a field annotated `annotation` (strings from the command line)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"Path": Path, "Any": Any, "tuple": tuple})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        return coerce(value, next(a for a in args if a is not type(None)))
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if annotation in (int, float, str):
        return annotation(value)
    if annotation is Path:
        return Path(value)
    if origin is tuple:
        import ast

        return _typed(ast.literal_eval(value), annotation)
    raise ValueError(f"cannot parse a value for {annotation}")


def _typed(obj: Any, annotation: Any) -> Any:
    """A literal (from ast.literal_eval) checked against a tuple annotation, item by item, as tuples."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        if not isinstance(obj, (list, tuple)):
            raise ValueError(f"expected a tuple for {annotation}, got {obj!r}")
        kinds = [args[0]] * len(obj) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(obj):
            raise ValueError(f"expected {len(kinds)} items for {annotation}, got {obj!r}")
        return tuple(_typed(x, k) for x, k in zip(obj, kinds))
    if annotation is float and isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return float(obj)
    if annotation in (int, str) and isinstance(obj, annotation) and not isinstance(obj, bool):
        return obj
    raise ValueError(f"expected {getattr(annotation, '__name__', annotation)}, got {obj!r}")
