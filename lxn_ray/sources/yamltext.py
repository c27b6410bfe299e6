"""YAML files read as written: the sources file (``--sources``) and task files (``--task``).

YAML 1.1, which PyYAML implements, types unquoted scalars by their look: ``1.10`` is the float 1.1,
``0123`` the octal 83, ``1:30`` the sexagesimal 90, ``2020-03-15`` a date, and ``Yes``/``No``/``on``/``off``
booleans. In these files such values are names - a git ref, a class folder, a finding, a pattern - so a
typed reading silently changes them (``ref: 1.10`` ingests tag ``1.1``; ``classes: {Yes: COVID-19}`` maps a
folder called ``True``). :func:`load_text_yaml` reads them as written instead.

The rule: every unquoted scalar that YAML would type (bool, int, float, null, timestamp) is loaded as a
:class:`WrittenScalar` - a ``str`` holding the text exactly as written, with the typed value YAML 1.1
would have made kept beside it in ``typed``. String positions therefore get the text; a position that
means a boolean or may be left empty asks :func:`typed_value`. Quoted scalars, and unquoted ones YAML
reads as strings anyway, are plain ``str``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import Node

TYPED_TAGS = ("bool", "int", "float", "null", "timestamp")


class WrittenScalar(str):
    """An unquoted scalar's text as written; ``typed`` is what YAML 1.1 would have loaded (True, 83, None,
    a date, ...)."""

    typed: Any

    def __new__(cls, text: str, typed: Any) -> WrittenScalar:
        scalar = super().__new__(cls, text)
        scalar.typed = typed
        return scalar


class _TextLoader(yaml.SafeLoader):
    """SafeLoader that keeps the text of every scalar YAML 1.1 would type (see the module docstring)."""


def _as_written(construct: Callable[[SafeConstructor, Node], Any]) -> Callable[[SafeConstructor, Node], Any]:
    def construct_as_written(loader: SafeConstructor, node: Node) -> WrittenScalar:
        return WrittenScalar(node.value, construct(loader, node))

    return construct_as_written


for _tag in TYPED_TAGS:
    _TextLoader.add_constructor(
        f"tag:yaml.org,2002:{_tag}",
        _as_written(SafeConstructor.yaml_constructors[f"tag:yaml.org,2002:{_tag}"]),
    )


def load_text_yaml(text: str) -> Any:
    """The document in ``text``, with scalars as written (:class:`WrittenScalar`). Only YAML's safe tags
    are constructed. Raises :class:`yaml.YAMLError` for a document that is not YAML."""
    return yaml.load(text, Loader=_TextLoader)  # a SafeLoader subclass: safe tags only


def typed_value(value: Any) -> Any:
    """What YAML 1.1 makes of ``value``: the typed value of a :class:`WrittenScalar` (``true`` -> True,
    an empty value or ``~`` -> None), else ``value`` itself."""
    return value.typed if isinstance(value, WrittenScalar) else value
