"""Command-line flags generated from frozen config dataclasses, documented by their docstrings.

Each field of a config dataclass becomes ``--<prefix><field>`` with the field's default and the
text of its ``Attributes:`` entry as help, so ``awm-jax --help`` documents every knob without a
second copy of the documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any


def attribute_docs(cls: type) -> dict[str, str]:
    """Maps field names to their text in the class docstring's ``Attributes:`` section."""
    doc = inspect.getdoc(cls) or ""
    match = re.search(r"Attributes:\n(.*?)(\n\S|\Z)", doc, re.DOTALL)
    if not match:
        return {}
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in match.group(1).splitlines():
        entry = re.match(r"  (\w[\w, ]*):\s*(.*)", line)
        if entry:
            names = [n.strip() for n in entry.group(1).split(",")]
            for name in names:
                docs[name] = entry.group(2)
        elif names and line.strip():
            for name in names:
                docs[name] += " " + line.strip()
    return docs


def _parser_for(annotation: Any, default: Any):
    """A string -> value converter for a field of type ``annotation``.

    ``X | None`` fields also accept ``none``; ``tuple[T, ...]`` fields take comma-separated
    values of type ``T``.
    """
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(inner) < len(typing.get_args(annotation))
        annotation = inner[0] if len(inner) == 1 else str
    if annotation is bool or isinstance(default, bool):
        convert = _parse_bool
    elif typing.get_origin(annotation) is tuple or isinstance(default, tuple):
        element = next((a for a in typing.get_args(annotation) if a is not Ellipsis), float)
        element = _parse_bool if element is bool else element
        convert = lambda value: tuple(element(v.strip()) for v in value.split(",") if v.strip())
    elif annotation in (int, float, str):
        convert = annotation
    elif isinstance(default, (int, float)):
        convert = type(default)
    else:
        convert = str
    if not optional:
        return convert
    return lambda value: None if value.lower() == "none" else convert(value)


def field_parser(cls: type, name: str):
    """The string -> value converter of field ``name`` of config class ``cls``: what its
    ``--flag`` uses (raises ``ValueError`` or ``argparse.ArgumentTypeError`` on bad text)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = field.default if field.default is not dataclasses.MISSING else None
    return _parser_for(typing.get_type_hints(cls).get(name, ""), default)


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    # argparse's type=bool makes "False" true (the official AWM code's --lr-decay bug); refuse.
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str,
                     skip: tuple[str, ...] = (), title: str | None = None) -> None:
    """Adds one optional flag per field of ``cls``; unset flags keep the config's defaults.

    A config class with named presets (a ``PRESETS`` tuple and a ``preset(name)``
    classmethod) also gets ``--<prefix>preset NAME``, the base that the other flags change.
    """
    docs = attribute_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title or f"{cls.__name__} ({prefix}*)")
    if _presets(cls):
        group.add_argument("--" + f"{prefix}preset".replace("_", "-"), dest=f"{prefix}preset",
                           default=None, choices=_presets(cls),
                           help="start from this named preset [default: the class defaults]")
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        # SUPPRESS: an unset flag leaves no attribute, so "none" can set an optional field.
        group.add_argument("--" + f"{prefix}{field.name}".replace("_", "-"),
                           dest=f"{prefix}{field.name}", default=argparse.SUPPRESS, metavar="V",
                           type=_parser_for(hints.get(field.name, ""), default),
                           help=f"{docs.get(field.name, '')} [default: {default}]")


def _presets(cls: type) -> tuple[str, ...]:
    return tuple(getattr(cls, "PRESETS", ())) if hasattr(cls, "preset") else ()


def flag_changes(args: argparse.Namespace, cls: type, prefix: str) -> dict[str, Any]:
    """The fields of ``cls`` whose ``--<prefix>*`` flag the user set, with their values."""
    given = vars(args)
    return {field.name: given[f"{prefix}{field.name}"] for field in dataclasses.fields(cls)
            if f"{prefix}{field.name}" in given}


def config_from_flags(args: argparse.Namespace, cls: type, prefix: str, base=None):
    """The config ``base`` (or the chosen preset, or ``cls()``) with every flag the user set
    replaced."""
    preset = getattr(args, f"{prefix}preset", None) if _presets(cls) else None
    if base is None:
        base = cls.preset(preset) if preset else cls()
    return dataclasses.replace(base, **flag_changes(args, cls, prefix))


def defense_prefix(name: str) -> str:
    """The flag prefix of defense ``name``: ``--ft-epochs`` sets ``FTConfig.epochs``."""
    return f"{name.replace('-', '_')}_"


def add_defense_flags(parser: argparse.ArgumentParser, names=None) -> None:
    """``--<defense>-<field>`` flags for every field of the configs of the defenses ``names``
    (default: every registered defense)."""
    from awm_jax.defenses import DEFENSES, get_defense

    for name in DEFENSES.names() if names is None else names:
        cls = get_defense(name).config_class
        add_config_flags(parser, cls, defense_prefix(name),
                         title=f"{name} settings ({cls.__name__}: --{name}-*)")


def defense_flags_set(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{defense: {field: value}}`` for the defenses whose flags (or preset) the user set."""
    from awm_jax.defenses import DEFENSES, get_defense

    changes = {}
    for name in DEFENSES.names():
        prefix = defense_prefix(name)
        cls = get_defense(name).config_class
        found = flag_changes(args, cls, prefix)
        if getattr(args, f"{prefix}preset", None):
            found = {"preset": getattr(args, f"{prefix}preset"), **found}
        if found:
            changes[name] = found
    return changes
