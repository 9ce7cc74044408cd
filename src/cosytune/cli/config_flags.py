"""Flags of config-backed commands, generated from their config dataclasses.

``add_config_flags(parser, ConfigClass, ...)`` adds one flag per field (its type, Literal choices, bool
``--x`` / ``--no_x``, the seed workflow's aliases) whose help is the field's docstring followed by the
dataclass default, so the help cannot drift from the config. The parser remembers which config key each
flag sets; ``config_overrides`` / ``config_from_args`` / ``config_flag_values`` read them back, with the
precedence defaults < ``--config`` YAML < key=value overrides < explicit flags.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from cosytune.cli.common import flag

_FLAG_MAP = "_config_flags"  # namespace key: {config class name: {dest: dotted config key}}
_METAVARS = {int: "INT", float: "NUM", str: "TEXT", Path: "PATH"}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass's fields (the string right below each field), one line each.

    Read once per class from its source with ``ast``: the configs already document every field that
    way for readers and IDEs, so the CLI help reuses those sentences instead of a second copy in
    ``field(metadata={"help": ...})``.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (frozen app): flags keep the bare default
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def parse_bool(text: str) -> bool:
    """argparse ``type`` for true/false values (true, yes, on, 1 / false, no, off, 0)."""
    from cosytune.config.loading import BOOL_WORDS

    try:
        return BOOL_WORDS[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true or false, found {text!r}") from None


def _field(cls: type, dotted: str) -> tuple[type, Any, Any]:
    """(the dataclass that declares it, its type without Optional, its default) of ``dotted`` in ``cls``."""
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if head not in fields:
        raise KeyError(f"{cls.__name__} has no field {head!r}; fields: {', '.join(fields)}")
    tp = typing.get_type_hints(cls)[head]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else Any
    if rest:
        return _field(tp, rest)
    f = fields[head]
    return cls, tp, (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)


def format_default(value: Any) -> str:
    """A config default as the help shows it (the spelling a key=value override or YAML file takes)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and (not value or value != value.strip()):
        return repr(value)
    return str(value)


def add_config_flags(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    fields: Iterable[str] | None = None,
    *,
    skip: Collection[str] = (),
    aliases: Mapping[str, Iterable[str]] | None = None,
    negations: Mapping[str, Iterable[str]] | None = None,
    valued_bools: Collection[str] = (),
    class_defaults: bool = False,
    default_note: str | None = None,
) -> None:
    """Add one flag per field of the dataclass ``cls``, with the field's docstring and default as help.

    Args:
        parser: parser or argument group to add to.
        fields: field names to expose (dotted for nested configs: ``data.num_workers`` gives
            ``--num_workers``); default every field that is not itself a dataclass.
        skip: fields left out.
        aliases: extra option strings per field (the seed workflow's names, e.g. ``{"speaker": ["spk_id"]}``).
        negations: extra option strings of a bool field's ``--no_<name>`` flag.
        valued_bools: bool fields whose flag also takes a value (``--vad_filter false``); the others
            take none (``--trim`` / ``--no_trim``), so a key=value after them stays a positional.
        class_defaults: the parsed value defaults to the dataclass default; otherwise to None, which
            means "not given": the config file and key=value overrides decide (see :func:`config_overrides`).
        default_note: help text for the default instead of the dataclass value; ``{default}`` is
            replaced by it (e.g. ``"the model yaml's; {default} in Fun-CosyVoice3-0.5B"``).

    Each flag's dest is the field's last name component; the parser remembers which config key it sets.
    """
    aliases = aliases or {}
    negations = negations or {}
    if fields is None:
        fields = [f.name for f in dataclasses.fields(cls) if f.init and not dataclasses.is_dataclass(_field(cls, f.name)[1])]
    mapping: dict[str, str] = {}
    for dotted in fields:
        if dotted in skip:
            continue
        owner, tp, default = _field(cls, dotted)
        name = dotted.rsplit(".", 1)[-1]
        shown = format_default(default)
        shown = default_note.format(default=shown) if default_note else shown
        doc = field_docs(owner).get(name, "").replace("``", "").rstrip(".")
        required = default is dataclasses.MISSING  # a field without a default is a flag that must be given
        help_text = (doc if required else f"{doc} (default: {shown})").strip().replace("%", "%%")
        kw: dict[str, Any] = {"default": None if required or not class_defaults else default, "help": help_text}
        if required:
            kw["required"] = True
        if typing.get_origin(tp) is Literal:
            choices = list(typing.get_args(tp))
            kw.update(choices=choices, type=type(choices[0]))
        elif tp is bool and name in valued_bools:
            kw.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        elif tp is bool:
            kw.update(action="store_const", const=True)
        elif tp in _METAVARS:
            kw.update(type=tp, metavar=_METAVARS[tp])
        flag(parser, name, *aliases.get(name, ()), **kw)
        if tp is bool:
            flag(parser, f"no_{name}", f"--no-{name}", *negations.get(name, ()), dest=name, action="store_const",
                 const=False, default=kw["default"], help=f"set {name} to false")
        mapping[name] = dotted
    flags = dict(parser.get_default(_FLAG_MAP) or {})
    flags[cls.__name__] = {**flags.get(cls.__name__, {}), **mapping}
    parser.set_defaults(**{_FLAG_MAP: flags})


def config_flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """``{dotted config key: value}`` of the flags :func:`add_config_flags` made for ``cls`` that hold a value."""
    mapping = (getattr(args, _FLAG_MAP, None) or {}).get(cls.__name__, {})
    return {key: getattr(args, dest) for dest, key in mapping.items() if getattr(args, dest, None) is not None}


def config_overrides(args: argparse.Namespace, cls: type) -> dict:
    """The positional ``key=value`` overrides, then the explicit flags of ``cls`` on top, as one nested dict."""
    from cosytune.config.loading import parse_overrides, set_dotted

    out = parse_overrides(list(getattr(args, "overrides", None) or []))
    for key, value in config_flag_values(args, cls).items():
        set_dotted(out, key, value)
    return out


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """``cls`` from its defaults < ``--config`` YAML < key=value overrides < explicit flags."""
    from cosytune.config.loading import load_config

    return load_config(cls, getattr(args, "config", None), config_overrides(args, cls))
