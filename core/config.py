"""The config framework: a command's options as one typed dataclass made of small groups, spelled flat outside.

A command's config is a dataclass whose fields are options or groups. A field typed as a dataclass is a group
(``data: DataSource``, ``trainer: TrainerOptions``); a group may hold groups of its own (``objective.logits``).
Flags, YAML keys, ``to_dict()`` and a run's ``config.yaml`` stay flat: one name per option (``--lr``, ``lr:``),
resolved to its group by :func:`config_fields`. The flat order is the declaration order with each group's options
where the group sits, so moving options into a group that sits where they were changes no flag and no file.

Inside, components take their group whole (the K/V objective takes ``cfg.objective``); code that speaks in
options (validation messages, the runner, job scripts) may use the flat names, which a config decorated with
:func:`flat_options` also reads, writes and is built from (``DistillConfig(student=..., out=..., lr=1e-3)``).

List options are typed lists, parsed once in ``__post_init__`` by :func:`parse_list` from whatever the flag or
YAML gave (``'0,5,9'`` or ``[0, 5, 9]``); a bad entry becomes a problem that ``validate()`` reports with the rest.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import operator
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")
C = TypeVar("C", bound=type)


# ---------------------------------------------------------------------------------------------------------------------
# The flat view of a config: one name per option, groups resolved


@dataclass(frozen=True)
class ConfigField:
    """One option of a config: a field of the config itself, or of one of its groups (``group`` names the field
    holding it, dotted for a group inside a group: ``objective.logits``)."""

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
    """Set on a group field with ``metadata={"help_prefix": ...}`` (e.g. "Without --store"); a group inside it
    inherits it."""

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


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _group_type(hint: Any) -> type | None:
    """The group class of a field annotated ``hint``, or None for an option."""
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def config_fields(cls: type) -> list[ConfigField]:
    """Every option of ``cls`` in declaration order, a group's options (and its groups') where the group sits."""
    out = list(_options(cls, None, None, None))
    names = [c.name for c in out]
    assert len(set(names)) == len(names), f"{cls.__name__}: a group field shadows another option"
    groups = {part for c in out if c.group for part in c.group.split(".")}
    assert not groups & set(names), f"{cls.__name__}: a group is named like an option ({groups & set(names)})"
    return out


def _options(cls: type, instance: Any, group: str | None, prefix: str | None) -> Iterator[ConfigField]:
    """The options of ``cls``; defaults from ``instance`` (a group's default instance) or, for the config itself
    (None), from the fields."""
    for f in fields(cls):
        hint = _hints(cls)[f.name]
        if instance is None:
            default = _default(f)
        else:
            default = dataclasses.MISSING if instance is dataclasses.MISSING else getattr(instance, f.name)
        inner = _group_type(hint)
        if inner is None:
            yield ConfigField(f.name, group, hint, default, cls, prefix)
        else:
            path = f.name if group is None else f"{group}.{f.name}"
            yield from _options(inner, default, path, f.metadata.get("help_prefix", prefix))


@functools.cache
def _names(cls: type) -> frozenset[str]:
    return frozenset(c.name for c in config_fields(cls))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The flat mapping of option names to values (what ``config.yaml`` holds and ``--config`` reads back)."""
    return {c.name: operator.attrgetter(f"{c.group}.{c.name}" if c.group else c.name)(cfg)
            for c in config_fields(type(cfg))}


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


def _with_options(cls: type, given: dict[str, Any], flat: Mapping[str, Any], base: Any = None) -> dict[str, Any]:
    """The keyword arguments that build ``cls``: ``given`` (its own fields, groups as instances) plus, from
    ``flat``, its own options by name and every group that holds one of them, rebuilt around them. A group comes
    from ``given``, else from ``base`` (the instance being replaced), else from its field's default."""
    out = dict(given)
    for f in fields(cls):
        inner = _group_type(_hints(cls)[f.name])
        if inner is None:
            if f.name in flat:
                out[f.name] = flat[f.name]
        elif _names(inner) & flat.keys():
            group = out[f.name] if f.name in out else getattr(base, f.name) if base is not None else _default(f)
            out[f.name] = dataclasses.replace(group, **_with_options(inner, {}, flat, group))
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
    own = {f.name for f in fields(cls)}
    given = {k: v for k, v in data.items() if k in own}
    return cls(**_with_options(cls, given, {k: v for k, v in data.items() if k not in own}))


def flat_options(cls: C) -> C:
    """Class decorator, above ``@dataclass``: every option of ``cls``'s groups is also an attribute of ``cls``
    (``cfg.lr`` reads and writes ``cfg.trainer.lr``) and a keyword of its constructor, which applies it to its
    group (``DistillConfig(student="s", out="o", lr=1e-3)``; ``dataclasses.replace(cfg, lr=1e-3)`` too)."""
    own = {f.name for f in fields(cls)}
    groups = {f.name for f in fields(cls) if _group_type(_hints(cls)[f.name])}
    grouped = [(c, c.group) for c in config_fields(cls) if c.group]
    for c, group in grouped:
        assert c.name not in vars(cls), f"{cls.__name__}.{c.name} hides the option of its {group} group"
        group_of = operator.attrgetter(group)  # the config → the group holding the option (dotted: a.b)

        def get(cfg: Any, name: str = c.name, group_of: Callable[[Any], Any] = group_of) -> Any:
            return getattr(group_of(cfg), name)

        def put(cfg: Any, value: Any, name: str = c.name, group_of: Callable[[Any], Any] = group_of) -> None:
            setattr(group_of(cfg), name, value)

        setattr(cls, c.name, property(get, put, doc=f"``{group}.{c.name}``"))

    dataclass_init = cls.__init__  # type: ignore[misc]

    @functools.wraps(dataclass_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        # A group passed in is copied: the flat setters write into groups, and a replace() that leaves a group
        # alone must not leave it shared between the two configs.
        given = {k: copy.copy(v) if k in groups else v for k, v in kwargs.items() if k in own or k not in _names(cls)}
        dataclass_init(self, *args, **_with_options(cls, given, {k: v for k, v in kwargs.items() if k not in given}))

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


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
