"""click options generated from a config dataclass, so flags, YAML keys and fields can't drift apart.

Each field ``foo_bar`` becomes ``--foo-bar``; its attribute docstring is the help text; booleans that default to
False are ``--flag``, those that default to True are ``--no-flag``. ``--config FILE`` loads YAML into the same
fields, and flags given on the command line win over it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import click


@lru_cache(maxsize=None)
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


def _base_type(annotation: Any) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def config_options(cls: type, *, exclude: tuple[str, ...] = (), config_flag: bool = True) -> Callable[[Callable],
                                                                                                      Callable]:
    """Decorate a click command with one option per dataclass field (plus ``--config`` unless ``config_flag`` is
    False: a command taking two dataclasses' options has one)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            if f.name in exclude:
                continue
            kind = _base_type(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            help_text = docs.get(f.name, "")
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if kind is bool:
                name = flag if f.default is False else "--no-" + f.name.replace("_", "-")
                fn = click.option(name, f.name, is_flag=True, flag_value=f.default is False, default=None,
                                  help=help_text)(fn)
            else:
                show = "" if required or f.default is None else f" [default: {f.default}]"
                fn = click.option(flag, f.name, type={int: int, float: float, str: str}.get(kind, str), default=None,
                                  help=help_text + (" [required]" if required else show))(fn)
        if not config_flag:
            return fn
        return click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                            help="YAML file with these options as keys; flags given here override it.")(fn)

    return decorate


def build_config(cls: type, values: dict[str, Any], config_file: str | None) -> Any:
    """The dataclass from YAML (if any) overlaid with the flags that were given."""
    import yaml

    from kava.core.errors import ConfigError

    data: dict[str, Any] = {}
    if config_file:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {config_file}: expected a mapping of option names. Got {type(loaded).__name__}.")
        data.update({k.replace("-", "_"): v for k, v in loaded.items()})
    data.update({k: v for k, v in values.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    missing = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data]
    unknown = sorted(set(data) - known)
    problems = [f"Missing option {m}." for m in missing] + [f"Unknown option {u!r} in --config." for u in unknown]
    if problems:
        raise ConfigError(" ".join(problems))
    return cls(**data)
