"""Read a TOML table into a frozen dataclass, field by field, with errors that name the field.

Each section of a scenario file is a dataclass whose fields carry their help
text in ``field(metadata={"help": ...})``. :func:`read_section` checks the
table's keys against the fields (an unknown key is an error, with the closest
field suggested), converts each value to the field's annotated type (int,
float, bool, str, Path, an Enum by value, ``X | None``, ``tuple[int, ...]``,
``dict[str, scalar]``) and builds the dataclass, so ``__post_init__`` checks
run too. Every error is a :class:`ScenarioError` reading
``FILE: [section] key: what is wrong``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from fedge.errors import ConfigError

__all__ = ["ScenarioError", "help_of", "read_section", "type_name"]

T = TypeVar("T")

_MISSING = dataclasses.MISSING


class ScenarioError(ConfigError):
    """A scenario file is malformed: the message names the file, the section and the field."""


def help_of(field: dataclasses.Field[Any]) -> str:
    """Return a field's help text (``metadata["help"]``)."""
    return str(field.metadata.get("help", ""))


def type_name(annotation: Any) -> str:
    """Return how the schema documentation names a field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return " | ".join(type_name(a) for a in inner) + " (optional)"
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return "table"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " | ".join(repr(member.value) for member in annotation)
    if annotation is Path:
        return "path"
    if annotation in (int, float, bool, str):
        return {int: "integer", float: "number", bool: "boolean", str: "string"}[annotation]
    return str(annotation)


def _describe(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{value!r} ({type(value).__name__})"


def _to_bool(value: object) -> object:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _to_int(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_describe(value)}")
    return value


def _to_float(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {_describe(value)}")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def _to_str(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    return value


def _to_table(value: object) -> object:
    if not isinstance(value, dict):
        raise ValueError(f"expected a table, got {_describe(value)}")
    for key, item in value.items():
        if isinstance(item, (dict, type(None))):
            raise ValueError(f"{key}: expected a number, string, boolean or list, got a table")
    return {
        str(key): tuple(item) if isinstance(item, list) else item for key, item in value.items()
    }


_SCALARS: dict[Any, Any] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
}


def _union(value: object, args: tuple[Any, ...], *, base: Path | None) -> object:
    errors = []
    for candidate in (a for a in args if a is not type(None)):
        try:
            return _convert(value, candidate, base=base)
        except ValueError as exc:
            errors.append(str(exc))
    raise ValueError(" or ".join(errors))


def _convert(value: object, annotation: Any, *, base: Path | None) -> object:
    """Return ``value`` as ``annotation``, or raise ValueError saying what was expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        return _union(value, args, base=base)
    if annotation in _SCALARS:
        return _SCALARS[annotation](value)
    if annotation is Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a path (a string), got {_describe(value)}")
        path = Path(value).expanduser()
        return path if path.is_absolute() or base is None else base / path
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        choices = [member.value for member in annotation]
        try:
            return annotation(value)
        except ValueError:
            raise ValueError(f"expected one of {choices}, got {_describe(value)}") from None
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {_describe(value)}")
        return tuple(_convert(item, args[0], base=base) for item in value)
    if origin is dict:
        return _to_table(value)
    raise TypeError(f"unsupported field type {annotation!r}")  # a schema bug, not user input


def read_section(
    table: object, cls: type[T], *, section: str, source: str, base: Path | None = None
) -> T:
    """Build ``cls`` from a TOML table, checking every key and value.

    Parameters
    ----------
    table
        The parsed TOML value of the section (a missing section: ``{}``).
    cls
        A dataclass whose fields are the section's keys.
    section
        The section's name in messages (``population``).
    source
        The file's name in messages.
    base
        Relative paths are taken relative to this directory (the file's).

    Raises
    ------
    ScenarioError
        If the section is not a table, a key is unknown, a required key is
        missing, a value has the wrong type, or the dataclass refuses the values.
    """
    where = f"{source}: [{section}]"
    if not isinstance(table, Mapping):
        raise ScenarioError(f"{where}: expected a table, got {_describe(table)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in table:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ScenarioError(
                f"{where} has no field {key!r}{hint}; its fields are: {', '.join(fields)}"
            )
    values: dict[str, object] = {}
    for name, field in fields.items():
        if name in table:
            try:
                values[name] = _convert(table[name], hints[name], base=base)
            except ValueError as exc:
                raise ScenarioError(f"{where} {name}: {exc}") from None
        elif field.default is _MISSING and field.default_factory is _MISSING:
            raise ScenarioError(f"{where} {name}: required ({help_of(field)})")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ScenarioError(f"{where} {exc}") from None
