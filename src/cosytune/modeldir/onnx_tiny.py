"""Tiny stand-ins for ``campplus.onnx`` and ``speech_tokenizer_v3.onnx``, built offline in milliseconds.

The real ONNX files cannot be downloaded here, so tests, the demo and ``init-model`` use these. They
keep the *interface* of the real files (input/output names, ranks, dtypes, which axes are dynamic;
upstream-spec §5.4–5.5) so the real loading, batching and padding code runs unchanged:

``campplus.onnx`` (CAM++ speaker encoder)
    input ``input`` float32 ``(B, T, 80)`` — CMN-normalised Kaldi fbank; output ``output`` float32
    ``(B, 192)``. Upstream feeds it by position (``get_inputs()[0]``); the name ``input`` is the one
    upstream's TensorRT profile uses. The output name is not documented; ``output`` is our choice.
    Tiny network: per-frame ``Linear(80→64) + ReLU``, statistics pooling (mean ‖ std over time),
    ``Linear(128→192)`` — the same "frame encoder + stats pooling + projection" shape as CAM++, so
    padding an utterance with extra frames changes its embedding exactly like in the real model.

``speech_tokenizer_v3.onnx`` (S3 tokenizer v3, 25 Hz FSQ, 6561 codes)
    inputs ``feats`` float32 ``(1, 128, T)`` and ``feats_length`` int32 ``(1,)``; output ``indices``
    int32 ``(1, T // 4)``. With ``batch=True`` it is the ``speech_tokenizer_v3.batch.onnx`` variant
    (dynamic ``B``). Tiny network: subtract the mean over the *valid* frames (so a wrong
    ``feats_length`` changes the tokens, as masking does in the real encoder), average-pool 4 frames,
    project 128→8, quantise each dimension to {−1, 0, 1} with ``round(tanh(·))`` and read the 8 ternary
    digits as an index in ``[0, 3^8) = [0, 6561)`` — FSQ in miniature.

Weights come from a seeded numpy generator, so the files are reproducible byte for byte.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = [
    "CAMPPLUS_EMBED_DIM",
    "CAMPPLUS_FEAT_DIM",
    "TOKENIZER_FEAT_DIM",
    "TOKENIZER_FRAMES_PER_TOKEN",
    "TOKENIZER_VOCAB",
    "build_tiny_campplus",
    "build_tiny_speech_tokenizer",
]

CAMPPLUS_FEAT_DIM = 80
CAMPPLUS_EMBED_DIM = 192
TOKENIZER_FEAT_DIM = 128
TOKENIZER_FRAMES_PER_TOKEN = 4
TOKENIZER_VOCAB = 6561  # 3 ** 8

# ONNX opset / IR version every onnxruntime >= 1.17 loads.
_OPSET = 17
_IR_VERSION = 8


def _save(graph, doc: str, path: str | os.PathLike) -> Path:
    """The model of ``graph`` at our opset and IR version, checked and written atomically."""
    import onnx

    from cosytune.fileio import atomic_path

    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", _OPSET)],
                                   producer_name="cosytune.onnx_tiny")
    model.ir_version = _IR_VERSION
    model.doc_string = doc
    onnx.checker.check_model(model)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path


def build_tiny_campplus(path: str | os.PathLike, *, seed: int = 1234, hidden: int = 64) -> Path:
    """Write a tiny CAM++-interface ONNX model (``input`` (B, T, 80) → ``output`` (B, 192)).

    Args:
        path: where to write the ``.onnx`` file (written atomically).
        seed: numpy seed for the weights.
        hidden: frame-encoder width.

    Returns:
        The written path.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((CAMPPLUS_FEAT_DIM, hidden)) / np.sqrt(CAMPPLUS_FEAT_DIM)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    w2 = (rng.standard_normal((2 * hidden, CAMPPLUS_EMBED_DIM)) / np.sqrt(2 * hidden)).astype(np.float32)
    b2 = (0.1 * rng.standard_normal(CAMPPLUS_EMBED_DIM)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "enc.weight"),
        numpy_helper.from_array(b1, "enc.bias"),
        numpy_helper.from_array(w2, "proj.weight"),
        numpy_helper.from_array(b2, "proj.bias"),
        numpy_helper.from_array(np.array(1e-5, dtype=np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "enc.weight"], ["h0"]),  # (B, T, H)
        helper.make_node("Add", ["h0", "enc.bias"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["mean_k"], axes=[1], keepdims=1),  # (B, 1, H)
        helper.make_node("Sub", ["h", "mean_k"], ["hc"]),
        helper.make_node("Mul", ["hc", "hc"], ["hc2"]),
        helper.make_node("ReduceMean", ["hc2"], ["var"], axes=[1], keepdims=0),  # (B, H)
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("ReduceMean", ["h"], ["mean"], axes=[1], keepdims=0),  # (B, H)
        helper.make_node("Concat", ["mean", "std"], ["stats"], axis=1),  # (B, 2H)
        helper.make_node("MatMul", ["stats", "proj.weight"], ["p0"]),
        helper.make_node("Add", ["p0", "proj.bias"], ["output"]),  # (B, 192)
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_campplus",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "T", CAMPPLUS_FEAT_DIM])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", CAMPPLUS_EMBED_DIM])],
        initializer=inits,
    )
    return _save(graph, "cosytune tiny stand-in for campplus.onnx (random weights; not a speaker model)", path)


def build_tiny_speech_tokenizer(
    path: str | os.PathLike, *, seed: int = 4321, batch: bool = False, scale: float = 6.0, use_lengths: bool = True
) -> Path:
    """Write a tiny speech_tokenizer_v3-interface ONNX model.

    Args:
        path: where to write the ``.onnx`` file (written atomically).
        seed: numpy seed for the weights.
        batch: ``False`` → batch axis fixed to 1, like ``speech_tokenizer_v3.onnx``; ``True`` → dynamic
            batch axis, like ``speech_tokenizer_v3.batch.onnx``.
        scale: projection gain (spreads the codes over the vocabulary).
        use_lengths: ``False`` builds a model that ignores ``feats_length`` (its mean covers the
            padding too), like an export without masking; used to test the batching safeguard.

    Returns:
        The written path.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    proj = (scale * rng.standard_normal((TOKENIZER_FEAT_DIM, 8)) / np.sqrt(TOKENIZER_FEAT_DIM)).astype(np.float32)
    powers = (3.0 ** np.arange(8, dtype=np.float64)).astype(np.float32)[:, None]  # (8, 1)
    c = numpy_helper.from_array
    inits = [
        c(proj, "fsq.proj"),
        c(powers, "fsq.powers"),
        c(np.array([2], dtype=np.int64), "axis2"),
        c(np.array(0, dtype=np.int64), "zero"),
        c(np.array(1, dtype=np.int64), "one"),
        c(np.array(TOKENIZER_FRAMES_PER_TOKEN, dtype=np.int64), "four"),
        c(np.array([0], dtype=np.int64), "zero1"),
        c(np.array([1.0], dtype=np.float32), "onef"),
        c(np.array([1], dtype=np.int64), "ax1"),
        c(np.array([-1], dtype=np.int64), "ax_last"),
        c(np.array([0, TOKENIZER_FEAT_DIM, -1, TOKENIZER_FRAMES_PER_TOKEN], dtype=np.int64), "pool_shape"),
        c(np.array(1.0, dtype=np.float32), "onef0"),
    ]
    nodes = [
        # Whole tokens only: T4 = T // 4 and the first 4 * T4 frames.
        helper.make_node("Shape", ["feats"], ["fshape"]),
        helper.make_node("Gather", ["fshape", "axis2"], ["T1"], axis=0),  # (1,)
        helper.make_node("Div", ["T1", "four"], ["T4"]),
        helper.make_node("Mul", ["T4", "four"], ["Tc"]),
        helper.make_node("Slice", ["feats", "zero1", "Tc", "axis2"], ["x"]),  # (B, 128, Tc)
        # Valid-frame mask from feats_length: (B, Tc).
        helper.make_node("Squeeze", ["Tc", "zero1"], ["Tc0"]),
        helper.make_node("Range", ["zero", "Tc0", "one"], ["t_idx"]),  # (Tc,)
        helper.make_node("Cast", ["feats_length" if use_lengths else "T1"], ["len64"], to=TensorProto.INT64),
        # Only whole tokens count: valid frames = (length // 4) * 4, as for the unpadded call.
        helper.make_node("Div", ["len64", "four"], ["len_tok"]),
        helper.make_node("Mul", ["len_tok", "four"], ["len_whole"]),
        helper.make_node("Unsqueeze", ["len_whole", "ax1"], ["len_col"]),  # (B, 1)
        helper.make_node("Less", ["t_idx", "len_col"], ["mask_b"]),  # (B, Tc)
        helper.make_node("Cast", ["mask_b"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "ax1"], ["mask3"]),  # (B, 1, Tc)
        # Mean over the valid frames only.
        helper.make_node("Mul", ["x", "mask3"], ["xm"]),
        helper.make_node("ReduceSum", ["xm", "ax_last"], ["xsum"], keepdims=1),  # (B, 128, 1)
        helper.make_node("ReduceSum", ["mask3", "ax_last"], ["cnt"], keepdims=1),  # (B, 1, 1)
        helper.make_node("Max", ["cnt", "onef0"], ["cnt1"]),
        helper.make_node("Div", ["xsum", "cnt1"], ["mean"]),
        helper.make_node("Sub", ["x", "mean"], ["xc"]),
        # Average-pool 4 frames per token: (B, 128, T4).
        helper.make_node("Reshape", ["xc", "pool_shape"], ["x4"], allowzero=0),
        helper.make_node("ReduceMean", ["x4"], ["pooled"], axes=[3], keepdims=0),
        helper.make_node("Transpose", ["pooled"], ["pooled_t"], perm=[0, 2, 1]),  # (B, T4, 128)
        helper.make_node("MatMul", ["pooled_t", "fsq.proj"], ["z"]),  # (B, T4, 8)
        helper.make_node("Tanh", ["z"], ["zt"]),
        helper.make_node("Round", ["zt"], ["zr"]),  # {-1, 0, 1}
        helper.make_node("Add", ["zr", "onef"], ["digits"]),  # {0, 1, 2}
        helper.make_node("MatMul", ["digits", "fsq.powers"], ["code_f"]),  # (B, T4, 1)
        helper.make_node("Squeeze", ["code_f", "ax_last"], ["code_sq"]),
        helper.make_node("Cast", ["code_sq"], ["indices"], to=TensorProto.INT32),  # (B, T4)
    ]
    b = "B" if batch else 1
    graph = helper.make_graph(
        nodes,
        "tiny_speech_tokenizer_v3" + ("_batch" if batch else ""),
        [
            helper.make_tensor_value_info("feats", TensorProto.FLOAT, [b, TOKENIZER_FEAT_DIM, "T"]),
            helper.make_tensor_value_info("feats_length", TensorProto.INT32, [b]),
        ],
        [helper.make_tensor_value_info("indices", TensorProto.INT32, [b, "T_tok"])],
        initializer=inits,
    )
    return _save(graph, "cosytune tiny stand-in for speech_tokenizer_v3.onnx (random weights; not a tokenizer)",
                 path)
