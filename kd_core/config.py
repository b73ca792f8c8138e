"""Typed dataclass configs: YAML via ``--config``, dotted CLI overrides, validation, resolved save.

Every command in this project describes its settings as a tree of dataclasses whose fields carry a default and
``metadata={"help": ...}`` (see :func:`option`). :func:`parse_command_line` turns ``--config file.yaml`` plus
``--section.field value`` overrides into a validated instance; :func:`save_config` writes the resolved tree beside
the outputs so a run can always be reproduced from its own directory.

We do not use ``transformers.HfArgumentParser`` because it cannot express nested sections (``lora.r``,
``losses.forward_kl``) and reports unknown YAML keys without suggesting the intended one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from kd_core.atomic import atomic_write_text
from kd_core.redact import MASK, check_env_var_name, redact_value

T = TypeVar("T")

# Field names that hold secrets are never written by save_config (an API key must come from the environment, but
# a user may still paste one into a YAML file by mistake). Credentials inside a URL (``http://user:key@host/v1``), in
# any field, are masked by to_dict as well (kd_core.redact).
SECRET_FIELD_NAMES = frozenset({"api_key", "token", "hf_token", "password"})
# Fields holding HTTP headers: saved with their names (what was configured) and every value masked, since any header
# (Authorization, X-Api-Key, a gateway's own) may carry a credential.
HEADER_FIELD_NAMES = frozenset({"headers", "default_headers", "extra_headers"})


class ConfigError(ValueError):
    """A user error in a config file or on the command line. Commands exit with code 2 on it."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, positional: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with help text. Mutable defaults (lists, dicts, dataclasses) are wrapped in a factory."""
    metadata = {"help": help, "positional": positional}
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        template = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(template), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def section(cls: type[T], help: str = "") -> T:
    """A nested config section whose default is ``cls()``."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "positional": False})


# --------------------------------------------------------------------------------------------------------------
# Building a config tree from plain data
# --------------------------------------------------------------------------------------------------------------


def from_dict(cls: type[T], data: dict[str, Any], where: str = "", root: type | None = None) -> T:
    """Builds ``cls`` from a nested mapping, coercing each value to its annotated type.

    Raises ConfigError naming the dotted field for unknown keys (with the closest known name, or the section where a
    key of that name belongs) and wrong types, and for a value in any ``*_env`` field that looks like a key itself.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {type(data).__name__}")
    root = root or cls
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(str(key), fields, where, root)}")
        kwargs[key] = _coerce(value, hints[key], dotted, root)
    try:
        for key, value in kwargs.items():
            if key.endswith("_env") and isinstance(value, str):  # names a variable; a key here would be saved
                check_env_var_name(key, value)
        instance = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # __post_init__ validation of the section
        raise ConfigError(f"{where or 'config'}: {err}") from None
    return instance


def _suggest(key: str, known: typing.Iterable[str], where: str, root: type | None = None) -> str:
    """A did-you-mean: the field of that name in another section (a key at the wrong level), else the closest name
    in this section, else the section's keys."""
    elsewhere = [name for name in (_all_dotted_fields(root) if root else []) if name.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; did you mean '{elsewhere[0]}'? (a key of that name belongs in another section)"
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    if not close:
        return f" (known keys: {', '.join(sorted(known))})"
    return f"; did you mean '{where + '.' if where else ''}{close[0]}'?"


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str, root: type | None = None) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, where, root)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: expected one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # YAML `loss:` with nothing under it: the defaults, silently, were not what was meant
            raise ConfigError(
                f"{where}: the section is empty (`{where.rsplit('.', 1)[-1]}:` with nothing under it); "
                "give its fields, or remove the line to use the defaults"
            )
        return from_dict(tp, value, where, root)
    if origin in (list, tuple, dict):
        return _coerce_container(value, tp, where, root)
    if tp in (bool, int, float, str):
        return _SCALARS[tp](value, where)
    raise ConfigError(f"{where}: unsupported field type {tp}")  # a programming error in a config class


def _coerce_union(value: Any, tp: Any, where: str, root: type | None) -> Any:
    options = get_args(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
    errors = []
    for option_tp in options:
        if option_tp is type(None):
            continue
        try:
            return _coerce(value, option_tp, where, root)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")


def _coerce_container(value: Any, tp: Any, where: str, root: type | None) -> Any:
    if get_origin(tp) is dict:
        if isinstance(value, str):
            value = _parse_cli_literal(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, where, root): _coerce(v, value_tp, f"{where}.{k}", root) for k, v in value.items()}
    if isinstance(value, str):
        value = _parse_cli_literal(value, where)
        if not isinstance(value, list):
            value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    (item_tp, *_) = get_args(tp) or (Any,)
    return [_coerce(v, item_tp, f"{where}[{i}]", root) for i, v in enumerate(value)]


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    try:
        as_float = float(value)
    except ValueError:
        raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if not as_float.is_integer():
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return int(as_float)


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)  # accepts "1e-4", which PyYAML reads as a string
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return str(value)


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _parse_cli_literal(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: could not parse {text!r}: {err}") from None


def to_dict(cfg: Any, *, redact: bool = True) -> dict[str, Any]:
    """The resolved config as plain data; secret-looking fields are dropped and URL user info is masked
    (``http://user:***@host/v1``) in every string. ``redact=False`` is the live config, for building a client."""
    out = {}
    for f in dataclasses.fields(cfg):
        if redact and f.name in SECRET_FIELD_NAMES:
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value, redact=redact)
        elif isinstance(value, tuple):
            value = list(value)
        if redact and f.name in HEADER_FIELD_NAMES and isinstance(value, dict):
            value = {name: MASK for name in value}
        elif redact:
            value = redact_value(value)
        out[f.name] = value
    return out


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Writes the resolved config as YAML (atomically, so a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _field_type(cls: type, dotted: str) -> Any:
    """The annotated type at a dotted path, or None when the path names no field."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _positional_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` may be overridden by the keys beside it
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key; SafeLoader reports it below
                continue
            if duplicate:
                raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(key)
        self.key, self.first_line, self.line = key, first_line, line


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
    except _DuplicateKey as dup:
        raise ConfigError(
            f"{path}:{dup.line}: duplicate key '{dup.key}' (first given on line {dup.first_line}); give each field once"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
    return data


def parse_command_line(cls: type[T], argv: list[str], prog: str, description: str = "") -> T:
    """``--config FILE`` then ``--a.b value`` / ``--a.b=value`` / ``--flag`` overrides, validated.

    Prints help and exits 0 on ``-h``/``--help``. Raises ConfigError on any user error.
    """
    if "-h" in argv or "--help" in argv:
        print(config_help(cls, prog, description))
        raise SystemExit(0)
    tree: dict[str, Any] = {}
    overrides: list[tuple[str, Any]] = []
    positionals = _positional_fields(cls)
    given_positionals: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            given_positionals.append(arg)
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "config":
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError("--config: expected a YAML file path")
                value = argv[i + 1]
                i += 1
            tree = _merge(tree, load_yaml(value))
            i += 1
            continue
        tp = _field_type(cls, key)
        if tp is None:
            known = _all_dotted_fields(cls)
            leaf = key.rsplit(".", 1)[-1]  # a field given at the wrong level: the field of that name elsewhere
            close = [k for k in known if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(
                key, known, n=1, cutoff=0.5
            )
            hint = f"; did you mean '--{close[0]}'?" if close else ""
            raise ConfigError(f"unknown option '--{key}'{hint} (see --help)")
        if not eq:
            next_is_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if tp is bool and not next_is_value:
                value = "true"
            elif not next_is_value:
                raise ConfigError(f"--{key}: expected a value")
            else:
                value = argv[i + 1]
                i += 1
        overrides.append((key, value))
        i += 1
    if len(given_positionals) > len(positionals):
        extra = given_positionals[len(positionals)]
        raise ConfigError(f"unexpected argument {extra!r} (options start with --; see --help)")
    for name, value in zip(positionals, given_positionals):
        overrides.append((name, value))
    for key, value in overrides:  # the command line wins over the YAML file
        _set_dotted(tree, key, value)
    return from_dict(cls, tree)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _all_dotted_fields(cls: type, prefix: str = "") -> list[str]:
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = prefix + f.name
        names.append(dotted)
        if dataclasses.is_dataclass(hints[f.name]):
            names.extend(_all_dotted_fields(hints[f.name], dotted + "."))
    return names


def config_help(cls: type, prog: str, description: str = "") -> str:
    """Help text generated from the dataclass tree: every field with its type, default and help."""
    positionals = _positional_fields(cls)
    usage = " ".join([prog, *(n.upper() for n in positionals), "[--config FILE]", "[--field value ...]"])
    lines = [f"usage: {usage}", ""]
    if description:
        lines += [description.strip(), ""]
    lines += ["  --config FILE    YAML file of fields; options given after it override it", ""]
    lines += _help_lines(cls, "")
    return "\n".join(lines)


def _help_lines(cls: type, prefix: str) -> list[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            lines += [f"  [{prefix}{f.name}] {help_text}"]
            lines += _help_lines(tp, prefix + f.name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        flag = f.name.upper() if f.metadata.get("positional") else f"--{prefix}{f.name}"
        lines.append(f"  {flag} ({_type_name(tp)}, default {default!r})")
        if help_text:
            lines.append(f"      {help_text}")
    return lines
