"""The config framework: a command's options as one typed dataclass, spelled flat as flags and YAML keys.

A command's config composes small groups (``data: DataSource``, the rows it reads) instead of repeating their fields;
flags, YAML keys and ``to_dict()`` stay flat (``--dataset``, ``dataset:``), one name per field, with the group
resolved by :func:`config_fields`. List options are typed lists, parsed once in ``__post_init__`` by
:func:`parse_list` from whatever the flag or YAML gave (``'0,5,9'`` or ``[0, 5, 9]``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------------------
# The flat view of a config: one name per field, groups resolved


@dataclass(frozen=True)
class ConfigField:
    """One option of a config: a field of the config itself, or of one of its groups (``group`` names the field
    holding it)."""

    name: str
    """The option's name: the field's, as flags (``--data-files``) and YAML keys (``data_files``) spell it."""
    group: str | None
    hint: Any
    """The field's resolved type annotation."""
    default: Any
    """Its default in this config (a group's default instance decides it), or ``dataclasses.MISSING``."""
    owner: type
    """The dataclass that declares it (its attribute docstring is the help text)."""
    help_prefix: str | None = None
    """Set on a group field with ``metadata={"help_prefix": ...}`` (e.g. "Without --store")."""

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_fields(cls: type) -> list[ConfigField]:
    """Every option of ``cls`` in declaration order, a group's fields where the group sits."""
    hints = typing.get_type_hints(cls)
    out: list[ConfigField] = []
    for f in fields(cls):
        hint = hints[f.name]
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            out.append(ConfigField(f.name, None, hint, _default(f), cls))
            continue
        inner, inner_hints = _default(f), typing.get_type_hints(hint)
        for g in fields(hint):
            default = dataclasses.MISSING if inner is dataclasses.MISSING else getattr(inner, g.name)
            out.append(ConfigField(g.name, f.name, inner_hints[g.name], default, hint, f.metadata.get("help_prefix")))
    names = [c.name for c in out]
    assert len(set(names)) == len(names), f"{cls.__name__}: a group field shadows another option"
    return out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The flat mapping of option names to values (what ``config.yaml`` holds and ``--config`` reads back)."""
    return {c.name: getattr(getattr(cfg, c.group) if c.group else cfg, c.name) for c in config_fields(type(cfg))}


def option_names(cls: type) -> set[str]:
    """Every name ``config_from_dict`` accepts for ``cls``: its options and their old spellings (``ALIASES``)."""
    return {c.name for c in config_fields(cls)} | set(getattr(cls, "ALIASES", {}))


def canonical_names(cls: type, data: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """``data`` with ``_`` for ``-`` and every old spelling (``cls.ALIASES``) under its option's name; both names at
    once is a problem appended to ``problems``."""
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    for old, new in getattr(cls, "ALIASES", {}).items():
        if old in out:
            if new in out:
                problems.append(f"Can't set both --{old.replace('_', '-')} and --{new.replace('_', '-')} (the old "
                                f"and the new name of one option). Keep --{new.replace('_', '-')}.")
            out[new] = out.pop(old)
    return out


def config_from_dict(cls: type, data: Mapping[str, Any], *, source: str = "--config") -> Any:
    """``cls`` from flat option names (``-`` or ``_``), old spellings included; the groups are built from their own
    defaults in ``cls``. Raises one ConfigError naming every missing or unknown option (``source`` says where they
    came from)."""
    problems: list[str] = []
    data = canonical_names(cls, data, problems)
    options = config_fields(cls)
    missing = [c.flag for c in options if c.required and c.name not in data]
    unknown = sorted(set(data) - {c.name for c in options})
    problems += [f"Missing option {m}." for m in missing] + [f"Unknown option {u!r} in {source}." for u in unknown]
    if problems:
        raise ConfigError(" ".join(problems))
    top: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {}
    for c in options:
        if c.name in data:
            (grouped.setdefault(c.group, {}) if c.group else top)[c.name] = data[c.name]
    for f in fields(cls):
        if f.name in grouped:
            base = _default(f)
            top[f.name] = dataclasses.replace(base, **grouped[f.name])
    return cls(**top)


# ---------------------------------------------------------------------------------------------------------------------
# List options: parsed once, from a flag's text or a YAML value


def parse_list(value: Any, item: Callable[[Any], T], flag: str, example: str, problems: list[str]) -> list[T] | None:
    """``value`` as a list: None stays None; ``'0,2,3'`` (a flag), ``[0, 2, 3]`` or ``5`` (YAML) become lists of
    ``item(x)``. On a bad entry it appends "<flag>: expected <example>. Got ... instead." to ``problems`` and
    returns None, so ``validate()`` reports it with everything else."""
    if value is None:
        return None
    if isinstance(value, str):
        parts: list[Any] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        return [item(p) for p in parts]
    except (TypeError, ValueError):
        problems.append(f"{flag}: expected {example}. Got {value!r} instead.")
        return None


def as_int(x: Any) -> int:
    """An integer from a flag's text or a YAML integer (never a bool or a fractional number)."""
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise TypeError(x)
    return int(x)


def as_float(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise TypeError(x)
    return float(x)


def as_name(x: Any) -> str:
    if not isinstance(x, str) or not x.strip():
        raise TypeError(x)
    return x.strip()


def format_list(values: list[Any] | None) -> str:
    """A list option as its flag spells it: ``[0, 2]`` → ``'0,2'``."""
    return ",".join(str(v) for v in values or [])
