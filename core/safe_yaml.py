"""YAML for configs, read with limits: what a config can hold is a page of plain values.

YAML's safe loader, refusing what no config needs and what would make a huge or ambiguous value: aliases (a
kilobyte of nested aliases expands to gigabytes), a key given twice (YAML keeps the last one silently), nesting
deeper than :data:`MAX_DEPTH` and integers longer than :data:`MAX_INT_DIGITS` digits. Every refusal is one
ConfigError naming the file, the line and the column.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from .errors import ConfigError

MAX_DEPTH = 32
"""Mappings and lists inside one another; the deepest shipped config has 4."""
MAX_INT_DIGITS = 30
"""Digits of an integer; no option takes a larger number (a seed is below 2**32, steps fit in 20 digits)."""


class _LimitedLoader(yaml.SafeLoader):
    """The safe loader with the limits above."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"found the alias *{event.anchor}; configs may not use YAML aliases: write the value out",
                event.start_mark)
        if self.check_event(yaml.MappingStartEvent, yaml.SequenceStartEvent):
            if self.depth >= MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"found lists or mappings nested more than {MAX_DEPTH} "
                                                  "deep", self.peek_event().start_mark)
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConstructorError(None, None, f"found the key {str(key)[:100]!r} twice in one mapping; give "
                                       "each key once", key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> int:
        digits = len(re.sub(r"[^0-9a-fA-F]", "", str(node.value)))
        if digits > MAX_INT_DIGITS:
            raise ConstructorError(None, None, f"found an integer of {digits:,} digits; configs take integers of at "
                                   f"most {MAX_INT_DIGITS}", node.start_mark)
        return super().construct_yaml_int(node)


_LimitedLoader.add_constructor("tag:yaml.org,2002:int", _LimitedLoader.construct_yaml_int)


def load_yaml(text: str, where: str | Path) -> Any:
    """The YAML document in ``text`` (read from ``where``, named in errors), within the limits above."""
    try:
        return yaml.load(text, Loader=_LimitedLoader)  # noqa: S506 - a SafeLoader with limits
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: not valid YAML{at}: {problem[:300]}.") from None
