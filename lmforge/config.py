"""Typed configs: dataclasses whose fields document themselves, built from defaults < YAML < flags.

A config class declares each field with :func:`option` (default + one-line help) and validates
itself in ``__post_init__`` by raising :class:`ConfigError`. This module turns such a class into
command-line flags (``--vocab-size``), reads YAML files, coerces values to the annotated types and
names the offending field and source when something does not fit.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from lmforge.errors import ConfigError

C = TypeVar("C")
FLAGS = "command line"  # the source name of values given as flags


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a default (copied if it is a list or dict) and its help text."""
    if isinstance(default, list | tuple | dict):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default),
                                 metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def check_at_least(config: Any, minimum: float, *names: str, prefix: str = "") -> None:
    """For ``__post_init__``: reject the first field of ``names`` whose value is below ``minimum``
    (``prefix`` names the section, e.g. ``"spike."``)."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ConfigError(f"{prefix}{name}: must be >= {minimum}, got {value}")


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` as type ``hint`` (int, float, str, bool, dict, Literal, list[X], X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if isinstance(value, str):  # from a flag: JSON
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{name}: expected a JSON object, got {value!r} ({e})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")
        try:
            out = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and out != value:
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if hint is float and not math.isfinite(out):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return out
    if hint is str:
        if not isinstance(value, str | int | float | Path):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type[C], *sources: tuple[str, dict[str, Any]]) -> C:
    """Instantiate ``cls`` from ``(source name, values)`` pairs, later ones overriding earlier."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for source, given in sources:
        for key, value in given.items():
            field = key.replace("-", "_")
            if field not in names:
                raise ConfigError(f"{source}: unknown field {key!r} for {cls.__name__}; known: "
                                  f"{', '.join(sorted(names))}")
            values[field] = _coerce(value, hints[field], f"{source}: {field}")
    return cls(**values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; --config takes a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; --config takes a YAML file") from None
    except yaml.YAMLError as e:
        reason = " ".join(str(e).split())  # PyYAML's message spans lines
        raise ConfigError(f"{path}: not valid YAML ({reason})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    return data


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field of ``cls``; only flags actually given override the config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{f.metadata.get('help', '')} (default: {default})"}
        if typing.get_origin(hint) is list:
            kwargs["nargs"] = "+"
        elif typing.get_origin(hint) is Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def flag(field: str) -> str:
    """The command-line flag of a config field: ``utf8_errors`` → ``--utf8-errors``."""
    return "--" + field.replace("_", "-")


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Defaults < ``--config FILE`` (YAML) < flags. An error about a field names it as the flag
    a user types (``--lr: must be > 0``)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    flags = {k: v for k, v in vars(args).items() if k in names}
    yaml_path = getattr(args, "config", None)
    sources = [(str(yaml_path), load_yaml(yaml_path))] if yaml_path else []
    try:
        return build(cls, *sources, (FLAGS, flags))
    except ConfigError as e:
        message = str(e).removeprefix(f"{FLAGS}: ")
        field = message.split(":", 1)[0]
        if field in names:
            raise ConfigError(flag(field) + message[len(field):]) from None
        raise


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (for saving next to what it produced)."""
    return dataclasses.asdict(config)
