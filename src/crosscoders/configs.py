"""Dataclass configs that validate on construction and round-trip to JSON and YAML.

Every config in the project subclasses :class:`Config`. ``from_dict`` rejects unknown keys
and wrong types with the key's path and the expected type, so a typo in a YAML file fails
before any work is done.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml

from crosscoders.errors import ConfigError

C = TypeVar("C", bound="Config")


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          type(None): "null", list: "a list", dict: "a mapping"}


def _type_name(tp: Any) -> str:
    if tp in _NAMES:
        return _NAMES[tp]
    if get_origin(tp) in _NAMES:
        return _NAMES[get_origin(tp)]
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lists/tuples and nested configs."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        real = [o for o in options if o is not type(None)]
        if len(real) == 1 and isinstance(value, dict):
            raise ConfigError(errors[0])  # a nested config's own error says more
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{path}: expected {names}, got {value!r}")
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_type = args[0] if args else Any
            items = [_coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return tp.from_dict(value, _path=path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _plain(value: Any) -> Any:
    """Nested configs, lists and tuples as plain JSON-able values."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def prefix_key_path(path: str, message: str, names: Any = ()) -> str:
    """``message`` from inside the config at ``path``, with that path put in front.

    A message that starts with one of the config's keys (``k must be ...``,
    ``steps: expected ...``) becomes ``path.k must be ...``; ``unknown key x`` becomes
    ``unknown key path.x``; anything else becomes ``path: message``.
    """
    if not path:
        return message
    for lead in ("unknown key ", "missing key "):
        if message.startswith(lead):
            return f"{lead}{path}.{message[len(lead):]}"
    match = re.match(r"[A-Za-z_]\w*", message)
    if match and match.group() in names:
        return f"{path}.{message}"
    return f"{path}: {message}"


@dataclasses.dataclass
class Config:
    """Base class: validation hook, dict/JSON/YAML round trip, strict loading."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            setattr(self, field.name, _coerce(value, hints[field.name], field.name))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field and the fix; subclasses override."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], _path: str = "") -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{_path or cls.__name__}: expected a mapping, got {data!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            where = f"{_path}." if _path else ""
            raise ConfigError(
                f"unknown key {where}{unknown[0]} in {cls.__name__}; "
                f"valid keys: {', '.join(sorted(names))}"
            )
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            where = f"{_path}." if _path else ""
            raise ConfigError(
                f"missing key {where}{missing[0]} in {cls.__name__}; add it"
                + (f" (required: {', '.join(missing)})" if len(missing) > 1 else "")
            )
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(prefix_key_path(_path, str(err), names)) from None
        except TypeError as err:  # a field the checks above do not cover
            raise ConfigError(f"{_path or cls.__name__}: {err}") from None

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with some fields changed (configs are never mutated in place)."""
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        from crosscoders.io import atomic_write_text, write_json

        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        """Read and validate a YAML/JSON file; errors name the file and the key."""
        data = read_config_file(path)
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON file; every way it can be wrong
    (missing, unreadable, bad syntax, not a mapping) raises ConfigError saying so."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"config file {path} does not exist; check the path (`crosscoders init` writes a "
            "commented example)"
        )
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the YAML/JSON file itself")
    is_yaml = path.suffix in (".yaml", ".yml")
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if is_yaml else json.loads(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"config file {path} is not valid YAML ({err.problem or err.context}{where}); "
            "fix the syntax there"
        ) from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"config file {path} is not valid JSON ({err.msg} at line {err.lineno}, column "
            f"{err.colno}); fix the syntax there, or use a .yaml file"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} could not be parsed ({err}); fix the file") \
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} holds a {type(data).__name__}, not a mapping of keys to "
            "values; write it as `key: value` lines"
        )
    return data
