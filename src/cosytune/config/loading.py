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

INVALID = object()
"""What :func:`convert_value` returns for a value it could not convert (the problem is recorded)."""

BOOL_WORDS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}
_EXPECTED = {bool: "bool (true or false)", int: "int (a whole number)", float: "float (a number)",
             str: "str (text)", Path: "a path"}


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _expected(tp: Any) -> str:
    if get_origin(tp) in (list, tuple):
        return "a list"
    if get_origin(tp) is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return _EXPECTED.get(tp) or _type_name(tp)


def convert_value(value: Any, tp: Any, key: str, problems: list[str], *, strict: bool = False) -> Any:
    """Convert ``value`` to type ``tp``, or append a problem naming ``key`` and return :data:`INVALID`.

    The one value check of every config reader. Lenient (cosytune's YAML configs, ``key=value``
    overrides): text spellings are read (``yes`` as a bool, ``"3"`` as an int, ``a,b`` as a list) and
    numbers stand in for text. ``strict`` (upstream's ``cosyvoice3.yaml``, read as data): a value must
    already have its type, except an integral float for an int and an int or numeric text for a float
    (YAML 1.1 reads ``1e-5`` as text); a sequence may not be empty.
    """
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None) and (out := convert_value(value, a, key, [], strict=strict)) is not INVALID:
                return out
    elif origin is Literal:
        if value in args:
            return value
        problems.append(f"{key}: expected one of {', '.join(repr(a) for a in args)}; found {value!r}")
        return INVALID
    elif origin in (list, tuple):
        if isinstance(value, str) and not strict:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and (value or not strict):
            item_tp = args[0] if args else Any
            out = [convert_value(v, item_tp, f"{key}[{i}]", problems, strict=strict) for i, v in enumerate(value)]
            if any(o is INVALID for o in out):
                return INVALID
            return tuple(out) if origin is tuple else out
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return _build(tp, value, problems, prefix=f"{key}.")
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if not strict and isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
        if not strict and isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and not strict:
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str) or (not strict and isinstance(value, (int, float)) and not isinstance(value, bool)):
            return str(value)
    elif tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value).expanduser()
    else:
        return value
    problems.append(f"{key}: expected {_expected(tp)}, found {value!r}")
    return INVALID


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
            v = convert_value(data[name], hints[name], prefix + name, problems)
            if v is not INVALID:
                kwargs[name] = v
    if len(problems) != n_before:
        return INVALID
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        problems.append(f"{prefix.rstrip('.') or cls.__name__}: {e}")
        return INVALID


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


def merge_dicts(base: dict, extra: dict) -> dict:
    """``base`` updated with ``extra``, nested sections merged key by key (neither is changed)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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
        data = merge_dicts(data, read_yaml(path))
        source = str(path)
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = merge_dicts(data, ov)
    problems: list[str] = []
    out = _build(cls, data, problems)
    if problems or out is INVALID:
        raise ConfigError(problems or ["invalid config"], source)
    return out


def config_to_dict(cfg: Any) -> Any:
    """Plain-data view of a config or record (Paths as strings, tuples as lists, numpy/torch values as
    Python numbers or lists), for YAML/JSON."""
    if hasattr(cfg, "tolist"):
        return cfg.tolist()
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
