"""click options generated from a config dataclass, so flags, YAML keys and fields can't drift apart.

Each field ``foo_bar`` becomes ``--foo-bar`` (a group's fields too: ``data: DataSource`` gives ``--dataset``,
``--split``, ...); its attribute docstring is the help text; booleans that default to False are ``--flag``, those
that default to True are ``--no-flag``; list options are typed text (``--kv-layers 0,2,3``) that the config parses,
or a flag given once per item where the field says ``metadata={"repeatable": True}`` (``--tracker a --tracker b``).
A config's ``ALIASES`` keep old spellings working (``kava extract --seed`` is ``--data-seed``). ``--config FILE``
loads YAML into the same fields, and flags given on the command line win over it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import click

from kava.core.config import ConfigField, canonical_names, config_fields, config_from_dict, option_names
from kava.core.errors import ConfigError
from kava.core.safe_yaml import load_yaml

T = TypeVar("T")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right after each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.replace("``", "").split())
    return docs


def _base_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _option_type(annotation: Any) -> type:
    """The click type of a field: int and float as such, everything else (str, and the lists and mappings a
    config parses from text itself) as text."""
    return {int: int, float: float}.get(_base_type(annotation), str)


def _repeatable(c: ConfigField) -> bool:
    """A list option whose field says ``metadata={"repeatable": True}``: its flag may be given several times."""
    return any(f.name == c.name and f.metadata.get("repeatable") for f in dataclasses.fields(c.owner))


def _show_default(default: Any) -> str:
    if isinstance(default, list):
        return ",".join(str(v) for v in default)
    return str(default)


def config_options(cls: type, *, exclude: tuple[str, ...] = (), config_flag: bool = True) -> Callable[[Callable],
                                                                                                      Callable]:
    """Decorate a click command with one option per config option (plus ``--config`` unless ``config_flag`` is
    False: a command taking two dataclasses' options has one). A group's fields (``data: DataSource``) become
    options of their own, flat (``--dataset``); ``cls.ALIASES`` adds each old spelling to its option."""
    aliases: dict[str, list[str]] = {}
    for old, new in getattr(cls, "ALIASES", {}).items():
        aliases.setdefault(new, []).append("--" + old.replace("_", "-"))

    def decorate(fn: Callable) -> Callable:
        for c in reversed(config_fields(cls)):
            if c.name in exclude:
                continue
            help_text = field_docs(c.owner).get(c.name, "")
            if c.help_prefix and not help_text.startswith(c.help_prefix):
                help_text = f"{c.help_prefix}: {help_text[:1].lower()}{help_text[1:]}"
            if _base_type(c.hint) is bool:
                name = c.flag if c.default is False else "--no-" + c.name.replace("_", "-")
                if c.default is not False:  # the docstring says what the option does when on; the flag turns it off
                    help_text = f"Turn off (on by default): {help_text[:1].lower()}{help_text[1:]}"
                fn = click.option(name, c.name, is_flag=True, flag_value=c.default is False, default=None,
                                  help=help_text)(fn)
            elif _repeatable(c):  # --tracker a --tracker b: a list, or None when not given (YAML's value stays)
                fn = click.option(c.flag, *aliases.get(c.name, []), c.name, multiple=True,
                                  callback=lambda _ctx, _param, given: list(given) or None,
                                  help=help_text + " [repeatable]")(fn)
            else:
                show = "" if c.required or c.default is None else f" [default: {_show_default(c.default)}]"
                fn = click.option(c.flag, *aliases.get(c.name, []), c.name, type=_option_type(c.hint), default=None,
                                  help=help_text + (" [required]" if c.required else show))(fn)
        if not config_flag:
            return fn
        return click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                            help="YAML file with these options as keys; flags given here override it.")(fn)

    return decorate


def _read_yaml(config_file: str | None) -> dict[str, Any]:
    if not config_file:
        return {}
    loaded = load_yaml(Path(config_file).read_text(), f"--config {config_file}") or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {config_file}: expected a mapping of option names. Got {type(loaded).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def build_config(cls: type[T], values: dict[str, Any], config_file: str | None) -> T:
    """The dataclass from YAML (if any) overlaid with the flags that were given."""
    return build_configs((cls,), values, config_file)[0]


def build_configs(classes: tuple[type, ...], values: dict[str, Any], config_file: str | None) -> tuple[Any, ...]:
    """One dataclass per class (e.g. `kava extract`'s ExtractConfig and ClusterConfig) from one YAML file overlaid
    with one set of flags: each key goes to the class that knows it (a key none knows is reported by the first).
    Old spellings are resolved first, so a flag overrides YAML under either name."""
    def split(data: dict[str, Any]) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{} for _ in classes]
        for key, value in data.items():
            owner = next((i for i, cls in enumerate(classes) if key in option_names(cls)), 0)
            parts[owner][key] = value
        return parts

    problems: list[str] = []
    from_yaml = split(_read_yaml(config_file))
    from_flags = split({k: v for k, v in values.items() if v is not None})
    merged = [{**canonical_names(cls, y, problems), **canonical_names(cls, f, problems)}
              for cls, y, f in zip(classes, from_yaml, from_flags)]
    if problems:
        raise ConfigError(" ".join(problems))
    return tuple(config_from_dict(cls, data) for cls, data in zip(classes, merged))
