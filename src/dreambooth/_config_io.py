"""Reading and writing config trees: dicts, TOML/YAML files, schema migrations.

`from_dict` is the one place where untyped data (a parsed file, CLI flags) becomes typed
dataclasses: every value is checked against its annotation and every unknown key is named,
with the closest known key suggested.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import tomli_w
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def migrate(data: dict[str, Any], current: int) -> dict[str, Any]:
    """Bring a config dict written by an older version up to schema `current`.

    Raises:
        ValueError: if the file comes from a newer version of the tool.
    """
    version = data.get("schema_version", current)
    if problem := _schema_version_problem(version):
        raise ValueError(f"config: {problem}")
    if version > current:
        raise ValueError(
            f"config has schema_version {version}, newer than this tool's {current}: upgrade dreambooth"
        )
    for step in range(version, current):
        data = _MIGRATIONS[step](data)
    return {**data, "schema_version": current}


# migrate_vN_to_vN1 functions, keyed by N, go here when the schema changes.
_MIGRATIONS: dict[int, typing.Callable[[dict[str, Any]], dict[str, Any]]] = {}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge two nested dicts; `override` wins."""
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def load_file(path: Path) -> dict[str, Any]:
    """Parse a TOML or YAML config file into a nested dict.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it cannot be parsed or has an unknown extension.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"config file {str(path)!r} does not exist" + (" (it is a folder)" if path.is_dir() else "")
        )
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"config file {str(path)!r} must end in .toml, .yaml or .yml")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"config file {str(path)!r} is not a text file (not UTF-8 at byte {error.start})"
        ) from error
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else (yaml.safe_load(text) or {})
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ValueError(
            f"config file {str(path)!r} is not valid {path.suffix[1:].upper()}: {error}"
        ) from error
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {str(path)!r}: its top level must be sections of keys (e.g. `train:` with "
            f"`max_steps: 400` under it), not a {type(data).__name__}"
        )
    if "schema_version" in data and (problem := _schema_version_problem(data["schema_version"])):
        raise ValueError(f"config file {str(path)!r}: {problem}")
    return data


def _schema_version_problem(version: Any) -> str | None:
    if isinstance(version, int) and not isinstance(version, bool) and version >= 1:
        return None
    return f"schema_version must be a whole number >= 1 (the config format's version), got {version!r}"


def save_toml(config: Any, path: Path) -> None:
    """Write a config tree as TOML (None values are left out: they are the defaults)."""
    path.write_text(tomli_w.dumps(to_dict(config)), encoding="utf-8")


def to_dict(config: Any) -> dict[str, Any]:
    """Turn a config tree into plain TOML-ready data (Paths as strings, tuples as lists, no None)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif value is not None:
            out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class ConfigError(ValueError):
    """Every problem found in a config tree (file, flags or Python), raised at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        text = (
            self.problems[0] if len(self.problems) == 1
            else "invalid configuration:\n  - " + "\n  - ".join(self.problems)
        )
        super().__init__(text)


def raise_problems(rules: list[tuple[bool, str]]) -> None:
    """Raise one ConfigError naming the message of every rule whose condition is False.

    Raises:
        ConfigError: if any rule is broken.
    """
    if problems := [message for ok, message in rules if not ok]:
        raise ConfigError(problems)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from nested `data`, checking every key and value type.

    Every problem in every section (unknown keys, wrong types, failed `__post_init__` checks)
    is collected and reported at once.

    Raises:
        ConfigError: listing each key that is unknown (with the closest known key), of the
            wrong type, or has a value its section rejects.
    """
    if not isinstance(data, dict):
        raise ConfigError([f"{prefix.rstrip('.') or 'config'} must be a table of settings, got {data!r}"])
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = [
        f"unknown config key {prefix + key!r}{_suggestion(key, cls, prefix)}" for key in data
        if key not in fields
    ]
    kwargs: dict[str, Any] = {}
    for key, f in fields.items():
        hint = hints[key]
        try:
            if dataclasses.is_dataclass(hint) and (key in data or f.default_factory is hint):
                # absent: its defaults, still checked
                kwargs[key] = from_dict(hint, data.get(key, {}), f"{prefix}{key}.")
            elif key in data:
                kwargs[key] = coerce(data[key], hint, prefix + key)
        except ValueError as error:
            problems += getattr(error, "problems", [str(error)])
    if not problems:
        try:
            return cls(**kwargs)
        except ValueError as error:
            problems += getattr(error, "problems", [str(error)])
    raise ConfigError(problems)


def load_tree(cls: type[T], path: Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build the config tree `cls` of a command from its defaults, then a TOML/YAML file, then overrides
    (flags).

    Raises:
        FileNotFoundError: if `path` does not exist.
        ConfigError: listing every unknown key, wrong type and rejected value.
    """
    return from_dict(cls, merge(load_file(path) if path is not None else {}, overrides or {}))


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against type `hint`, converting where the meaning is unambiguous (str -> Path)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, key)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config key {key!r} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} must be a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ValueError(f"config key {key!r} must have {len(args)} items, got {list(value)!r}")
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ValueError(
                f"config key {key!r} must be a path (string), got {type(value).__name__} {value!r}"
            )
        return Path(value).expanduser()
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ValueError(f"config key {key!r} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _suggestion(key: str, cls: type, prefix: str) -> str:
    """'; did you mean ...' for an unknown key: a sibling with a close name, or the section holding it."""
    siblings = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    for f in dataclasses.fields(cls):
        hint = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint) and key in {g.name for g in dataclasses.fields(hint)}:
            return f"; did you mean {prefix + f.name + '.' + key!r} (it belongs in the [{f.name}] section)?"
    return f"; known keys: {', '.join(siblings)}"


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field), by field name;
    a subclass inherits those of the fields it does not redeclare."""
    inherited = {
        name: doc for base in reversed(cls.__mro__[1:-1]) for name, doc in _own_field_docs(base).items()
    }
    return inherited | _own_field_docs(cls)


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # source unavailable (frozen app): no help text, still works
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs
