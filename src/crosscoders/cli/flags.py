"""Command-line flags generated from config dataclass fields, and the overrides they collect.

A command lists the fields it exposes, ``Field(TrainConfig, "steps")``: the flag's name
(``--steps``), type, choices and nargs come from the field's annotation, its help from
:data:`crosscoders.cli.help.FIELD_HELP` and its default from the dataclass. Every such
flag defaults to ``None`` ("not given"), so a config file and the dataclass's own default
keep precedence; :func:`overrides` gathers the values that were given, for
``Config.from_dict`` (or :func:`apply`) to validate and coerce. Flags that are no config
field (paths, switches of the command itself) are :class:`Option` s. Declaring flags as
values lets a flag that several commands share be declared once and imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from crosscoders.cli.help import FIELD_HELP
from crosscoders.configs import Config

C = typing.TypeVar("C", bound=Config)


@dataclass(frozen=True, init=False)
class Option:
    """A flag or positional that is no config field: the names and keywords of
    ``ArgumentParser.add_argument``."""

    names: tuple[str, ...]
    kwargs: Mapping[str, Any]

    def __init__(self, *names: str, **kwargs: Any) -> None:
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "kwargs", kwargs)

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.names[0].lstrip("-").replace("-", "_")

    def add_to(self, parser: Any) -> None:
        parser.add_argument(*self.names, **self.kwargs)


@dataclass(frozen=True)
class Field:
    """A flag for one field of ``config``; ``path`` is the field name, dotted into nested
    configs (``"rule.nu_r_max"``). ``flag`` and ``aliases`` rename it (default: the last
    name in kebab case), ``invert`` makes a bool flag that sets the field to False
    (``--keep-special`` for ``exclude_special``), and ``options`` holds argparse keywords
    that differ from the derived ones (choices of a ``str`` field, a custom type)."""

    config: type[Config]
    path: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    invert: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.flag or "--" + self.path.split(".")[-1].replace("_", "-"), *self.aliases)

    @property
    def dest(self) -> str:
        return self.options.get("dest") or self.names[0].lstrip("-").replace("-", "_")

    def add_to(self, parser: Any) -> None:
        owner, name = _owner(self.config, self.path)
        derived = {} if "type" in self.options else _derived(
            typing.get_type_hints(owner)[name], self.invert)
        if self.options.get("action") == "append":  # one value per use of the flag
            derived.pop("nargs", None)
        kwargs = {**derived, "dest": self.dest, "default": None,
                  "help": _help(owner, name, self.config, self.path), **self.options}
        parser.add_argument(*self.names, **kwargs)


Flag = Option | Field


def add_flags(parser: Any, *flags: Flag) -> None:
    """Add ``flags`` to ``parser`` (or an argument group of it), in order."""
    for flag in flags:
        flag.add_to(parser)


def overrides(args: argparse.Namespace, config: type[Config], flags: Iterable[Flag]
              ) -> dict[str, Any]:
    """The values given on the command line for fields of ``config``, as a nested mapping
    (``{"rule": {"nu_r_max": 0.4}}``); flags left out are absent."""
    out: dict[str, Any] = {}
    for flag in flags:
        if not isinstance(flag, Field) or flag.config is not config:
            continue
        value = getattr(args, flag.dest)
        if value is None:
            continue
        *parents, leaf = flag.path.split(".")
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return out


def merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (a config's mapping, e.g. read from a file) with ``changes`` laid over it,
    nested mappings merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply(config: C, changes: Mapping[str, Any]) -> C:
    """A validated copy of ``config`` with nested ``changes`` (see :func:`overrides`)."""
    fields = {}
    for key, value in changes.items():
        current = getattr(config, key)
        fields[key] = apply(current, value) if isinstance(current, Config) else value
    return config.replace(**fields) if fields else config


# ------------------------------------------------------------------ from annotations


def _owner(config: type[Config], path: str) -> tuple[type[Config], str]:
    """The config class that declares the last field of ``path``, and that field."""
    *parents, leaf = path.split(".")
    owner = config
    for part in parents:
        owner = _plain_type(typing.get_type_hints(owner)[part])
        if not (isinstance(owner, type) and issubclass(owner, Config)):
            raise TypeError(f"{config.__name__}.{path}: {part} is not a nested config")
    if leaf not in {f.name for f in dataclasses.fields(owner)}:
        raise TypeError(f"{config.__name__} has no field {path}")
    return owner, leaf


def _plain_type(tp: Any) -> Any:
    """``X`` for ``X | None``; unions of several types stay as they are."""
    if get_origin(tp) in (Union, types.UnionType):
        options = [o for o in get_args(tp) if o is not type(None)]
        if len(options) == 1:
            return options[0]
        if str in options:  # e.g. int | str (a source index or name): taken as text
            return str
    return tp


def _derived(tp: Any, invert: bool) -> dict[str, Any]:
    """argparse keywords for a field annotated ``tp``."""
    tp = _plain_type(tp)
    origin = get_origin(tp)
    if tp is bool:
        return {"action": "store_false" if invert else "store_true"}
    if origin is Literal:
        return {"choices": list(get_args(tp))}
    if origin in (list, tuple):
        item_types = get_args(tp)
        fixed = origin is tuple and item_types and item_types[-1] is not Ellipsis
        kwargs = _derived(item_types[0], False) if item_types else {}
        return {**kwargs, "nargs": len(item_types) if fixed else "+"}
    if tp in (int, float):
        return {"type": tp}
    if tp is str:
        return {}
    raise TypeError(f"no flag for a field of type {tp}; give its type in options")


def _help(owner: type[Config], name: str, config: type[Config], path: str) -> str | None:
    """The field's help text and, from the dataclass, its default."""
    text = FIELD_HELP.get(owner.__name__, {}).get(name)
    default = _default(config, path)
    if default is None or isinstance(default, bool) or default == []:
        return text
    if isinstance(default, (list, tuple)):
        shown = " ".join(map(str, default))
    elif isinstance(default, int):
        shown = f"{default:,}"
    elif isinstance(default, float):
        shown = f"{default:g}"
    else:
        shown = str(default)
    return f"{text} (default: {shown})" if text else f"default: {shown}"


def _default(config: type[Config], path: str) -> Any:
    """The default of ``path`` in ``config`` (into the default of a nested config), or
    None for a required field."""
    first, *rest = path.split(".")
    spec = {f.name: f for f in dataclasses.fields(config)}[first]
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
    else:
        return None
    for part in rest:
        value = getattr(value, part)
    return value
