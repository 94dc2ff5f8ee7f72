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
import typing
from typing import Any


def attribute_docs(cls: type) -> dict[str, str]:
    """Maps field names to their text in the class docstring's ``Attributes:`` section."""
    doc = inspect.getdoc(cls) or ""
    match = re.search(r"Attributes:\n(.*?)(\n\S|\Z)", doc, re.S)
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
    """A string -> value converter for a field of type ``annotation``."""
    text = str(annotation)
    if isinstance(default, bool) or "bool" in text:
        return _parse_bool
    if "tuple" in text:
        return lambda value: tuple(float(v) for v in value.split(","))
    if isinstance(default, int) or text in ("int", "<class 'int'>"):
        return int
    if isinstance(default, float) or "float" in text:
        return lambda value: None if value.lower() == "none" else float(value)
    return str


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    # argparse's type=bool makes "False" true (the official AWM code's --lr-decay bug); refuse.
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str,
                     skip: tuple[str, ...] = ()) -> None:
    """Adds one optional flag per field of ``cls``; unset flags keep the config's defaults."""
    docs = attribute_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} ({prefix}*)")
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        group.add_argument("--" + f"{prefix}{field.name}".replace("_", "-"),
                           dest=f"{prefix}{field.name}", default=None, metavar="V",
                           type=_parser_for(hints.get(field.name, ""), default),
                           help=f"{docs.get(field.name, '')} [default: {default}]")


def config_from_flags(args: argparse.Namespace, cls: type, prefix: str, base=None):
    """The config ``base`` (or ``cls()``) with every flag the user set replaced."""
    base = base if base is not None else cls()
    changes = {field.name: getattr(args, f"{prefix}{field.name}")
               for field in dataclasses.fields(cls)
               if getattr(args, f"{prefix}{field.name}", None) is not None}
    return dataclasses.replace(base, **changes)
