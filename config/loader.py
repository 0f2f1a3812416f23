"""The project's config loader: frozen dataclasses from a YAML file plus `key=value` overrides.

Every entry script describes its settings as a tree of frozen, keyword-only dataclasses and
builds them with `load_config`. Values are checked against the annotations before any work
starts: an unknown key, a missing required key or a value of the wrong type raises
`ConfigError` naming the dotted key, the value and what is expected.

    >>> from dataclasses import dataclass, field
    >>> from config.loader import load_config
    >>> @dataclass(frozen=True, kw_only=True)
    ... class Optim:
    ...     lr: float = 1e-3
    >>> @dataclass(frozen=True, kw_only=True)
    ... class Run:
    ...     name: str
    ...     epochs: int = 10
    ...     optim: Optim = field(default_factory=Optim)
    >>> load_config(Run, overrides=["name=demo", "optim.lr=3e-4"])
    Run(name='demo', epochs=10, optim=Optim(lr=0.0003))

Supported annotations: `int`, `float` (an int is accepted and widened), `str`, `bool`,
`pathlib.Path` (from a string), `Literal[...]`, `X | None`, `tuple[X, ...]`, `tuple[X, Y]`,
`dict[str, X]` and nested dataclasses. Override values are parsed as YAML scalars or flow
collections (`a.b=[1, 2]`, `a.c=null`). PyYAML reads `1e-3` as a string; for a `float` field a
string that is a valid float literal is accepted, since that is what the user meant.
"""

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the dataclass it is loaded into."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from the YAML mapping at `path` (optional) updated by `key=value` overrides.

    Overrides use dotted keys for nested dataclasses (`model.num_layers=4`) and win over the file.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(path)
    merged = merge(data, parse_overrides(overrides))
    where = f" (from {path})" if path is not None else ""
    try:
        return from_dict(cls, merged)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{where}") from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: pass the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn `["a.b=1", "c=x"]` into the nested mapping `{"a": {"b": 1}, "c": "x"}`."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.num_layers=4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not a YAML scalar or list: {exc}") from None
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[: depth + 1])!r} was already set to a value, "
                    "it cannot also have sub-keys"
                )
            node = child
        node[parts[-1]] = value
    return result


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else in `update` replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(cls: type[T], data: Any, *, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every key and value against its fields."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    label = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        full = f"{where}.{key}" if where else str(key)
        raise ConfigError(
            f"unknown key {full!r} for {cls.__name__}: valid keys are {sorted(fields)}; fix the spelling or remove it"
        )
    kwargs: dict[str, Any] = {}
    for name, fld in fields.items():
        full = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], full)
        elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {full!r} ({_type_name(hints[name])}) for {cls.__name__}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{label}: {exc}") from None


def to_dict(cfg: Any) -> Any:
    """A plain (JSON/YAML-ready) copy of a config tree: dataclasses become dicts, tuples lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"key {key!r}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"key {key!r}: {value!r} is not one of {list(args)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key {key!r}: expected a list for {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"key {key!r}: expected {len(args)} values for {_type_name(tp)}, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"key {key!r}: expected a mapping for {_type_name(tp)}, got {value!r}")
        key_tp, val_tp = args
        return {_convert(k, key_tp, f"{key}<key>"): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"key {key!r}: {value!r} is not a bool (write true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"key {key!r}: {value!r} is not an int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                parsed = float(value)
            except ValueError:
                parsed = None
            if parsed is not None and not math.isnan(parsed):
                return parsed
        raise ConfigError(f"key {key!r}: {value!r} is not a float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"key {key!r}: {value!r} is not a string (quote it in YAML)")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"key {key!r}: {value!r} is not a path string")
    raise ConfigError(f"key {key!r}: annotation {_type_name(tp)} is not supported by the config loader")
