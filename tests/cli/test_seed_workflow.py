"""The seed workflow's command lines (its §5–§10), with paths adapted and `cosytune <command>` in
place of its scripts, run unchanged otherwise on the shipped sample and the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import soundfile as sf
import torch

from cosytune.cli.main import main

pytestmark = pytest.mark.slow

SAMPLE = Path(str(files("cosytune") / "assets" / "sample_speaker"))

# An upstream-style recipe (HyperPyYAML) like the seed's configs/cosyvoice3_xuan_sft.yaml: the
# model blocks of the base model's cosyvoice3.yaml plus data-pipeline entries and train_conf.
RECIPE_TAIL = """
__set_seed1: !apply:random.seed [1986]
parquet_opener: !name:cosyvoice.dataset.processor.parquet_opener
tokenize: !name:cosyvoice.dataset.processor.tokenize
    get_tokenizer: !ref <get_tokenizer>
    allowed_special: !ref <allowed_special>
batch: !name:cosyvoice.dataset.processor.batch
    batch_type: 'dynamic'
    max_frames_in_batch: 2000
data_pipeline: [!ref <parquet_opener>, !ref <tokenize>, !ref <batch>]
train_conf:
    optim: adam
    optim_conf:
        lr: 1e-5
    scheduler: constantlr
    scheduler_conf:
        warmup_steps: 2500
    max_epoch: 2
    grad_clip: 5
    accum_grad: 2
    log_interval: 100
    save_per_step: -1
"""


@pytest.fixture(scope="module")
def seed_env(tmp_path_factory, tiny_model_dir):
    from cosytune.modeldir.presets import write_model_dir

    root = tmp_path_factory.mktemp("seed")
    base = write_model_dir(root / "pretrained_models" / "Fun-CosyVoice3-0.5B", preset="tiny", seed=0,
                           tokenizer_from=tiny_model_dir / "CosyVoice-BlankEN")
    (root / "configs").mkdir()
    (root / "configs" / "cosyvoice3_xuan_sft.yaml").write_text(
        (base / "cosyvoice3.yaml").read_text(encoding="utf-8") + RECIPE_TAIL, encoding="utf-8")
    return root, base


def _run(argv: list[str]) -> None:
    assert main(argv) == 0, argv


def test_seed_workflow_end_to_end(seed_env, monkeypatch):
    root, _base = seed_env
    monkeypatch.chdir(root)
    monkeypatch.setenv("COSYVOICE_ORT_FORCE_CPU", "1")
    wav_dir = root / "data" / "dream_wav_24k_trim"
    sft = root / "data" / "dream_sft"
    # §4 (ffmpeg + sox loop) → prepare-audio
    _run(["prepare-audio", "--in_dir", str(SAMPLE / "audio"), "--out_dir", str(wav_dir)])
    # §5 (ASR replaced by the sample's own transcripts; the whisper flags are tested elsewhere)
    _run(["transcribe", "--wav_dir", str(wav_dir), "--out_root", str(sft), "--spk_id", "dream",
          "--transcripts", str(SAMPLE / "transcripts.txt"), "--language", "en", "--max_sec", "30"])
    # §6
    for split in ("train", "dev"):
        _run(["extract-embedding", "--dir", f"data/dream_sft/{split}", "--onnx_path",
              "pretrained_models/Fun-CosyVoice3-0.5B/campplus.onnx"])
    spk2 = torch.load(sft / "train" / "spk2embedding.pt", map_location="cpu")
    assert list(spk2) == ["dream"] and len(next(iter(spk2.values()))) == 192  # the seed's check
    # §7
    _run(["make-parquet", "--num_utts_per_parquet", "10", "--num_processes", "4",
          "--src_dir", "data/dream_sft/train", "--des_dir", "data/dream_sft/train/parquet"])
    _run(["make-parquet", "--num_utts_per_parquet", "10", "--num_processes", "1",
          "--src_dir", "data/dream_sft/dev", "--des_dir", "data/dream_sft/dev/parquet"])
    assert len((sft / "train" / "parquet" / "data.list").read_text().split()) == 3
    # §8.1 / §8.2 under torchrun, exactly the seed's flags
    for kind in ("llm", "flow"):
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                "-m", "cosytune", "train",
                "--train_engine", "torch_ddp", "--config", "configs/cosyvoice3_xuan_sft.yaml",
                "--train_data", "data/dream_sft/train/parquet/data.list",
                "--cv_data", "data/dream_sft/dev/parquet/data.list",
                "--qwen_pretrain_path", "pretrained_models/Fun-CosyVoice3-0.5B/CosyVoice-BlankEN",
                "--onnx_path", "pretrained_models/Fun-CosyVoice3-0.5B", "--model", kind,
                "--checkpoint", f"pretrained_models/Fun-CosyVoice3-0.5B/{kind}.pt",
                "--model_dir", f"exp/dream_sft/{kind}/torch_ddp",
                "--tensorboard_dir", f"tensorboard/dream_sft/{kind}/torch_ddp",
                "--ddp.dist_backend", "nccl", "--num_workers", "2", "--prefetch", "2", "--use_amp"]
        out = subprocess.run(argv, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=600, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        assert (root / f"exp/dream_sft/{kind}/torch_ddp/epoch_1_whole.pt").exists()
        assert any((root / f"tensorboard/dream_sft/{kind}/torch_ddp").iterdir())
    # §9
    _run(["average", "--dst_model", "exp/dream_sft/llm/torch_ddp/llm_avg.pt",
          "--src_path", "exp/dream_sft/llm/torch_ddp", "--num", "3", "--val_best"])
    _run(["average", "--dst_model", "exp/dream_sft/flow/torch_ddp/flow_avg.pt",
          "--src_path", "exp/dream_sft/flow/torch_ddp", "--num", "5", "--val_best"])
    model_dir = "pretrained_models/Fun-CosyVoice3-0.5B-dream-sft"
    _run(["assemble", "--overwrite", "--base_model_dir", "pretrained_models/Fun-CosyVoice3-0.5B",
          "--out_model_dir", model_dir, "--llm_pt", "exp/dream_sft/llm/torch_ddp/llm_avg.pt",
          "--flow_pt", "exp/dream_sft/flow/torch_ddp/flow_avg.pt"])
    _run(["spk2info", "--spk2embedding_pt", "data/dream_sft/train/spk2embedding.pt", "--spk_id", "dream",
          "--out_spk2info_pt", f"{model_dir}/spk2info.pt"])
    # §10
    (root / "out_wav" / "dream_quote").mkdir(parents=True)
    text_file = "out_wav/dream_quote/input.txt"
    (root / text_file).write_text("我喜欢你，无论岁月拿你怎样。我想陪着你，走过花甲、踏过珠黄，到达一如既往。\n",
                                  encoding="utf-8")
    best = "exp/dream_sft/llm/torch_ddp/epoch_1_whole.pt"
    base_flow = "pretrained_models/Fun-CosyVoice3-0.5B/flow.pt"
    prompt = "你太入迷了。<|endofprompt|>"
    sampling = ["--seed", "1986", "--temperature", "1.0", "--top_p", "0.6", "--top_k", "10", "--win_size", "10",
                "--tau_r", "1.0"]
    common = ["infer", "--model_dir", model_dir, "--spk_id", "dream"]
    runs = {
        "10.1": [*common, "--text_file", text_file, "--out_dir", "out_wav/dream_quote", "--speed", "1.0",
                 "--prompt_text", prompt],
        "10.2": [*common, "--text_file", text_file, "--out_dir", "out_wav/dream_quote_bestllm_fixed",
                 "--llm_ckpt", best, "--prompt_text", prompt],
        "10.3": [*common, "--text_file", text_file, "--out_dir", "out_wav/dream_quote_bestllm_baseflow",
                 "--llm_ckpt", best, "--flow_ckpt", base_flow, "--prompt_text", prompt],
        "10.4": [*common, "--text_file", text_file, "--out_dir", "out_wav/10_4", "--llm_ckpt", best,
                 "--flow_ckpt", base_flow, "--prompt_text", prompt, "--speed", "0.95", *sampling],
        "10.5": [*common, "--text_file", text_file, "--out_dir", "out_wav/10_5", "--llm_ckpt", best,
                 "--flow_ckpt", base_flow, "--prompt_text", "你好呀。<|endofprompt|>", "--prompt_strategy",
                 "guide_prefix", "--guide_sep", "。 ", "--speed", "1.02", "--seed", "1986", "--temperature", "1.0",
                 "--top_p", "0.75", "--top_k", "20", "--win_size", "10", "--tau_r", "1.0"],
        "10.6": [*common, "--text", "今天天气很好。", "--out_wav", "out_wav/10_6/line.wav", "--llm_ckpt", best,
                 "--flow_ckpt", base_flow, "--prompt_text", prompt, "--speed", "0.95", *sampling],
    }
    for argv in runs.values():
        _run(argv)
    for d in ("dream_quote", "dream_quote_bestllm_fixed", "dream_quote_bestllm_baseflow", "10_4", "10_5"):
        wavs = sorted((root / "out_wav" / d).glob("*.wav"))
        assert [w.name for w in wavs] == ["chunk_0000.wav"], (d, wavs)  # one run, one segment, one file
        assert sf.info(wavs[0]).samplerate == 24000
    assert (root / "out_wav" / "10_6" / "line.wav").exists()
    run_json = (root / "out_wav" / "10_6" / "run.json").read_text(encoding="utf-8")
    assert "今天天气很好" not in run_json  # --text is never stored
