"""ONNX wrappers on tiny real ONNX models: interfaces, batching/padding, providers, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cosytune.errors import ModelDirError, UsageError
from cosytune.modeldir.onnx_models import (
    FORCE_CPU_ENV,
    CampPlus,
    SpeechTokenizer,
    resolve_onnx_path,
    resolve_providers,
)
from cosytune.modeldir.onnx_tiny import (
    CAMPPLUS_EMBED_DIM,
    TOKENIZER_VOCAB,
    build_tiny_campplus,
    build_tiny_speech_tokenizer,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    build_tiny_campplus(d / "campplus.onnx")
    build_tiny_speech_tokenizer(d / "speech_tokenizer_v3.onnx")
    build_tiny_speech_tokenizer(d / "speech_tokenizer_v3.batch.onnx", batch=True)
    build_tiny_speech_tokenizer(d / "no_mask.batch.onnx", batch=True, use_lengths=False)
    return d


def _feats(rng, n, dim, lo, hi, time_first):
    out = []
    for _ in range(n):
        t = int(rng.integers(lo, hi))
        x = rng.standard_normal((t, dim) if time_first else (dim, t)).astype(np.float32)
        out.append(x)
    return out


def test_tiny_models_have_the_real_interfaces(models):
    import onnx

    cam = onnx.load(str(models / "campplus.onnx"))
    assert [i.name for i in cam.graph.input] == ["input"]
    dims = [d.dim_value or d.dim_param for d in cam.graph.input[0].type.tensor_type.shape.dim]
    assert dims[2] == 80 and isinstance(dims[0], str) and isinstance(dims[1], str)
    assert cam.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    tok = onnx.load(str(models / "speech_tokenizer_v3.onnx"))
    assert [i.name for i in tok.graph.input] == ["feats", "feats_length"]
    assert [o.name for o in tok.graph.output] == ["indices"]
    assert tok.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert tok.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # non-batch file: batch fixed to 1


def test_building_is_deterministic(tmp_path):
    build_tiny_campplus(tmp_path / "a.onnx")
    build_tiny_campplus(tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_campplus_many_equals_single_calls(models):
    rng = np.random.default_rng(0)
    feats = _feats(rng, 7, 80, 20, 90, time_first=True) + [rng.standard_normal((33, 80)).astype(np.float32)] * 2
    cam = CampPlus(models, device="cpu", num_threads=3)
    assert cam.dynamic_batch and cam.device == "cpu"
    many = cam.embed_many(feats)
    single = [CampPlus(models / "campplus.onnx", device="cpu").embed(f) for f in feats]
    assert all(m.shape == (CAMPPLUS_EMBED_DIM,) and m.dtype == np.float32 for m in many)
    for m, s in zip(many, single):
        np.testing.assert_allclose(m, s, rtol=0, atol=1e-5)
    # Zero padding would change stats pooling: padded input must differ (why the wrapper never pads).
    padded = np.concatenate([feats[0], np.zeros((10, 80), np.float32)])
    assert not np.allclose(cam.embed(padded), many[0], atol=1e-4)


def test_campplus_rejects_wrong_feature_shape(models):
    cam = CampPlus(models, device="cpu")
    with pytest.raises(ValueError, match=r"\(T>=1, 80\)"):
        cam.embed(np.zeros((10, 40), np.float32))


@pytest.mark.parametrize("threads", [1, 2])
def test_tokenizer_batched_equals_single(models, threads):
    rng = np.random.default_rng(1)
    feats = _feats(rng, 11, 128, 8, 200, time_first=False)
    single_model = SpeechTokenizer(models, device="cpu")
    assert not single_model.dynamic_batch and single_model.max_batch == 1
    batch_model = SpeechTokenizer(models / "speech_tokenizer_v3.batch.onnx", device="cpu", num_threads=threads,
                                  max_batch=4, max_batch_frames=4 * 150)
    assert batch_model.dynamic_batch
    batched = batch_model.tokenize_many(feats)
    assert batch_model.max_batch == 4, "the batching self-check must pass on a length-aware model"
    single = [single_model.tokenize(f) for f in feats]
    for f, b, s in zip(feats, batched, single):
        assert b.dtype == np.int64 and len(b) == f.shape[1] // 4
        assert np.array_equal(b, s)
        assert b.min() >= 0 and b.max() < TOKENIZER_VOCAB


def test_tokenizer_batches_by_default_only_on_cuda(models):
    tok = SpeechTokenizer(models / "speech_tokenizer_v3.batch.onnx", device="cpu")
    assert tok.dynamic_batch and tok.max_batch == 1  # CPU: threads beat padded batches
    assert SpeechTokenizer(models / "speech_tokenizer_v3.batch.onnx", device="cpu", max_batch=16).max_batch == 16


def test_tokenizer_falls_back_when_padding_changes_tokens(models, caplog):
    rng = np.random.default_rng(2)
    feats = _feats(rng, 6, 128, 40, 200, time_first=False)
    tok = SpeechTokenizer(models / "no_mask.batch.onnx", device="cpu", max_batch=8)
    with caplog.at_level(logging.WARNING):
        out = tok.tokenize_many(feats)
    assert tok.max_batch == 1
    assert sum("different tokens for padded batches" in r.message for r in caplog.records) == 1
    for f, o in zip(feats, out):
        assert np.array_equal(o, tok.tokenize(f))


def test_provider_resolution():
    assert resolve_providers("cpu", env={}).providers == ["CPUExecutionProvider"]
    forced = resolve_providers("cuda", env={FORCE_CPU_ENV: "1"})
    assert forced.providers == ["CPUExecutionProvider"] and forced.cuda_problem is None
    with pytest.raises(UsageError, match="onnx_device"):
        resolve_providers("tpu", env={})
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        auto = resolve_providers("auto", env={})
        assert auto.device == "cpu" and auto.cuda_problem is None  # nothing to warn about
        cuda = resolve_providers("cuda", env={})
        assert cuda.device == "cpu" and "CUDAExecutionProvider" in cuda.cuda_problem
    else:  # a working CUDA provider: heuristic cuDNN search (utterance lengths all differ)
        cuda = resolve_providers("cuda", env={})
        name, options = cuda.providers[0]
        assert name == "CUDAExecutionProvider" and options["cudnn_conv_algo_search"] == "HEURISTIC"


def test_cuda_request_without_cuda_warns_once(models, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine's onnxruntime has a CUDA provider")
    with caplog.at_level(logging.WARNING):
        cam = CampPlus(models, device="cuda", env={})
        cam.embed_many([np.zeros((20, 80), np.float32)] * 3)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "runs on CPU" in warnings[0].message and cam.device == "cpu"


def test_model_path_errors(tmp_path, models):
    assert resolve_onnx_path(models, "campplus.onnx") == models / "campplus.onnx"
    with pytest.raises(ModelDirError, match="has no campplus.onnx"):
        resolve_onnx_path(tmp_path, "campplus.onnx")
    with pytest.raises(ModelDirError, match="does not exist"):
        resolve_onnx_path(tmp_path / "nope.onnx", "campplus.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelDirError, match="cannot load ONNX model"):
        CampPlus(bad, device="cpu")
    with pytest.raises(ModelDirError, match="speech tokenizer"):
        SpeechTokenizer(models / "campplus.onnx", device="cpu")


def test_cuda_provider_problem_names_the_missing_library(tmp_path):
    """A provider library whose dependency is missing (the seed's libcublasLt.so.11) is reported by name."""
    import shutil
    import subprocess

    from cosytune.modeldir.onnx_models import _cuda_provider_problem

    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build a stand-in provider library")
    dep_dir, capi = tmp_path / "dep", tmp_path / "capi"
    dep_dir.mkdir()
    capi.mkdir()
    (tmp_path / "dep.c").write_text("int cublas_stub(void) { return 1; }\n")
    (tmp_path / "prov.c").write_text("int cublas_stub(void);\nint provider(void) { return cublas_stub(); }\n")
    dep = dep_dir / "libcublasLt.so.11"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(dep), str(tmp_path / "dep.c")], check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(capi / "libonnxruntime_providers_cuda.so"),
                    str(tmp_path / "prov.c"), str(dep)], check=True)
    dep.unlink()  # now the provider's dependency is missing, as on the seed machine
    problem = _cuda_provider_problem(capi, available=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert problem is not None and "libcublasLt.so.11" in problem
    assert _cuda_provider_problem(capi, available=["CPUExecutionProvider"]).startswith("this onnxruntime build")
