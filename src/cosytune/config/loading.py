"""Strict loading of dataclass configs from YAML files, dicts and ``key=value`` overrides.

* YAML is read with ``yaml.safe_load``: tags such as ``!new:`` are rejected, nothing is imported.
* Unknown keys and values of the wrong type are errors that name the key; every problem in a
  file is collected and reported together in one :class:`~cosytune.errors.ConfigError`.
* Dotted overrides (``optim.lr=1e-5``) go through the same code as the file.
* ``__post_init__`` validators on the dataclasses raise ``ValueError``; their messages are
  collected too.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from cosytune.errors import ConfigError
from cosytune.fileio import write_text

T = TypeVar("T")

_MISSING = object()


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Convert ``value`` to type ``tp``; append a problem and return _MISSING on failure."""
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sub_problems: list[str] = []
        for a in args:
            if a is type(None):
                continue
            out = _convert(value, a, key, sub_problems)
            if out is not _MISSING:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, found {value!r}")
        return _MISSING
    if origin is Literal:
        if value in args:
            return value
        problems.append(f"{key}: expected one of {', '.join(repr(a) for a in args)}; found {value!r}")
        return _MISSING
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, found {value!r}")
            return _MISSING
        item_tp = args[0] if args else Any
        out = [_convert(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        if any(o is _MISSING for o in out):
            return _MISSING
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, found {value!r}")
            return _MISSING
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping of {tp.__name__} fields, found {value!r}")
            return _MISSING
        return _build(tp, value, problems, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        problems.append(f"{key}: expected true or false, found {value!r}")
        return _MISSING
    if tp is int:
        if isinstance(value, bool):
            problems.append(f"{key}: expected an integer, found {value!r}")
            return _MISSING
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        problems.append(f"{key}: expected an integer, found {value!r}")
        return _MISSING
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{key}: expected a number, found {value!r}")
        return _MISSING
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{key}: expected a string, found {value!r}")
        return _MISSING
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value).expanduser()
        problems.append(f"{key}: expected a path, found {value!r}")
        return _MISSING
    return value


def _build(cls: type[T], data: dict, problems: list[str], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    for k in unknown:
        close = [f for f in fields if f.startswith(k[:3])]
        hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
        problems.append(f"{prefix}{k}: unknown key{hint}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    n_before = len(problems)
    for name in fields:
        if name in data:
            v = _convert(data[name], hints[name], prefix + name, problems)
            if v is not _MISSING:
                kwargs[name] = v
    if len(problems) != n_before:
        return _MISSING
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        problems.append(f"{prefix.rstrip('.') or cls.__name__}: {e}")
        return _MISSING


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``dotted="a.b"``, creating sections on the way."""
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value (e.g. optim.lr=1e-5)")
            continue
        k, v = item.split("=", 1)
        try:
            parsed = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            parsed = v
        set_dotted(out, k.strip(), parsed)
    if problems:
        raise ConfigError(problems, "overrides")
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping safely (no tags, no imports)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path", str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(
            f"not plain YAML ({str(e).splitlines()[0]}); cosytune configs use no !tags — "
            "for upstream recipe files use the dedicated readers",
            str(path),
        ) from e
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, found {type(data).__name__}", str(path))
    return data


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: list[str] | dict | None = None,
    base: dict | None = None,
) -> T:
    """Build ``cls`` from (base dict) ⊕ (YAML file) ⊕ (overrides), strictly.

    Raises:
        ConfigError: listing every unknown key, bad value and failed validation together.
    """
    data: dict = dict(base or {})
    source = "config"
    if path is not None:
        data = _merge(data, read_yaml(path))
        source = str(path)
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = _merge(data, ov)
    problems: list[str] = []
    out = _build(cls, data, problems)
    if problems or out is _MISSING:
        raise ConfigError(problems or ["invalid config"], source)
    return out


def config_to_dict(cfg: Any) -> Any:
    """Plain-data view of a config (Paths as strings, tuples as lists), for YAML/JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def dump_config(cfg: Any, path: str | os.PathLike) -> None:
    """Atomically write the resolved config as YAML."""
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))
