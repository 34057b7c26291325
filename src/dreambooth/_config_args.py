"""Command-line flags generated from the config tree, grouped by section.

Every field `section.name` gets the flag `--section.name` and a short form: `--name` with
hyphens, or the field's `metadata["flag"]` where the bare name would be ambiguous
(`prior.loss_weight` -> `--prior-loss-weight`). Help comes from the field docstrings. Only flags
given on the command line override the file and the defaults.

Field metadata shapes the flag: `positional` (an optional positional argument), `repeat`
(a tuple given as a repeatable flag: `--prompt A --prompt B`), `negative` (the flag that sets a
boolean to False; default `no-<flag>`). Booleans get `--x/--no-x`; an optional boolean
(None: decide later) gets the two flags and no value by default. A section's own metadata can
give every short flag a `flag_prefix` (`--bench-steps`) or keep only some `fields`.
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
    return [
        (f.name, hints[f.name]) for f in dataclasses.fields(root) if dataclasses.is_dataclass(hints[f.name])
    ]


def add_config_arguments(parser: argparse.ArgumentParser, root: type) -> None:
    """Add one argument group per config section, one flag per field."""
    meta = {f.name: f.metadata for f in dataclasses.fields(root)}
    for section, cls in sections(root):
        prefix, only = meta[section].get("flag_prefix", ""), meta[section].get("fields")
        group = parser.add_argument_group(f"{section} options")
        docs, hints = field_docs(cls), get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if only is None or field.name in only:
                default = (
                    field.default if field.default is not dataclasses.MISSING else field.default_factory()
                )
                help_text = f"{docs.get(field.name, '')} (default: {_show(default)})".replace("%", "%%")
                _add_field(group, f"{section}.{field.name}", field, hints[field.name], help_text, prefix)


def _add_field(group, dest: str, field: dataclasses.Field, hint: Any, help_text: str, prefix: str) -> None:
    short = prefix + flag_name(field)
    if field.metadata.get("positional"):
        options = {**_parse_options(hint), "metavar": field.name.upper()}
        group.add_argument(dest, nargs="?", default=argparse.SUPPRESS, help=help_text, **options)
        return
    if _optional_inner(hint) is bool or "negative" in field.metadata:
        negative = prefix + field.metadata.get("negative", f"no-{flag_name(field)}")
        pair = group.add_mutually_exclusive_group()
        pair.add_argument(
            f"--{short}", dest=dest, action="store_const", const=True, default=argparse.SUPPRESS,
            help=help_text,
        )
        pair.add_argument(
            f"--{negative}", dest=dest, action="store_const", const=False, default=argparse.SUPPRESS,
            help=f"the opposite of --{short}",
        )
        for name, value in ((dest, True), (f"no-{dest}", False)):
            group.add_argument(
                f"--{name}", dest=dest, action="store_const", const=value, default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
        return
    options = _parse_options(hint)
    if field.metadata.get("repeat"):
        options = {**options, "action": "append", "nargs": None}
    group.add_argument(f"--{short}", dest=dest, help=help_text, default=argparse.SUPPRESS, **options)
    group.add_argument(f"--{dest}", dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **options)


def overrides_from_args(namespace: argparse.Namespace, root: type | None = None) -> dict[str, Any]:
    """Nested {section: {field: value}} of the config flags given on the command line (only `root`'s sections
    if given)."""
    wanted = None if root is None else {name for name, _ in sections(root)}
    nested: dict[str, Any] = {}
    for dest, value in vars(namespace).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            if wanted is None or section in wanted:
                nested.setdefault(section, {})[name] = list(value) if isinstance(value, list) else value
    return nested


def _optional_inner(hint: Any) -> Any:
    """X of `X | None`, else None."""
    if get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint):
        return next(a for a in get_args(hint) if a is not type(None))
    return None


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
