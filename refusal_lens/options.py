"""Command-line options generated from configuration dataclasses, so a flag and its field cannot drift apart.

A field declared with :func:`option` carries its help text (and, where the type needs it, a parser); the
flag is ``--`` plus the field name with ``-`` for ``_``, its default the field's. Booleans get
``--name/--no-name``. :func:`add_options` adds one dataclass's fields to a parser; :func:`from_args`
builds the dataclass back from the parsed namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any


def option(default: Any, help: str, *, parse: Callable[[str], Any] | None = None, metavar: str | None = None,
           aliases: tuple[str, ...] = (), off_alias: str | None = None) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the field's default (immutable: tuples, not lists).
        help: the option's help text; ``--help`` appends the default.
        parse: text -> value, for types argparse cannot convert by itself (tuples, unions of types).
        metavar: the value's name in ``--help``.
        aliases: further option strings for the same field (e.g. a short historical name).
        off_alias: for a boolean, a further flag that sets it to False (e.g. ``--html-only`` for
            ``static_figures``); hidden from ``--help``.
    """
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar,
                                                        "aliases": aliases, "off_alias": off_alias})


def comma_separated(parse: Callable[[str], Any]) -> Callable[[str], tuple]:
    """A parser for ``a,b,c`` into a tuple of ``parse``-d items (an empty text gives ``()``)."""
    def parser(text: str) -> tuple:
        return tuple(parse(item) for item in text.split(",") if item.strip())
    return parser


def _scalar(annotation: Any) -> Any:
    """``int`` for ``int | None``; the annotation itself otherwise."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        return kinds[0] if len(kinds) == 1 else annotation
    return annotation


def _shown(default: Any) -> str:
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return "none" if default is None else str(default)


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config: type) -> None:
    """Add one option per field of the dataclass ``config`` declared with :func:`option`."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        meta = field.metadata
        if "help" not in meta:
            raise TypeError(f"{config.__name__}.{field.name} is not declared with option(): give it a help text")
        flags = (f"--{field.name.replace('_', '-')}", *meta["aliases"])
        kind = _scalar(hints[field.name])
        text = f"{meta['help']} (default: {_shown(field.default)})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default,
                                help=text)
            if meta["off_alias"]:
                parser.add_argument(meta["off_alias"], dest=field.name, action="store_false", help=argparse.SUPPRESS)
            continue
        convert = meta["parse"] or kind
        if convert not in (int, float, str) and meta["parse"] is None:
            raise TypeError(f"{config.__name__}.{field.name}: type {hints[field.name]} needs option(parse=...)")
        parser.add_argument(*flags, dest=field.name, type=convert, default=field.default, metavar=meta["metavar"],
                            help=text)


def from_args(config: type, args: argparse.Namespace) -> Any:
    """The dataclass ``config`` with every field taken from ``args`` (as :func:`add_options` named them)."""
    return config(**{field.name: getattr(args, field.name) for field in dataclasses.fields(config)})

