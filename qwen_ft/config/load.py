"""YAML file + `key.sub=value` overrides -> RunConfig, collecting every problem before raising.

Unknown keys (at any depth, in the file or in an override) are errors with a did-you-mean.
Values are checked and coerced against the dataclass field types in `schema.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from qwen_ft.config.schema import RunConfig
from qwen_ft.errors import ConfigError


def closest(word: str, options: typing.Iterable[str]) -> str | None:
    """The option `word` most likely meant, or None. An abbreviation made of a snake_case name's
    initials ('lr' for 'learning_rate') beats spelling similarity."""
    options = sorted(str(o) for o in options)  # sets: the same suggestion whatever the hash seed
    initials = [o for o in options if "_" in o and "".join(p[:1] for p in o.split("_")) == str(word)]
    close = initials or difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    close = closest(word, options)
    return f" (did you mean '{close}'?)" if close else ""


def did_you_mean_key(key: str, known: typing.Iterable[str]) -> str:
    """did_you_mean for a dotted config path, among the keys of its own section first
    ('train.lr' -> 'train.learning_rate', not the section 'train')."""
    known = list(known)
    section, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if section and k.rpartition(".")[0] == section}
    close = closest(leaf, siblings)
    return f" (did you mean '{siblings[close]}'?)" if close else did_you_mean(key, known)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin is dict:
        return "a mapping"
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return f"a list of {_type_name(inner)}" if typing.get_origin(inner) is Literal else "a list of strings"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against type `tp`; return the coerced value (or None after recording a problem)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if value is None:  # an empty section in YAML means "all defaults"
            return tp()
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return tp()
        return _build(tp, value, where + ".", problems)
    if origin in (Union, types.UnionType):  # Optional[X] and X | None alike
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, where, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and isinstance(value, str):
            return value
        problems.append(f"{where}: {value!r} is not {_type_name(tp)}{did_you_mean(value, choices)}")
        return None
    if origin is dict:  # free-form mappings (template variables): string keys, YAML values
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        problems.append(f"{where}: expected a mapping with string keys, got {value!r}")
        return None
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            (inner, _) = typing.get_args(tp)
            if typing.get_origin(inner) is Literal:  # a list of choices: each checked, with a did-you-mean
                return tuple(_coerce(v, inner, f"{where}[{i}]", problems) for i, v in enumerate(items))
            return tuple(items)
        problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return None
    return _coerce_scalar(value, tp, where, problems)


def _coerce_scalar(value: Any, tp: type, where: str, problems: list[str]) -> Any:
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string; accept it as the number the user meant
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return None


def _build(cls: type, raw: dict, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from `raw`, recording unknown keys and bad values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key{did_you_mean(key, fields)}")
    kwargs = {}
    for name in fields:
        if name in raw:
            value = _coerce(raw[name], hints[name], prefix + name, problems)
            if value is not None or raw[name] is None:
                kwargs[name] = value
    return cls(**kwargs)


def schema_paths(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts (leaves and sections)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += schema_paths(hints[f.name], prefix + f.name + ".")
    return out


def _inside_mapping(key: str) -> bool:
    """`data.template_kwargs.enable_thinking`: a key inside a free-form mapping field."""
    section, _, rest = key.partition(".")
    name, _, inner = rest.partition(".")
    cls = typing.get_type_hints(RunConfig).get(section)
    if not inner or cls is None or not dataclasses.is_dataclass(cls):
        return False
    return typing.get_origin(typing.get_type_hints(cls).get(name)) is dict


def parse_overrides(items: typing.Sequence[str]) -> tuple[list[tuple[list[str], Any]], list[str]]:
    """Parse `key.sub=value` strings; values are read as YAML scalars (true, 8, [a, b]).

    Returns:
        (parsed overrides as (key parts, value), problems)
    """
    parsed, problems = [], []
    known = set(schema_paths())
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {item!r}: expected key.sub=value")
            continue
        if key not in known and not _inside_mapping(key):
            problems.append(f"override {item!r}: unknown key '{key}'{did_you_mean_key(key, known)}")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        parsed.append((key.split("."), value))
    return parsed, problems


def _apply(raw: dict, parts: list[str], value: Any, problems: list[str]) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(f"override {'.'.join(parts)}: '{'.'.join(parts[: i + 1])}' is not a mapping in the file")
            return
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; file and syntax problems become ConfigError with the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} not found"], source=str(p))
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError([f"{p}{line}: invalid YAML: {getattr(e, 'problem', e)}"], source=str(p)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{p}: top level must be a mapping of sections, got {type(raw).__name__}"], source=str(p))
    return raw


def config_from_dict(raw: dict, overrides: typing.Sequence[str] = (), source: str = "config") -> RunConfig:
    """Build a validated RunConfig from a mapping plus overrides; raise every problem at once.

    Raises:
        ConfigError: listing unknown keys, wrong types and invalid combinations.
    """
    from qwen_ft.config.validate import validate_config

    raw = copy.deepcopy(raw)  # never mutate the caller's mapping
    parsed, problems = parse_overrides(overrides)
    for parts, value in parsed:
        _apply(raw, parts, value, problems)
    cfg = _build(RunConfig, raw, "", problems)
    if not problems:
        problems += validate_config(cfg)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Load `path` (YAML) with `key.sub=value` overrides into a validated RunConfig."""
    return config_from_dict(read_yaml(path), overrides, source=str(path))


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for printing and `run_config.yaml`."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, in schema order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
