"""One declaration per setting: :func:`setting` gives a field of a settings dataclass its help text and
command-line flag, :func:`add_flags` makes argparse flags of a dataclass's fields, and :func:`from_args`
builds the dataclass back from the parsed flags - so a setting is typed once, where it is declared, and
every command reads it from there.

    @dataclass(frozen=True)
    class Recipe:
        learning_rate: float = setting(1e-4, help="peak learning rate", flag="--lr")
        optimizer: str = setting("rmsprop", help="the optimizer", choices=("rmsprop", "adam"))
        augment: bool = setting(True, help="train without augmentation")  # --no-augment
        seed: int = 0  # a plain field: no flag, but read back when a namespace has ``seed``

    add_flags(parser, Recipe, defaults={"optimizer": None})  # None: the flag was not given
    recipe = from_args(Recipe, parser.parse_args(argv), seed=7)

How a field becomes a flag (:func:`add_flags`):

- its name, ``learning_rate`` -> ``--learning-rate`` (``flag=`` names it: ``"--lr"``, or several names);
  the parsed value lands under the field's own name (``namespace.learning_rate``);
- ``int``/``float`` values are parsed as such, ``str`` as given, ``X | None`` as ``X``, ``tuple[X, ...]``
  from a comma-separated list (``128,200``; an empty text is "not given");
- a boolean is a switch: ``--name`` when its default is False, ``--no-name`` when it is True, and a
  ``store_const`` (None when absent) when a command sets its default to None; its help text says what
  the switch does;
- ``const=VALUE``: a switch that sets the field to VALUE (``--no-augment`` -> ``AugmentConfig()``);
- a field declared with :func:`setting` whose type is itself a dataclass (and has no ``const``) is
  flattened: its own fields become flags (``TrainConfig.preprocessing`` -> ``--trim-borders``, ...);
- ``flag=False`` (or a plain ``dataclasses.field``/default) makes no flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

_KEY = "lxn_setting"  # the key of a field's metadata that holds its _Spec


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What :func:`setting` records about a field beyond its default."""

    help: str | None
    flag: str | tuple[str, ...] | bool
    choices: Sequence[Any] | None
    parse: Callable[[str], Any] | None
    metavar: str | None
    const: Any


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    help: str | None = None,
    flag: str | Sequence[str] | bool = True,
    choices: Sequence[Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    const: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field (``dataclasses.field``) that carries its help text and flag.

    ``default``/``default_factory``: as for ``dataclasses.field``. ``help``: one line for ``--help`` and the
    docs. ``flag``: True (derived from the field's name), a flag name or a sequence of names (aliases), or
    False (no flag). ``choices``: the values allowed. ``parse``: turns the flag's text into the value
    (its ``ValueError`` becomes argparse's error message). ``metavar``: the value's name in ``--help``.
    ``const``: make the flag a switch that sets the field to this value.
    """
    names = flag if isinstance(flag, (bool, str)) else tuple(flag)
    spec = _Spec(help=help, flag=names, choices=choices, parse=parse, metavar=metavar, const=const)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: spec})


def help_of(cls: type, name: str) -> str | None:
    """The help text declared for field ``name`` of dataclass ``cls`` (to share one text between classes).

    Raises ``KeyError`` when ``cls`` has no such field."""
    spec = _spec({f.name: f for f in dataclasses.fields(cls)}[name])
    return spec.help if spec else None


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    help: Mapping[str, str] | None = None,
) -> None:
    """Add a flag to ``parser`` (a parser or an argument group) for each flagged field of dataclass ``cls``,
    nested dataclasses flattened (see the module docstring), in declaration order or that of ``only``.

    ``only``/``skip``: names of (flattened) fields to add, in this order, or to leave out. ``defaults``:
    this command's defaults instead of the declared ones (None: "not given", which :func:`from_args` reads as
    the declared default). ``help``: this command's help text instead of the declared one.
    Raises ``KeyError`` when ``only`` names no flagged field, ``argparse.ArgumentError`` when a flag is
    already taken.
    """
    rows = {field.name: (field, kind, spec) for field, kind, spec in _flagged(cls)}
    if only is not None:
        rows = {name: rows[name] for name in only}  # KeyError: no such flagged field
    defaults, help = defaults or {}, help or {}
    for field, kind, spec in rows.values():
        if field.name in skip:
            continue
        default = defaults.get(field.name, _default(field))
        options: dict[str, Any] = {"dest": field.name, "default": default}
        options["help"] = help.get(field.name, spec.help)
        names = _flag_names(field, spec, negated=False)
        if spec.const is not dataclasses.MISSING:
            options.update(action="store_const", const=spec.const, default=None)
        elif kind is bool:
            sets = not _default(field)  # what the switch sets: the opposite of the declared default
            action = "store_const" if default is None else "store_true" if sets else "store_false"
            options.update(action=action, const=sets if default is None else None)
            names = _flag_names(field, spec, negated=not sets)
        else:
            options["type"] = _argument_type(spec.parse) if spec.parse else _parser_of(kind)
            options["choices"] = spec.choices
            # argparse's own metavar would be the field's name; the flag's reads better (--lr LR)
            default_metavar = None if spec.choices else names[0].removeprefix("--").replace("-", "_").upper()
            options["metavar"] = spec.metavar or default_metavar
        parser.add_argument(*names, **{key: value for key, value in options.items() if value is not None})


def from_args(cls: type, namespace: argparse.Namespace, **values: Any) -> Any:
    """An instance of dataclass ``cls`` from parsed flags: each field whose name ``namespace`` holds, with
    a value that is not None (None keeps the declared default), and flattened nested dataclasses rebuilt
    from theirs; fields declared ``flag=False`` are not read. ``values`` are given directly and win.

    Raises whatever ``cls`` raises for invalid values (its ``__post_init__``), typically ``ValueError``.
    """
    return cls(**{**_given(cls, vars(namespace)), **values})


# -- the parts ----------------------------------------------------------------------------------------
def _spec(field: dataclasses.Field) -> _Spec | None:
    return field.metadata.get(_KEY)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _flattened(spec: _Spec | None, kind: Any) -> bool:
    """Whether a field's own fields become flags (a declared, flagged dataclass without ``const``)."""
    return (
        spec is not None
        and spec.flag is not False
        and spec.const is dataclasses.MISSING
        and dataclasses.is_dataclass(kind)
    )


def _flagged(cls: type) -> list[tuple[dataclasses.Field, Any, _Spec]]:
    """(field, its type without ``| None``, its spec) of each field that makes a flag, flattened."""
    hints = typing.get_type_hints(cls)
    rows = []
    for field in dataclasses.fields(cls):
        spec, kind = _spec(field), _unoptional(hints[field.name])
        if _flattened(spec, kind):
            rows += _flagged(kind)
        elif spec is not None and spec.flag is not False:
            rows.append((field, kind, spec))
    return rows


def _given(cls: type, args: Mapping[str, Any]) -> dict[str, Any]:
    """The field values of ``cls`` that ``args`` gives (see :func:`from_args`)."""
    hints = typing.get_type_hints(cls)
    given: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        spec, kind = _spec(field), _unoptional(hints[field.name])
        if spec is not None and spec.flag is False:
            continue
        if _flattened(spec, kind):
            if nested := _given(kind, args):
                given[field.name] = dataclasses.replace(_default(field), **nested)
        elif args.get(field.name) is not None:
            given[field.name] = args[field.name]
    return given


def _flag_names(field: dataclasses.Field, spec: _Spec, negated: bool) -> tuple[str, ...]:
    """The flag's names: as declared, else ``--name`` (``--no-name`` for a switch that turns it off)."""
    if isinstance(spec.flag, str):
        return (spec.flag,)
    if isinstance(spec.flag, tuple):
        return spec.flag
    return (f"--{'no-' if negated else ''}{field.name.replace('_', '-')}",)


def _unoptional(kind: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else kind
    return kind


def _parser_of(kind: Any) -> Callable[[str], Any] | None:
    """How a flag's text becomes a value of type ``kind``: int, float, a comma-separated tuple, or the
    text itself (None)."""
    if kind in (int, float):
        return kind
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        convert = item if item in (int, float) else str

        def comma_list(text: str) -> tuple[Any, ...] | None:
            parts = [part.strip() for part in text.split(",")]
            try:
                return tuple(convert(part) for part in parts if part) if text else None
            except ValueError:
                raise ValueError(f"{text!r} is not a comma-separated list of {convert.__name__}") from None

        comma_list.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}"
        return _argument_type(comma_list)
    return None


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ``ValueError`` message shown by argparse (it hides the text of a plain one)."""

    def argument(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    argument.__name__ = getattr(parse, "__name__", "value")
    return argument
