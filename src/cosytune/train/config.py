"""Typed training config, with speaker-SFT presets for the LLM and the flow.

Values follow upstream's CosyVoice 3 SFT recipe (upstream-spec §7.4–7.5): Adam lr 1e-5, constant
schedule, grad clip 5, gradient accumulation 2, dynamic batches of 2000 mel frames, bf16 autocast,
nothing frozen, the speaker-mean embedding for speaker SFT. Presets are YAML files shipped in
``cosytune/config/presets``; every field can be overridden with ``key=value`` on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Literal

from cosytune.config.loading import load_config, merge_dicts, read_yaml, set_dotted

REFERENCE_FRAMES = 4000
"""The recipe's global batch in mel frames (1 GPU × accum_grad 2 × 2000), the base of ``optim.lr_scaling``."""


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings."""

    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    fused: bool | None = None
    """Use the fused CUDA kernel (None: on whenever training runs on CUDA)."""
    lr_scaling: Literal["none", "sqrt", "linear"] = "none"
    """How ``lr`` follows the global batch, i.e. world size × accum_grad × data.max_frames_in_batch frames,
    against the recipe's 1 GPU × 2 × 2000 = :data:`REFERENCE_FRAMES`: ``none`` keeps ``lr`` whatever the batch
    (upstream's choice; fine for lr 1e-5 speaker SFT), ``sqrt`` multiplies it by sqrt(global / 4000) (the rule
    for Adam when the batch grows), ``linear`` by global / 4000. Set once when a run starts (logged); a resumed
    run keeps the learning rate it was started with, even on another number of GPUs."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, found {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must have 2 values, found {self.betas}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Learning-rate schedule: constant (upstream's SFT choice) or linear warmup then constant."""

    name: Literal["constant", "warmup", "constantlr", "warmuplr"] = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"scheduler.warmup_steps must be >= 0, found {self.warmup_steps}")


@dataclass(frozen=True)
class DataConfig:
    """Data pipeline: filters, dynamic batching and loading."""

    max_frames_in_batch: int = 2000
    """Frame budget of a dynamic batch: longest 50 Hz mel length × batch size ≤ this. It is per GPU
    (per rank): each rank packs its own batches, so one optimiser step sees world size × accum_grad ×
    this budget. Raise it with the GPU's memory (an 80 GB card holds several times the recipe's 2000)
    rather than lowering accum_grad on small data: bigger batches keep a GPU busy, more ranks of small
    batches leave it launch-bound."""
    min_duration_s: float = 1.0
    max_duration_s: float = 60.0
    min_text_tokens: int = 1
    max_text_tokens: int = 200
    min_tokens_per_frame: float = 0.0005
    max_tokens_per_frame: float = 1.0
    use_spk_embedding: bool = True
    """Condition on the speaker-mean embedding (speaker SFT) instead of each utterance's own."""
    num_workers: int = 0
    """Data-loading worker processes (0: load in the training process)."""
    prefetch: int = 2
    """Batches prefetched per worker."""
    pin_memory: bool = False
    """Pin host memory for faster GPU copies."""

    def __post_init__(self) -> None:
        if self.max_frames_in_batch < 50:
            raise ValueError(f"data.max_frames_in_batch must be >= 50 (1 s), found {self.max_frames_in_batch}")
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError("data.min_duration_s must be smaller than data.max_duration_s")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, found {self.num_workers}")


@dataclass(frozen=True)
class DdpConfig:
    """Multi-GPU (torchrun, DistributedDataParallel) settings. None of them changes the result, except
    ``grad_compression``; they only apply when more than one process trains."""

    find_unused_parameters: bool | None = None
    """Search each backward for parameters that got no gradient. None: off for the models whose every
    parameter gets a gradient on every step (the LLM and the flow, checked by the tests), which lets the
    all-reduce of gradients overlap the backward pass."""
    static_graph: bool | None = None
    """Tell DDP the graph is the same on every step. None: on when it is valid (accum_grad 1 and no
    torch.compile; DDP refuses a static graph whose first backward runs under no_sync)."""
    bucket_cap_mb: float = 25.0
    """Size of the gradient buckets all-reduced while the backward pass goes on (torch's default 25)."""
    gradient_as_bucket_view: bool = True
    """Gradients live in the all-reduce buckets (one copy less per step, less memory)."""
    grad_compression: Literal["none", "bf16"] = "none"
    """bf16: gradients are rounded to bf16 for the all-reduce (half the traffic; NCCL only, ignored on
    gloo/CPU). Results then differ from one-GPU runs by that rounding."""

    def __post_init__(self) -> None:
        if self.bucket_cap_mb <= 0:
            raise ValueError(f"ddp.bucket_cap_mb must be > 0, found {self.bucket_cap_mb}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (saved as train_config.yaml in the run dir)."""

    model: Literal["llm", "flow"] = "llm"
    max_epoch: int = 10
    max_steps: int = 0
    """Stop after this many optimiser steps (0: no limit)."""
    accum_grad: int = 2
    grad_clip: float = 5.0
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    """auto: bf16 on GPUs that support it, fp16 with a grad scaler on older GPUs, fp32 on CPU."""
    seed: int = 1986
    """Seed of torch, numpy and Python randomness and of the batch order (with the epoch)."""
    log_interval: int = 10
    save_per_step: int = -1
    """Also checkpoint (after a CV pass) every N optimiser steps; -1: only at epoch ends."""
    keep_best: int = 5
    """Keep only the K checkpoints with the lowest CV loss, plus the newest (0: keep all). 5 matches
    ``cosytune average --num 5 --val_best``. Only the newest checkpoint keeps its resume state."""
    early_stop_patience: int = 5
    """Stop when the CV loss has not improved for this many epochs (0: never)."""
    early_stop_min_delta: float = 0.0
    tensorboard: bool = True
    compile: bool = False
    """torch.compile the model's training forward (large speed-up on GPUs with big frame budgets)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ddp: DdpConfig = field(default_factory=DdpConfig)

    def __post_init__(self) -> None:
        problems = []
        if self.max_epoch < 1:
            problems.append(f"max_epoch must be >= 1, found {self.max_epoch}")
        if self.accum_grad < 1:
            problems.append(f"accum_grad must be >= 1, found {self.accum_grad}")
        if self.grad_clip <= 0:
            problems.append(f"grad_clip must be > 0, found {self.grad_clip}")
        if self.log_interval < 1:
            problems.append(f"log_interval must be >= 1, found {self.log_interval}")
        if self.keep_best < 0 or self.early_stop_patience < 0 or self.max_steps < 0:
            problems.append("keep_best, early_stop_patience and max_steps must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """The learning rate a fresh run uses on ``world_size`` ranks (``optim.lr_scaling``)."""
    ratio = world_size * cfg.accum_grad * cfg.data.max_frames_in_batch / REFERENCE_FRAMES
    power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[cfg.optim.lr_scaling]
    return cfg.optim.lr * ratio**power


def preset_path(model: str) -> Path:
    """The shipped preset YAML for ``llm`` or ``flow`` speaker SFT."""
    return Path(str(files("cosytune") / "config" / "presets" / f"train_{model}.yaml"))


# Where an upstream recipe (cosyvoice3.yaml) keeps the settings that map onto ours.
_UPSTREAM_KEYS = {
    ("train_conf", "max_epoch"): "max_epoch",
    ("train_conf", "grad_clip"): "grad_clip",
    ("train_conf", "accum_grad"): "accum_grad",
    ("train_conf", "log_interval"): "log_interval",
    ("train_conf", "save_per_step"): "save_per_step",
    ("train_conf", "optim"): "optim.name",
    ("train_conf", "optim_conf", "lr"): "optim.lr",
    ("train_conf", "scheduler"): "scheduler.name",
    ("train_conf", "scheduler_conf", "warmup_steps"): "scheduler.warmup_steps",
    ("batch", "max_frames_in_batch"): "data.max_frames_in_batch",
}


def _from_upstream_recipe(path: Path) -> dict:
    """Read the ``train_conf`` (and batch) values of an upstream HyperPyYAML recipe without executing it."""
    from cosytune.modeldir.upstream_yaml import load_upstream_yaml

    doc = load_upstream_yaml(path)
    out: dict = {}
    for where, ours in _UPSTREAM_KEYS.items():
        value: object = doc
        for key in where:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            set_dotted(out, ours, str(value).lower() if ours.endswith(".name") else value)
    return out


def load_train_config(model: str, config: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Preset for ``model`` ⊕ the given config file ⊕ overrides.

    The config file is either our own plain YAML (keys of :class:`TrainConfig`) or an upstream
    recipe (``cosyvoice3.yaml`` with HyperPyYAML tags), from which only ``train_conf`` values are
    taken.
    """
    base = read_yaml(preset_path(model))
    base["model"] = model
    if config is not None:
        text = Path(config).read_text(encoding="utf-8") if Path(config).is_file() else ""
        if "!new:" in text or "!ref" in text or "!name:" in text or "train_conf:" in text:
            base = merge_dicts(base, _from_upstream_recipe(Path(config)))
            config = None
    return load_config(TrainConfig, config, overrides, base=base)

