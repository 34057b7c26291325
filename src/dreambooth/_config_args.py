"""Command-line flags generated from the config tree, grouped by section.

Every field `section.name` gets the flag `--section.name` and a short form: `--name` with
hyphens, or the field's `metadata["flag"]` where the bare name would be ambiguous
(`prior.loss_weight` -> `--prior-loss-weight`). Booleans get `--x/--no-x`. Help comes from the
field docstrings. Only flags given on the command line override the file and the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from dreambooth._config_io import field_docs


def flag_name(field: dataclasses.Field) -> str:
    """The short flag of a config field, without the leading dashes."""
    return field.metadata.get("flag", field.name.replace("_", "-"))


def sections(root: type) -> list[tuple[str, type]]:
    """(name, dataclass) of each section of the config tree, in declaration order."""
    hints = get_type_hints(root)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(root) if dataclasses.is_dataclass(hints[f.name])]


def add_config_arguments(parser: argparse.ArgumentParser, root: type) -> None:
    """Add one argument group per config section, one flag per field."""
    for section, cls in sections(root):
        group = parser.add_argument_group(f"{section} options")
        docs = field_docs(cls)
        hints = get_type_hints(cls)
        for field in dataclasses.fields(cls):
            hint = hints[field.name]
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            help_text = f"{docs.get(field.name, '')} (default: {_show(default)})".replace("%", "%%")
            dest, options = f"{section}.{field.name}", _parse_options(hint)
            group.add_argument(f"--{flag_name(field)}", dest=dest, help=help_text, default=argparse.SUPPRESS, **options)
            group.add_argument(f"--{dest}", dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **options)


def overrides_from_args(namespace: argparse.Namespace) -> dict[str, Any]:
    """Nested {section: {field: value}} of the config flags given on the command line."""
    nested: dict[str, Any] = {}
    for dest, value in vars(namespace).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            nested.setdefault(section, {})[name] = list(value) if isinstance(value, list) else value
    return nested


def _parse_options(hint: Any) -> dict[str, Any]:
    """argparse keyword arguments that parse a string into a value of type `hint`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):  # Optional[X]: "none" clears it
        inner = next(a for a in args if a is not type(None))
        options = _parse_options(inner)
        parse = options.get("type", str)
        options["type"] = lambda text: None if text.lower() == "none" else parse(text)
        options.pop("choices", None)
        return options
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"choices": list(args), "metavar": "{" + ",".join(map(str, args)) + "}"}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"nargs": "+", "type": args[0], "metavar": args[0].__name__.upper()}
        return {"nargs": len(args), "type": args[0], "metavar": args[0].__name__.upper()}
    if hint is Path:
        return {"type": Path, "metavar": "PATH"}
    return {"type": hint, "metavar": hint.__name__.upper()}


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(repr(v) for v in value) if value else "()"
    return repr(value) if isinstance(value, str) else str(value)
