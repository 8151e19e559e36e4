"""`--set key=value` parsing: a command-line string into a value of a dataclass field's type annotation (bool,
int, float, str, Path, an optional, a tuple of these given as a Python literal), or a ValueError saying why not.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any


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
