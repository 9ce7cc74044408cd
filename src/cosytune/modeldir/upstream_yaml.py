"""Read and write upstream's ``cosyvoice3.yaml`` without executing it.

Upstream parses this file with HyperPyYAML, where tags build objects: ``!new:pkg.Class`` constructs a
class, ``!name:pkg.func`` makes a partial, ``!apply:pkg.func`` calls a function at load time (the
seeding lines), and ``!ref <key>`` refers to another entry (with simple arithmetic such as
``!ref <chunk_size> * <token_mel_ratio>``). Building the file imports and runs everything it names.

Here the same file is read as *data*:

1. :func:`load_upstream_yaml` parses it with a ``yaml.SafeLoader`` subclass whose tag handlers only
   record what the tag said (:class:`TaggedNode`), resolves ``!ref``/``!copy`` references and the
   arithmetic the file uses, and imports nothing. YAML 1.2 float spellings (``1e-06``) are numbers, as
   in ruamel/HyperPyYAML.
2. :func:`parse_cosyvoice3_yaml` checks the structure (classes must be the CosyVoice 3 ones, every
   argument known) and maps the numbers directly onto the networks' own configs (``LLMConfig``,
   ``FlowConfig`` with its ``DiTConfig``, ``HiFTConfig``, ``SamplingConfig``), held with the shared
   numbers by :class:`CosyVoice3Hparams`. One map per upstream constructor names the field each argument
   sets (``_FLOW_ARGS`` ...); the writer uses the same field names. :func:`llm_config`,
   :func:`flow_config` and :func:`hift_config` are the same readers for the constructor arguments of one
   network given as plain JSON (the golden fixtures). Anything not understood is reported, all problems
   at once, as :class:`~cosytune.errors.ConfigError`.
3. :func:`dump_cosyvoice3_yaml` writes a file in the same tagged format (so upstream CosyVoice can build
   the networks from it) from a :class:`CosyVoice3Hparams` (e.g. the tiny preset).

The Qwen2 backbone sizes are not in the yaml (it only names ``CosyVoice-BlankEN`` and gives the width);
they come from that folder's ``config.json``, passed in as ``qwen2``.

Upstream reference: ``examples/libritts/cosyvoice3/conf/cosyvoice3.yaml`` and the model dir's
``cosyvoice3.yaml``; ``cosyvoice/cli/cosyvoice.py`` (how it is loaded). Read for facts only.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import logging
import operator
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cosytune.config.loading import INVALID, convert_value
from cosytune.errors import ConfigError
from cosytune.models.dit import DiTConfig
from cosytune.models.flow import FlowConfig
from cosytune.models.hift import HiFTConfig
from cosytune.models.llm import LLMConfig
from cosytune.models.qwen2 import Qwen2Config
from cosytune.models.sampling import SamplingConfig

logger = logging.getLogger(__name__)

# Upstream class paths that make a directory a CosyVoice 3 model (upstream asserts the same trio).
LLM_CLASS = "cosyvoice.llm.llm.CosyVoice3LM"
QWEN_ENCODER_CLASS = "cosyvoice.llm.llm.Qwen2Encoder"
RAS_SAMPLING_FUNC = "cosyvoice.utils.common.ras_sampling"
FLOW_CLASS = "cosyvoice.flow.flow.CausalMaskedDiffWithDiT"
PRE_LOOKAHEAD_CLASS = "cosyvoice.transformer.upsample_encoder.PreLookaheadLayer"
CFM_CLASS = "cosyvoice.flow.flow_matching.CausalConditionalCFM"
DIT_CLASS = "cosyvoice.flow.DiT.dit.DiT"
DICTCONFIG_CLASS = "omegaconf.DictConfig"
HIFT_CLASS = "cosyvoice.hifigan.generator.CausalHiFTGenerator"
F0_CLASS = "cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor"
MEL_FUNC = "matcha.utils.audio.mel_spectrogram"
TOKENIZER_FUNC = "cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer"


# --------------------------------------------------------------------------------------------------
# 1. Inert HyperPyYAML parsing
# --------------------------------------------------------------------------------------------------


class TaggedNode(dict):
    """What a ``!new:`` / ``!name:`` / ``!apply:`` tag asked for, recorded and never executed.

    The node *is* the dict of its keyword arguments (so code that only wants the numbers under a tag,
    such as ``train_conf`` or ``batch``, can treat it as a mapping); the tag itself is kept in attributes.

    Attributes:
        kind: ``"new"`` (construct), ``"name"`` (partial) or ``"apply"`` (call at load time).
        target: the dotted Python path named by the tag, e.g. ``cosyvoice.flow.DiT.dit.DiT``.
        args: positional arguments (a YAML sequence under the tag).
        line: 1-based line of the tag in the file, for messages.
    """

    def __init__(self, kind: str = "", target: str = "", args: list[Any] | None = None,
                 kwargs: dict[str, Any] | None = None, line: int = 0) -> None:
        super().__init__(kwargs or {})
        self.kind = kind
        self.target = target
        self.args = list(args or [])
        self.line = line

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments (the mapping under the tag)."""
        return self

    def __repr__(self) -> str:
        return f"TaggedNode(!{self.kind}:{self.target}, args={self.args!r}, kwargs={dict(self)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TaggedNode):
            return (self.kind, self.target, self.args, dict(self)) == (other.kind, other.target, other.args,
                                                                       dict(other))
        return dict.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]


@dataclass
class _Ref:
    expr: str
    copy: bool
    line: int


# YAML 1.2 floats: PyYAML (YAML 1.1) reads "1e-06" and "1e-5" as strings; ruamel (HyperPyYAML) as floats.
_FLOAT_12 = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
    r"|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"
)


class _InertLoader(yaml.SafeLoader):
    """SafeLoader that turns HyperPyYAML tags into inert records."""


_InertLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_InertLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _construct_tagged(kind: str):
    def construct(loader: _InertLoader, suffix: str, node: yaml.Node) -> TaggedNode:
        line = node.start_mark.line + 1
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", suffix or ""):
            raise yaml.constructor.ConstructorError(
                None, None, f"!{kind}: needs a dotted Python name, found {suffix!r}", node.start_mark
            )
        if isinstance(node, yaml.MappingNode):
            return TaggedNode(kind, suffix, [], loader.construct_mapping(node, deep=True), line)
        if isinstance(node, yaml.SequenceNode):
            return TaggedNode(kind, suffix, loader.construct_sequence(node, deep=True), {}, line)
        value = loader.construct_scalar(node)
        return TaggedNode(kind, suffix, [] if value in ("", None) else [value], {}, line)

    return construct


def _construct_ref(copy_: bool):
    def construct(loader: _InertLoader, node: yaml.Node) -> _Ref:
        if not isinstance(node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(None, None, "!ref needs a scalar like <key>", node.start_mark)
        return _Ref(str(loader.construct_scalar(node)), copy_, node.start_mark.line + 1)

    return construct


def _construct_tuple(loader: _InertLoader, node: yaml.Node) -> tuple:
    if isinstance(node, yaml.SequenceNode):
        return tuple(loader.construct_sequence(node, deep=True))
    text = str(loader.construct_scalar(node)).strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    return tuple(yaml.load(f"[{text}]", Loader=_InertLoader))


def _unsupported(loader: _InertLoader, suffix: str, node: yaml.Node) -> Any:
    tag = node.tag
    raise yaml.constructor.ConstructorError(
        None, None,
        f"tag {tag!r} is not supported by cosytune's safe reader (supported: !new:, !name:, !apply:, !ref, !copy, "
        "!tuple)", node.start_mark,
    )


_InertLoader.add_multi_constructor("!new:", _construct_tagged("new"))
_InertLoader.add_multi_constructor("!name:", _construct_tagged("name"))
_InertLoader.add_multi_constructor("!apply:", _construct_tagged("apply"))
_InertLoader.add_constructor("!ref", _construct_ref(False))
_InertLoader.add_constructor("!copy", _construct_ref(True))
_InertLoader.add_constructor("!tuple", _construct_tuple)
_InertLoader.add_multi_constructor("!", _unsupported)
_InertLoader.add_multi_constructor("tag:", _unsupported)


_REF_TOKEN = re.compile(r"<([^<>]+)>")
_ARITH_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}


def _eval_arith(text: str) -> int | float:
    """Evaluate ``text`` if it is numbers joined by + - * / // % ** and parentheses; else ValueError."""
    tree = ast.parse(text.strip(), mode="eval")

    def ev(n: ast.AST) -> int | float:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) and not isinstance(n.value, bool):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _ARITH_OPS:
            return _ARITH_OPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            v = ev(n.operand)
            return -v if isinstance(n.op, ast.USub) else v
        raise ValueError(f"not plain arithmetic: {ast.dump(n)[:60]}")

    return ev(tree)


class _Resolver:
    """Resolves ``!ref``/``!copy`` nodes against the top level of the document."""

    def __init__(self, doc: dict[str, Any], source: str) -> None:
        self.doc = doc
        self.source = source
        self.done: dict[str, Any] = {}
        self.active: list[str] = []

    def lookup(self, key: str, line: int) -> Any:
        # <a.b> and <a[b]> address nested entries, as in HyperPyYAML
        parts = [p for p in re.split(r"[.\[\]]", key.strip()) if p]
        if not parts:
            raise ConfigError(f"line {line}: empty reference <{key}>", self.source)
        top = parts[0]
        if top not in self.doc:
            raise ConfigError(f"line {line}: !ref <{key}> names {top!r}, which is not a top-level key", self.source)
        if top in self.active:
            raise ConfigError(f"line {line}: circular reference via {' -> '.join(self.active + [top])}", self.source)
        if top not in self.done:
            self.active.append(top)
            self.done[top] = self.resolve(self.doc[top])
            self.active.pop()
        value = self.done[top]
        for p in parts[1:]:
            if isinstance(value, TaggedNode):
                value = value.kwargs
            if isinstance(value, dict) and p in value:
                value = value[p]
            elif isinstance(value, (list, tuple)) and p.lstrip("-").isdigit():
                value = value[int(p)]
            else:
                raise ConfigError(f"line {line}: !ref <{key}>: {p!r} not found", self.source)
        return value

    def resolve_ref(self, ref: _Ref) -> Any:
        tokens = _REF_TOKEN.findall(ref.expr)
        if not tokens:
            raise ConfigError(f"line {ref.line}: !ref {ref.expr!r} contains no <key>", self.source)
        if _REF_TOKEN.fullmatch(ref.expr.strip()):
            value = self.lookup(tokens[0], ref.line)
            return copy.deepcopy(value) if ref.copy else value
        values = {t: self.lookup(t, ref.line) for t in tokens}
        text = _REF_TOKEN.sub(lambda m: repr(values[m.group(1)]) if isinstance(values[m.group(1)], (int, float))
                              and not isinstance(values[m.group(1)], bool) else str(values[m.group(1)]), ref.expr)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
            try:
                return _eval_arith(text)
            except (ValueError, SyntaxError, ZeroDivisionError):
                pass
        return text  # string interpolation such as <dir>/file

    def resolve(self, value: Any) -> Any:
        if isinstance(value, _Ref):
            return self.resolve_ref(value)
        if isinstance(value, TaggedNode):
            return TaggedNode(value.kind, value.target, [self.resolve(v) for v in value.args],
                              {k: self.resolve(v) for k, v in value.kwargs.items()}, value.line)
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self.resolve(v) for v in value)
        return value


def load_upstream_yaml(
    source: str | os.PathLike, overrides: dict[str, Any] | None = None, *, text: str | None = None
) -> dict[str, Any]:
    """Parse a HyperPyYAML file into plain data without importing or running anything it names.

    Args:
        source: path of the file (also used in messages when ``text`` is given).
        overrides: top-level keys to replace before references are resolved (upstream overrides
            ``qwen_pretrain_path`` this way).
        text: the YAML text; read from ``source`` when omitted.

    Returns:
        The document with tags as :class:`TaggedNode` records and every reference resolved.

    Raises:
        ConfigError: unreadable YAML, an unsupported tag, or a reference that cannot be resolved.
    """
    name = str(source)
    if text is None:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the file ({e})", name) from e
    try:
        doc = yaml.load(text, Loader=_InertLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid (Hyper)YAML: {e}", name) from e
    if not isinstance(doc, dict):
        raise ConfigError(f"expected a mapping at the top level, found {type(doc).__name__}", name)
    for k, v in (overrides or {}).items():
        doc[k] = v
    resolver = _Resolver(doc, name)
    return {k: resolver.lookup(k, 0) for k in doc}


# --------------------------------------------------------------------------------------------------
# 2. The networks' own configs from upstream's constructor arguments
# --------------------------------------------------------------------------------------------------
#
# Each network has one config class (``LLMConfig``, ``FlowConfig`` with its ``DiTConfig``, ``HiFTConfig``,
# ``SamplingConfig``). The maps below name, per upstream constructor, which of our fields each argument
# sets; the reader and the writer both use them, so a new argument is added in the config class and here.

# CosyVoice3LM (``llm_input_size``/``llm_output_size`` are the backbone width, checked separately).
_LLM_ARGS = {"speech_token_size": "speech_token_size", "length_normalized_loss": "length_normalized_loss",
             "lsm_weight": "lsm_weight", "mix_ratio": "mix_ratio"}
# the ``ras_sampling`` partial
_SAMPLING_ARGS = {"top_p": "top_p", "top_k": "top_k", "win_size": "win_size", "tau_r": "tau_r"}
# CausalMaskedDiffWithDiT, its PreLookaheadLayer, CausalConditionalCFM (+ cfm_params) and DiT
_FLOW_ARGS = {k: k for k in ("input_size", "output_size", "spk_embed_dim", "output_type", "vocab_size",
                             "input_frame_rate", "only_mask_loss", "token_mel_ratio", "pre_lookahead_len")}
_PRE_LOOKAHEAD_ARGS = {"in_channels": "input_size", "channels": "pre_lookahead_channels",
                       "pre_lookahead_len": "pre_lookahead_len"}
_CFM_ARGS = {"in_channels": "cfm_in_channels", "n_spks": "n_spks", "spk_emb_dim": "spk_emb_dim"}
_CFM_PARAMS = {k: k for k in ("sigma_min", "solver", "t_scheduler", "training_cfg_rate", "inference_cfg_rate",
                              "reg_loss_type")}
_DIT_ARGS = {k: k for k in ("dim", "depth", "heads", "dim_head", "ff_mult", "mel_dim", "mu_dim", "spk_dim",
                            "out_channels", "static_chunk_size", "num_decoding_left_chunks", "dropout",
                            "long_skip_connection")}
# CausalHiFTGenerator, its istft_params and CausalConvRNNF0Predictor
_HIFT_ARGS = {k: k for k in ("in_channels", "base_channels", "nb_harmonics", "sampling_rate", "nsf_alpha",
                             "nsf_sigma", "nsf_voiced_threshold", "upsample_rates", "upsample_kernel_sizes",
                             "resblock_kernel_sizes", "resblock_dilation_sizes", "source_resblock_kernel_sizes",
                             "source_resblock_dilation_sizes", "lrelu_slope", "audio_limit", "conv_pre_look_right")}
_ISTFT_ARGS = {"n_fft": "istft_n_fft", "hop_len": "istft_hop_len"}
_F0_ARGS = {"num_class": "f0_num_class", "in_channels": "f0_in_channels", "cond_channels": "f0_cond_channels"}


@dataclass(frozen=True)
class MelHparams:
    """``feat_extractor`` (matcha ``mel_spectrogram``) arguments (spec §5.6)."""

    n_fft: int = 1920
    num_mels: int = 80
    sampling_rate: int = 24000
    hop_size: int = 480
    win_size: int = 1920
    fmin: float = 0.0
    fmax: float | None = None
    center: bool = False


_MEL_ARGS = {f.name: f.name for f in dataclasses.fields(MelHparams)}


@dataclass(frozen=True)
class CosyVoice3Hparams:
    """A model dir's configuration: the three networks' configs and the shared numbers of ``cosyvoice3.yaml``.

    ``llm`` includes the Qwen2 backbone, which comes from ``CosyVoice-BlankEN/config.json`` (the yaml
    only gives its width).
    """

    sample_rate: int = 24000
    token_frame_rate: int = 25
    token_mel_ratio: int = 2
    chunk_size: int = 25
    num_decoding_left_chunks: int = -1
    llm: LLMConfig = field(default_factory=LLMConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)
    mel: MelHparams = field(default_factory=MelHparams)
    skip_special_tokens: bool = True


# --------------------------------------------------------------------------------------------------
# Mapping inert data → configs, collecting every problem
# --------------------------------------------------------------------------------------------------


class _Collector:
    """Collects every problem of one reading.

    ``tagged``: nested objects must be the ``!new:``/``!name:`` tags upstream builds (a yaml file); when
    False (constructor arguments given as plain JSON, as in the golden fixtures) plain mappings stand in
    for them.
    """

    def __init__(self, tagged: bool = True) -> None:
        self.problems: list[str] = []
        self.tagged = tagged

    def node(self, value: Any, where: str, kind: str, target: str) -> dict[str, Any] | None:
        """The keyword arguments under a tag (or a plain mapping when not ``tagged``)."""
        if not self.tagged and not isinstance(value, TaggedNode):
            if value is None:
                return {}
            if isinstance(value, dict):
                return value
        if not isinstance(value, TaggedNode):
            self.problems.append(f"{where}: expected '!{kind}:{target}', found {_describe(value)}")
            return None
        if value.target != target or value.kind != kind:
            self.problems.append(
                f"{where} (line {value.line}): expected '!{kind}:{target}', found '!{value.kind}:{value.target}'; "
                "this is not a CosyVoice 3 model (or a version cosytune does not know)"
            )
            return None
        if value.args:
            self.problems.append(f"{where} (line {value.line}): expected keyword arguments, found positional ones")
            return None
        return value.kwargs

    def fields(self, kwargs: dict[str, Any], where: str, cls: type, names: dict[str, str],
               required: tuple[str, ...] = ()) -> dict[str, Any]:
        """Convert upstream ``kwargs`` to ``cls`` field values via ``names`` (upstream → ours).

        Unknown arguments, wrong types and missing ``required`` arguments are problems.
        """
        hints = typing.get_type_hints(cls)
        out: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key not in names:
                self.problems.append(f"{where}.{key}: unknown argument (cosytune does not know what it changes)")
                continue
            converted = convert_value(value, hints[names[key]], f"{where}.{key}", self.problems, strict=True)
            if converted is not INVALID:
                out[names[key]] = converted
        for key in required:
            if key not in kwargs:
                self.problems.append(f"{where}.{key}: missing (required)")
        return out

    def build(self, cls: type, values: dict[str, Any], where: str) -> Any:
        """``cls(**values)``, its validation errors added to the problems (None then, or when a part is None)."""
        if any(v is None for v in values.values()):
            return None
        try:
            return cls(**values)
        except (ValueError, TypeError, ConfigError) as e:
            found = e.problems if isinstance(e, ConfigError) else str(e).split("; ")
            self.problems.extend(f"{where}: {p}" for p in found)
            return None


def _describe(value: Any) -> str:
    if isinstance(value, TaggedNode):
        return f"'!{value.kind}:{value.target}' (line {value.line})"
    return f"{type(value).__name__} {value!r}"[:120]


def _finish(c: _Collector, result: Any, source: str) -> Any:
    if c.problems:
        raise ConfigError(c.problems, source)
    return result


def llm_config(kwargs: dict[str, Any], qwen2: Qwen2Config | dict[str, Any] | None = None, *,
               source: str = "llm config") -> LLMConfig:
    """``LLMConfig`` from ``CosyVoice3LM`` arguments (the yaml ``llm`` block, or the same as plain JSON).

    Args:
        kwargs: ``llm_input_size``, ``llm_output_size``, ``speech_token_size``, ... (a nested ``sampling``
            ``ras_sampling`` partial and the ``llm`` ``Qwen2Encoder`` are read too when given).
        qwen2: the backbone (a :class:`Qwen2Config` or a ``config.json`` dict); None: the released
            backbone, which must then have the yaml's width.
        source: named in the error.

    Raises:
        ConfigError: listing every problem.
    """
    c = _Collector(tagged=isinstance(kwargs, TaggedNode))
    return _finish(c, _llm(kwargs, c, qwen2), source)


def flow_config(kwargs: dict[str, Any], *, source: str = "flow config") -> FlowConfig:
    """``FlowConfig`` from ``CausalMaskedDiffWithDiT`` arguments with ``pre_lookahead_layer`` and ``decoder``
    (whose ``cfm_params`` and ``estimator`` are nested), as in the yaml or as plain JSON.

    Raises:
        ConfigError: listing every problem.
    """
    c = _Collector(tagged=isinstance(kwargs, TaggedNode))
    return _finish(c, _flow(kwargs, c), source)


def hift_config(kwargs: dict[str, Any], f0_predictor: dict[str, Any] | None = None, *,
                source: str = "HiFT config") -> HiFTConfig:
    """``HiFTConfig`` from ``CausalHiFTGenerator`` arguments (``istft_params`` and ``f0_predictor``
    nested, as in the yaml; or the f0 predictor's arguments given separately).

    Raises:
        ConfigError: listing every problem.
    """
    c = _Collector(tagged=isinstance(kwargs, TaggedNode))
    if f0_predictor is not None:
        kwargs = {**kwargs, "f0_predictor": f0_predictor}
    return _finish(c, _hift(kwargs, c), source)


# Top-level keys the mapping reads, and keys it knows are irrelevant to the networks (data pipeline,
# training, GAN). Anything else is reported only as a debug message, not as an error: recipe files carry
# many such entries and they do not change the networks.
_SCALARS = ("sample_rate", "token_frame_rate", "token_mel_ratio", "chunk_size", "num_decoding_left_chunks")


def parse_cosyvoice3_yaml(
    source: str | os.PathLike, *, text: str | None = None, overrides: dict[str, Any] | None = None,
    qwen2: Qwen2Config | None = None,
) -> CosyVoice3Hparams:
    """Read ``cosyvoice3.yaml`` safely and map it onto the networks' configs.

    Args:
        source: path of the yaml (or a name for messages when ``text`` is given).
        text: YAML text; read from ``source`` when omitted.
        overrides: top-level overrides applied before references resolve.
        qwen2: the LLM backbone (``CosyVoice-BlankEN/config.json``); None: the released one, which must
            then have the yaml's ``llm_input_size``.

    Returns:
        The model dir's configuration.

    Raises:
        ConfigError: listing every structural problem (wrong classes, unknown or missing arguments,
            wrong types, values the networks reject).
    """
    doc = load_upstream_yaml(source, overrides, text=text)
    c = _Collector()
    top: dict[str, Any] = {}
    for key in _SCALARS:
        if key in doc:
            v = convert_value(doc[key], int, key, c.problems, strict=True)
            if v is not INVALID:
                top[key] = v
    for key in ("llm", "flow", "hift"):
        if key not in doc:
            c.problems.append(f"{key}: missing (a CosyVoice 3 yaml defines llm, flow and hift)")
    nets: dict[str, Any] = {}
    for key, parse in (("llm", lambda kw: _llm(kw, c, qwen2)), ("flow", lambda kw: _flow(kw, c)),
                       ("hift", lambda kw: _hift(kw, c))):
        node = c.node(doc[key], key, "new", _CLASSES[key]) if key in doc else None
        if node is not None:
            nets[key] = parse(node)
    mel = MelHparams()
    if "feat_extractor" in doc:
        mel_kw = c.node(doc["feat_extractor"], "feat_extractor", "name", MEL_FUNC)
        if mel_kw is not None:
            mel = MelHparams(**c.fields(mel_kw, "feat_extractor", MelHparams, _MEL_ARGS))
    skip_special = True
    tok = doc.get("get_tokenizer")
    if isinstance(tok, TaggedNode) and tok.target == TOKENIZER_FUNC:
        skip_special = bool(tok.kwargs.get("skip_special_tokens", True))
        version = tok.kwargs.get("version", "cosyvoice3")
        if version != "cosyvoice3":
            c.problems.append(f"get_tokenizer.version: expected 'cosyvoice3', found {version!r}")
    sample_rate = top.get("sample_rate", CosyVoice3Hparams.sample_rate)
    if "hift" in nets and nets["hift"] is not None and nets["hift"].sampling_rate != sample_rate:
        c.problems.append(f"hift.sampling_rate {nets['hift'].sampling_rate} != sample_rate {sample_rate}")
    if c.problems or any(v is None for v in nets.values()):
        raise ConfigError(c.problems, str(source))
    return CosyVoice3Hparams(**top, **nets, mel=mel, skip_special_tokens=skip_special)


_CLASSES = {"llm": LLM_CLASS, "flow": FLOW_CLASS, "hift": HIFT_CLASS}


def _llm(kw: dict[str, Any], c: _Collector, qwen2: Qwen2Config | dict[str, Any] | None) -> LLMConfig | None:
    kw = dict(kw)
    backbone = kw.pop("llm", None)
    if c.tagged:
        if backbone is None:
            c.problems.append("llm.llm: missing (the Qwen2Encoder backbone)")
        else:
            c.node(backbone, "llm.llm", "new", QWEN_ENCODER_CLASS)
    values: dict[str, Any] = {}
    if "sampling" in kw:
        s = c.node(kw.pop("sampling"), "llm.sampling", "name", RAS_SAMPLING_FUNC)
        if s is not None:
            values["sampling"] = c.build(SamplingConfig, c.fields(s, "llm.sampling", SamplingConfig, _SAMPLING_ARGS),
                                         "llm.sampling")
    widths: dict[str, Any] = {}
    for k in ("llm_input_size", "llm_output_size"):  # the backbone width, stated twice by upstream
        if k not in kw:
            c.problems.append(f"llm.{k}: missing (required)")
        elif (w := convert_value(kw.pop(k), int, f"llm.{k}", c.problems, strict=True)) is not INVALID:
            widths[k] = w
    values.update(c.fields(kw, "llm", LLMConfig, _LLM_ARGS, required=("speech_token_size",)))
    w_in, w_out = widths.get("llm_input_size"), widths.get("llm_output_size")
    if w_in is not None and w_out is not None and w_in != w_out:
        c.problems.append(f"llm: llm_input_size {w_in} != llm_output_size {w_out}")
    try:
        q = qwen2 if isinstance(qwen2, Qwen2Config) else Qwen2Config.from_hf_dict(qwen2) if qwen2 else Qwen2Config()
    except ConfigError as e:
        c.problems.extend(f"qwen2: {p}" for p in e.problems)
        return None
    if w_in is not None and w_in != q.hidden_size:
        where = "CosyVoice-BlankEN/config.json" if qwen2 is not None else "the released Qwen2 backbone (no config.json given)"
        c.problems.append(f"llm.llm_input_size: {where} hidden_size {q.hidden_size} != yaml llm_input_size {w_in}")
    if "mix_ratio" in values and len(values["mix_ratio"]) != 2:
        c.problems.append(f"llm.mix_ratio: expected two integers, found {list(values['mix_ratio'])}")
    return c.build(LLMConfig, {"qwen2": q, **values}, "llm")


def _flow(kw: dict[str, Any], c: _Collector) -> FlowConfig | None:
    kw = dict(kw)
    pre = kw.pop("pre_lookahead_layer", None)
    dec = kw.pop("decoder", None)
    values = c.fields(kw, "flow", FlowConfig, _FLOW_ARGS,
                      required=("input_size", "output_size", "spk_embed_dim", "vocab_size"))
    pre_kw = c.node(pre, "flow.pre_lookahead_layer", "new", PRE_LOOKAHEAD_CLASS)
    if pre_kw is not None:
        got = c.fields(pre_kw, "flow.pre_lookahead_layer", FlowConfig, _PRE_LOOKAHEAD_ARGS)
        for key, ours in (("in_channels", "input_size"), ("pre_lookahead_len", "pre_lookahead_len")):
            if ours in got and got[ours] != values.get(ours, getattr(FlowConfig, ours)):
                c.problems.append(f"flow.pre_lookahead_layer.{key}: must equal flow.{ours}")
        if "pre_lookahead_channels" in got:
            values["pre_lookahead_channels"] = got["pre_lookahead_channels"]
    dec_kw = c.node(dec, "flow.decoder", "new", CFM_CLASS)
    if dec_kw is not None:
        dk = dict(dec_kw)
        est = dk.pop("estimator", None)
        params = dk.pop("cfm_params", None)
        if isinstance(params, TaggedNode) and params.target == DICTCONFIG_CLASS:
            params = params.kwargs.get("content", params.args[0] if params.args else None)
        if params is None and not c.tagged:
            params = {}
        if not isinstance(params, dict):
            c.problems.append(f"flow.decoder.cfm_params: expected a mapping (or omegaconf.DictConfig), found "
                              f"{_describe(params)}")
            params = {}
        values.update(c.fields(dk, "flow.decoder", FlowConfig, _CFM_ARGS))
        values.update(c.fields(params, "flow.decoder.cfm_params", FlowConfig, _CFM_PARAMS))
        est_kw = c.node(est, "flow.decoder.estimator", "new", DIT_CLASS)
        if est_kw is not None:
            values["dit"] = c.build(DiTConfig, c.fields(est_kw, "flow.decoder.estimator", DiTConfig, _DIT_ARGS,
                                                        required=("dim", "depth", "heads", "dim_head")),
                                    "flow.decoder.estimator")
    return c.build(FlowConfig, values, "flow")


def _hift(kw: dict[str, Any], c: _Collector) -> HiFTConfig | None:
    kw = dict(kw)
    f0 = kw.pop("f0_predictor", None)
    istft = kw.pop("istft_params", None)
    values = c.fields(kw, "hift", HiFTConfig, _HIFT_ARGS, required=("in_channels", "base_channels", "upsample_rates"))
    if istft is not None:
        if not isinstance(istft, dict):
            c.problems.append(f"hift.istft_params: expected a mapping with n_fft and hop_len, found {_describe(istft)}")
        else:
            values.update(c.fields(istft, "hift.istft_params", HiFTConfig, _ISTFT_ARGS))
    f0_kw = c.node(f0, "hift.f0_predictor", "new", F0_CLASS)
    if f0_kw is not None:
        values.update(c.fields(f0_kw, "hift.f0_predictor", HiFTConfig, _F0_ARGS))
    if "f0_in_channels" not in values and "in_channels" in values:
        values["f0_in_channels"] = values["in_channels"]
    return c.build(HiFTConfig, values, "hift")


# --------------------------------------------------------------------------------------------------
# 3. Writing a cosyvoice3.yaml
# --------------------------------------------------------------------------------------------------


def _y(value: Any) -> str:
    """One YAML scalar or flow sequence."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        text = repr(value)
        return text if ("." in text or "e" in text or "n" in text) else text + ".0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_y(v) for v in value) + "]"
    return "'" + str(value).replace("'", "''") + "'"


def _args(cfg: Any, names: dict[str, str], indent: int, refs: dict[str, str | None] | None = None,
          omit_default: tuple[str, ...] = ()) -> list[str]:
    """One ``argument: value`` line per entry of ``names`` (upstream argument → our field), the same map the
    reader uses; ``refs`` gives an argument a ``!ref`` instead, ``omit_default`` leaves it out at its default."""
    refs = refs or {}
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    return [f"{' ' * indent}{theirs}: {refs.get(theirs) or _y(getattr(cfg, ours))}" for theirs, ours in names.items()
            if not (theirs in omit_default and getattr(cfg, ours) == defaults[ours])]


def dump_cosyvoice3_yaml(hp: CosyVoice3Hparams, *, header: str = "") -> str:
    """Render ``hp`` as a HyperPyYAML ``cosyvoice3.yaml`` that upstream CosyVoice can build.

    The layout follows upstream's conventions (top-level shared numbers referenced with ``!ref``,
    ``!new:`` for the three networks, ``!name:`` for the sampler, mel function and tokenizer), so a tiny
    model dir written by cosytune also loads in upstream's ``CosyVoice3``. Each constructor's arguments
    come from the same maps the reader uses (``_FLOW_ARGS`` ...).

    Args:
        hp: the hyper-parameters.
        header: comment lines to put first (without ``#``).

    Returns:
        The YAML text.
    """
    L, F, D, H = hp.llm, hp.flow, hp.flow.dit, hp.hift
    chunk = "!ref <chunk_size> * <token_mel_ratio>" if D.static_chunk_size == hp.chunk_size * hp.token_mel_ratio else None
    lines = [f"# {h}" for h in header.splitlines()] if header else []
    lines += [
        "# Upstream seeds every RNG while building the models; kept so upstream reproduces its fixed noise.",
        "__set_seed1: !apply:random.seed [1986]",
        "__set_seed2: !apply:numpy.random.seed [1986]",
        "__set_seed3: !apply:torch.manual_seed [1986]",
        "__set_seed4: !apply:torch.cuda.manual_seed_all [1986]",
        "",
        "# shared numbers",
        f"sample_rate: {_y(hp.sample_rate)}",
        f"llm_input_size: {_y(L.hidden_size)}",
        f"llm_output_size: {_y(L.hidden_size)}",
        f"spk_embed_dim: {_y(F.spk_embed_dim)}",
        "qwen_pretrain_path: ''",
        *(f"{k}: {_y(getattr(hp, k))}" for k in ("token_frame_rate", "token_mel_ratio", "chunk_size",
                                                  "num_decoding_left_chunks")),
        "",
        f"llm: !new:{LLM_CLASS}",
        "    llm_input_size: !ref <llm_input_size>",
        "    llm_output_size: !ref <llm_output_size>",
        *_args(L, _LLM_ARGS, 4),
        f"    llm: !new:{QWEN_ENCODER_CLASS}",
        "        pretrain_path: !ref <qwen_pretrain_path>",
        f"    sampling: !name:{RAS_SAMPLING_FUNC}",
        *_args(L.sampling, _SAMPLING_ARGS, 8),
        "",
        f"flow: !new:{FLOW_CLASS}",
        *_args(F, _FLOW_ARGS, 4, {"spk_embed_dim": "!ref <spk_embed_dim>", "input_frame_rate": "!ref <token_frame_rate>",
                                  "token_mel_ratio": "!ref <token_mel_ratio>"}),
        f"    pre_lookahead_layer: !new:{PRE_LOOKAHEAD_CLASS}",
        *_args(F, _PRE_LOOKAHEAD_ARGS, 8),
        f"    decoder: !new:{CFM_CLASS}",
        *_args(F, _CFM_ARGS, 8),
        f"        cfm_params: !new:{DICTCONFIG_CLASS}",
        "            content:",
        *_args(F, _CFM_PARAMS, 16),
        f"        estimator: !new:{DIT_CLASS}",
        *_args(D, _DIT_ARGS, 12, {"static_chunk_size": chunk, "num_decoding_left_chunks": "!ref <num_decoding_left_chunks>"},
               omit_default=("dropout", "long_skip_connection")),
        "",
        f"hift: !new:{HIFT_CLASS}",
        *_args(H, _HIFT_ARGS, 4, {"sampling_rate": "!ref <sample_rate>"}),
        "    istft_params:",
        *_args(H, _ISTFT_ARGS, 8),
        f"    f0_predictor: !new:{F0_CLASS}",
        *_args(H, _F0_ARGS, 8),
        "",
        "# front end",
        f"feat_extractor: !name:{MEL_FUNC}",
        *_args(hp.mel, _MEL_ARGS, 4, {"sampling_rate": "!ref <sample_rate>"}),
        f"get_tokenizer: !name:{TOKENIZER_FUNC}",
        "    token_path: !ref <qwen_pretrain_path>",
        f"    skip_special_tokens: {_y(hp.skip_special_tokens)}",
        "    version: cosyvoice3",
        "allowed_special: 'all'",
        "",
    ]
    return "\n".join(lines)
