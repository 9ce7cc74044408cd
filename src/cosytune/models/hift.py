"""CosyVoice 3 HiFT vocoder: causal NSF source + HiFiGAN-style upsampler + iSTFT head (mel → 24 kHz wav).

Reference (facts only, no code taken): ``FunAudioLLM/CosyVoice`` ``cosyvoice/hifigan/generator.py``
(``CausalHiFTGenerator``, ``SineGen2``, ``SourceModuleHnNSF``, ``ResBlock``),
``cosyvoice/hifigan/f0_predictor.py`` (``CausalConvRNNF0Predictor``),
``cosyvoice/transformer/convolution.py`` (causal convs) and ``cosyvoice/transformer/activation.py``
(``Snake``); see ``docs/upstream-spec.md`` §4.

Shape legend
    B   batch
    T   mel frames (50 Hz); T' = frames that get audio (T, or T-3 for a non-final chunk)
    L   source samples = T' · S, with S = prod(upsample_rates) · istft_hop_len (480 for the real model)
    H   sinusoids = nb_harmonics + 1 (9)
    F   iSTFT frames = L / hop + 1
    C   channels (base_channels / 2**(i+1) at upsampling stage i)

Data path of :meth:`HiFTGenerator.inference` (``speech_feat`` (B, 80, T) float32):

1. ``f0_predictor`` (computed in float64, like upstream at inference): causal conv stack with 3 frames of
   look-ahead → ``|Linear|`` → f0 in Hz (B, T').
2. ``m_source``: f0 → nearest ×S → H harmonics → per-frame phase (fp32 ``((cumsum·2)·π)·S``), held
   constant within each frame (the causal "nearest phase" quirk) → ``0.1·sin`` on voiced samples plus
   *fixed* uniform noise → ``tanh(Linear(H→1))`` → source (B, 1, L).
3. STFT of the source (n_fft 16, hop 4, periodic Hann, centred) → (B, 18, F) real ‖ imag.
4. ``conv_pre`` (4 frames look-ahead) → 3 × [leaky_relu(0.1), nearest-upsample conv, (+1 reflected sample
   at the last stage), + source branch (strided conv + ResBlock), mean of 3 ResBlocks] → leaky_relu(0.01)
   → ``conv_post`` (B, 18, F) → magnitude ``exp`` (clipped at 100) and phase ``sin`` → iSTFT → clamp ±0.99.
   Output: (B, 480·T) samples, or (B, 480·(T-8)) for a non-final chunk.

The vocoder runs in float32 (upstream never halves it either); ``inference`` casts its input to float32.
All items of a batch share the same noise and must have the same length (no padding mask, as upstream).

Public API (constructors do no I/O and draw nothing):

- :class:`HiFTConfig` — frozen dataclass; defaults are the shipped Fun-CosyVoice3-0.5B values
  (:meth:`HiFTConfig.fun_cosyvoice3`); ``cosytune.modeldir.upstream_yaml`` reads upstream's
  ``CausalHiFTGenerator`` / ``CausalConvRNNF0Predictor`` arguments into it.
- :class:`HiFTGenerator` — ``inference(speech_feat, finalize=True) -> HiFTOutput(wav, source, f0)``;
  ``forward(speech_feat, generator=None) -> (wav, f0)`` is the training path (random noise, fp32 f0).
  ``state_dict()`` keys equal upstream ``hift.pt`` keys (weight norm as
  ``*.parametrizations.weight.original0/1``).
- :class:`HiFTStreamState` + :meth:`HiFTGenerator.stream_step` — upstream's CosyVoice 3 streaming
  scheme (re-vocode the accumulated mel, emit only new samples), with the state owned by the caller.
- :class:`FixedNoise` + :meth:`HiFTGenerator.set_fixed_noise` / :meth:`~HiFTGenerator.fixed_noise` —
  the inference noise. :meth:`HiFTGenerator.use_upstream_noise` installs
  :func:`replay_upstream_fixed_noise`, which redraws upstream's construction-time noise bit for bit
  (checked against the golden fixture): use it when loading the released ``hift.pt`` for parity.
- Weight files are read and loaded by ``cosytune.weights.io`` (one loader for all three networks).

Noise (CHECKPOINT-COMPAT): upstream draws its inference noise from the *global* CPU RNG when the module is
built — ``rand_ini = rand(1, 9)`` (column 0 zeroed), ``sine_waves = rand(1, 7_200_000, 9)`` (uniform
[0, 1), not zero-mean), then the ``Linear(9, 1)`` init, then ``uv = rand(1, 7_200_000, 1)`` (a
"noise branch" the generator discards) — so its values depend on every draw made since the CFM
constructor's ``manual_seed(0)``. These tensors are neither buffers nor in ``hift.pt``. We keep the noise
as explicit state on the module: by default it is drawn lazily from ``torch.Generator().manual_seed(
noise_seed)`` (``rand(1, H)`` with column 0 zeroed, then ``rand(1, N, H)``; uniform draws have the prefix
property, so growing N keeps earlier samples), or it is installed with :meth:`set_fixed_noise` (from a
fixture, or from :func:`replay_upstream_fixed_noise`). Which noise is used does not depend on
``module.training``: :meth:`inference` always uses the fixed noise, :meth:`forward` (training) always
draws fresh random noise. (Upstream silently switches to random noise when the module is left in train
mode, which HyperPyYAML construction does.)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

logger = logging.getLogger(__name__)
#: Serialises the f0 predictor's cast-parameter calls (see ``HiFTGenerator._predict_f0``); module-level so the
#: networks stay deep-copyable and picklable.
_F0_CAST_LOCK = threading.Lock()

__all__ = [
    "CausalConv1d",
    "CausalConv1dDownSample",
    "CausalConv1dUpsample",
    "F0Predictor",
    "FixedNoise",
    "HarmonicSource",
    "HiFTConfig",
    "HiFTGenerator",
    "HiFTOutput",
    "HiFTStreamState",
    "ResBlock",
    "Snake",
    "causal_padding",
    "replay_upstream_fixed_noise",
]

# Upstream caps one vocoder call at 300 s because its fixed-noise tensors are that long.
UPSTREAM_NOISE_SECONDS = 300


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HiFTConfig:
    """Hyper-parameters of the causal HiFT vocoder. Defaults = shipped Fun-CosyVoice3-0.5B ``hift``."""

    in_channels: int = 80
    """Mel bins of the input."""
    base_channels: int = 512
    """Channels after ``conv_pre``; halved at each upsampling stage."""
    nb_harmonics: int = 8
    """Overtones above f0; the source has ``nb_harmonics + 1`` sinusoids."""
    sampling_rate: int = 24000
    """Output sample rate in Hz."""
    nsf_alpha: float = 0.1
    """Sine amplitude of the NSF source (upstream ``sine_amp``)."""
    nsf_sigma: float = 0.003
    """Noise amplitude on voiced samples (upstream ``noise_std``)."""
    nsf_voiced_threshold: float = 10.0
    """f0 (Hz) above which a sample counts as voiced."""
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    """Upsampling factor of each stage."""
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    """Kernel of each stage's upsampling conv."""
    istft_n_fft: int = 16
    """n_fft (= window length) of the source STFT and output iSTFT."""
    istft_hop_len: int = 4
    """Hop of the source STFT and output iSTFT."""
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    """Kernels of the parallel ResBlocks averaged at every stage."""
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    """Dilations of each of those ResBlocks."""
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    """Kernel of the source-branch ResBlock of each stage."""
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    """Dilations of the source-branch ResBlock of each stage."""
    lrelu_slope: float = 0.1
    """Leaky-ReLU slope before each upsampling conv (the one before ``conv_post`` is 0.01)."""
    audio_limit: float = 0.99
    """Output clamp."""
    conv_pre_look_right: int = 4
    """Look-ahead frames of ``conv_pre`` (its kernel is ``conv_pre_look_right + 1``)."""
    f0_in_channels: int = 80
    """Input channels of the f0 predictor."""
    f0_cond_channels: int = 512
    """Hidden channels of the f0 predictor."""
    f0_num_class: int = 1
    """Outputs of the f0 classifier (1: f0 in Hz)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        n = len(self.upsample_rates)
        if n == 0:
            problems.append("upsample_rates: expected at least one stage, found none")
        for name in (
            "upsample_kernel_sizes",
            "source_resblock_kernel_sizes",
            "source_resblock_dilation_sizes",
        ):
            if len(getattr(self, name)) != n:
                problems.append(
                    f"{name}: expected {n} entries (one per upsample_rates stage), "
                    f"found {len(getattr(self, name))}"
                )
        if len(self.resblock_dilation_sizes) != len(self.resblock_kernel_sizes):
            problems.append(
                "resblock_dilation_sizes: expected one entry per resblock_kernel_sizes entry, "
                f"found {len(self.resblock_dilation_sizes)} vs {len(self.resblock_kernel_sizes)}"
            )
        if self.base_channels % (2**n) != 0:
            problems.append(f"base_channels: must be divisible by 2**{n}, found {self.base_channels}")
        if self.istft_n_fft % 2 != 0 or self.istft_n_fft <= 0:
            problems.append(f"istft_n_fft: expected a positive even number, found {self.istft_n_fft}")
        if self.f0_in_channels != self.in_channels:
            problems.append(
                f"f0_in_channels: must equal in_channels ({self.in_channels}), found {self.f0_in_channels}"
            )
        if self.f0_num_class != 1:
            problems.append(f"f0_num_class: only 1 (f0 in Hz) is supported, found {self.f0_num_class}")
        if self.conv_pre_look_right < 1:
            problems.append(f"conv_pre_look_right: expected >= 1, found {self.conv_pre_look_right}")
        if any(r < 2 for r in self.upsample_rates):
            problems.append(f"upsample_rates: every rate must be >= 2, found {list(self.upsample_rates)}")
        if problems:
            raise ValueError("; ".join(problems))

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def num_sines(self) -> int:
        """Sinusoids in the source (f0 and its harmonics)."""
        return self.nb_harmonics + 1

    @property
    def upsample_scale(self) -> int:
        """Output samples per mel frame (480 for the real model)."""
        return math.prod(self.upsample_rates) * self.istft_hop_len

    @property
    def f0_look_right(self) -> int:
        """Look-ahead frames of the f0 predictor (its first conv has kernel 4, right-padded)."""
        return causal_padding(4, 1)

    @property
    def chunk_trim_frames(self) -> int:
        """Mel frames a non-final chunk call returns no audio for (3 + 4 + 1 = 8 for the real model)."""
        return self.f0_look_right + self.conv_pre_look_right + 1

    def stage_channels(self) -> list[int]:
        """Channels after each upsampling stage."""
        return [self.base_channels // 2 ** (i + 1) for i in range(len(self.upsample_rates))]

    # Constructors --------------------------------------------------------------------------------
    @classmethod
    def fun_cosyvoice3(cls) -> HiFTConfig:
        """The shipped Fun-CosyVoice3-0.5B(-2512) vocoder (spec §4.1)."""
        return cls()

    @classmethod
    def tiny(cls) -> HiFTConfig:
        """Same architecture with narrow channels (64 base, 32 in the f0 predictor): for tests and demos."""
        return cls(base_channels=64, f0_cond_channels=32)


# --------------------------------------------------------------------------------------------------
# Causal convolutions and activations (spec §4.2)
# --------------------------------------------------------------------------------------------------


def causal_padding(kernel_size: int, dilation: int) -> int:
    """Frames of padding a causal conv needs: (k-1)·d for odd k, k-1 for even k (upstream's formula)."""
    return ((kernel_size * dilation - dilation) // 2) * 2 + (kernel_size + 1) % 2


class CausalConv1d(nn.Conv1d):
    """Stride-1 conv padded on one side only, so output length = input length.

    ``side='left'``: zeros (or ``cache``) go before the input — a causal conv. ``side='right'``: they go
    after it — a conv with ``causal_padding`` frames of look-ahead, where a non-final chunk passes the
    real look-ahead frames as ``cache``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, side: str = "left"
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=dilation)
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', found {side!r}")
        self.side = side
        self.causal_padding = causal_padding(kernel_size, dilation)

    def forward(self, x: Tensor, cache: Tensor | None = None) -> Tensor:
        """Args: x (B, C_in, T); cache (B, C_in, causal_padding) or None for zeros. Returns (B, C_out, T)."""
        if cache is None:
            pad = (self.causal_padding, 0) if self.side == "left" else (0, self.causal_padding)
            x = F.pad(x, pad)
        else:
            if cache.shape[2] != self.causal_padding:
                raise ValueError(f"cache must have {self.causal_padding} frames, found {cache.shape[2]}")
            x = torch.cat([cache, x] if self.side == "left" else [x, cache], dim=2)
        return super().forward(x)


class CausalConv1dDownSample(nn.Conv1d):
    """Strided conv with ``stride - 1`` zeros on the left (kernel a multiple of the stride)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        self.causal_padding = stride - 1

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, C_in, T). Returns (B, C_out, floor((T - 1) / stride) + 1)."""
        return super().forward(F.pad(x, (self.causal_padding, 0)))


class CausalConv1dUpsample(nn.Conv1d):
    """Nearest-neighbour ×stride, then a causal stride-1 conv (a plain Conv1d weight, not a transpose)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=0)
        self.stride_up = stride
        self.causal_padding = kernel_size - 1

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, C_in, T). Returns (B, C_out, T·stride)."""
        x = F.interpolate(x, scale_factor=float(self.stride_up), mode="nearest")
        return super().forward(F.pad(x, (self.causal_padding, 0)))


class Snake(nn.Module):
    """Snake activation ``x + sin²(α·x) / (α + 1e-9)`` with a per-channel linear-scale α (init 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, C, T). Returns (B, C, T)."""
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Causal HiFiGAN residual block: per dilation d, ``x += conv2(snake2(conv1_d(snake1(x))))``."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(CausalConv1d(channels, channels, kernel_size, dilation=d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(CausalConv1d(channels, channels, kernel_size, dilation=1)) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, C, T). Returns (B, C, T)."""
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


# --------------------------------------------------------------------------------------------------
# F0 predictor and NSF source (spec §4.3 steps 1-2)
# --------------------------------------------------------------------------------------------------


class F0Predictor(nn.Module):
    """Causal conv f0 predictor: 5 weight-normed convs with ELU, then ``|Linear(C→1)|``.

    The first conv (kernel 4) looks 3 frames ahead. Keys: ``condnet.{0,2,4,6,8}`` (odd indices are the
    parameter-free ELUs, kept so the indices match ``hift.pt``) and ``classifier``.
    """

    def __init__(self, in_channels: int, cond_channels: int, num_class: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            conv = CausalConv1d(
                in_channels if i == 0 else cond_channels,
                cond_channels,
                kernel_size=4 if i == 0 else 3,
                side="right" if i == 0 else "left",
            )
            layers += [weight_norm(conv), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    @property
    def look_right(self) -> int:
        """Look-ahead frames (3)."""
        return self.condnet[0].causal_padding

    def forward(self, mel: Tensor, finalize: bool = True) -> Tensor:
        """Predict f0 in Hz.

        Args:
            mel: (B, C_in, T), in the dtype of the parameters.
            finalize: False for a non-final streaming chunk: the last ``look_right`` frames are used as
                look-ahead instead of zeros and get no f0.

        Returns:
            f0 (B, T) if ``finalize`` else (B, T - look_right), non-negative.
        """
        if finalize:
            x = self.condnet[0](mel)
        else:
            k = self.look_right
            x = self.condnet[0](mel[:, :, :-k], mel[:, :, -k:])
        for layer in self.condnet[1:]:
            x = layer(x)
        return self.classifier(x.transpose(1, 2)).squeeze(-1).abs()


@dataclass
class FixedNoise:
    """The inference noise of the NSF source (fp32, CPU; not part of the state dict).

    Attributes:
        rand_ini: (1, H) initial phase offsets, column 0 zero. Added to sample 0 of the per-sample phase
            increments, which upstream's linear ↓S never reads (for S >= 3), so it cannot change the
            output; kept for fidelity and for :func:`replay_upstream_fixed_noise`.
        sine_noise: (1, N, H) uniform [0, 1) noise; sample ``n`` of a call uses ``sine_noise[:, n]``.
        seed: the seed it was drawn from, or None when installed from elsewhere (then it cannot grow).
    """

    rand_ini: Tensor
    sine_noise: Tensor
    seed: int | None = None
    _on_device: dict[str, Tensor] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def num_samples(self) -> int:
        """Samples of noise available (the longest source one call can use)."""
        return int(self.sine_noise.shape[1])

    def on(self, device: torch.device | str) -> Tensor:
        """``sine_noise`` on ``device``, copied once and kept (so GPU calls do not re-upload it)."""
        device = torch.device(device)
        if device.type in ("cpu", "meta"):
            return self.sine_noise
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = self.sine_noise.to(device)
        return self._on_device[key]

    @classmethod
    def draw(cls, num_sines: int, num_samples: int, seed: int) -> FixedNoise:
        """Draw ``rand(1, H)`` (column 0 zeroed) then ``rand(1, N, H)`` from ``Generator().manual_seed(seed)``."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        rand_ini = torch.rand(1, num_sines, generator=g)
        rand_ini[:, 0] = 0
        sine_noise = torch.rand(1, num_samples, num_sines, generator=g)
        return cls(rand_ini=rand_ini, sine_noise=sine_noise, seed=seed)


class HarmonicSource(nn.Module):
    """Causal harmonic-plus-noise NSF source (upstream ``SourceModuleHnNSF`` + ``SineGen2(causal=True)``).

    Only ``l_linear`` (H → 1) has weights. The noise is passed in by the caller (see :class:`FixedNoise`).
    """

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.sampling_rate = config.sampling_rate
        self.upsample_scale = config.upsample_scale
        self.sine_amp = config.nsf_alpha
        self.noise_std = config.nsf_sigma
        self.voiced_threshold = config.nsf_voiced_threshold
        self.num_sines = config.num_sines
        self.l_linear = nn.Linear(self.num_sines, 1)

    def sine_waves(
        self, f0: Tensor, noise: Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Harmonic sines on voiced samples plus noise, before the merge.

        Args:
            f0: (B, T') float32 f0 in Hz per frame.
            noise: (1 or B, ≥L, H) uniform noise to scale (the fixed inference noise), or None to draw
                Gaussian noise (training).
            generator: RNG for the training path (random initial phase is irrelevant, see FixedNoise).

        Returns:
            ``(sine_waves (B, L, H), uv (B, L, 1))``, float32.
        """
        scale = self.upsample_scale
        harmonics = torch.arange(1, self.num_sines + 1, dtype=f0.dtype, device=f0.device)
        # Per-frame phase increment (cycles/sample). Upstream computes it per *sample* on the ×S nearest-
        # upsampled f0, adds rand_ini at sample 0 and linearly resamples ↓S; that reads samples
        # S·j + (S-1)/2 and its neighbour, both inside frame j, with weights summing to 1 exactly, so it
        # returns the frame's own value bit for bit (test_hift checks this) and never reads sample 0.
        rad = torch.remainder(f0[:, :, None] * harmonics / self.sampling_rate, 1.0)  # (B, T', H)
        # CHECKPOINT-COMPAT: exact fp32 op order ((cumsum·2)·π)·S. The ·S must be a separate rounding step
        # (folding it into the constant changes bits; ·2·π vs ·2π does not, ×2 being exact). The phase
        # reaches 1e5 rad on long inputs, where one ulp is already ~0.01 rad.
        phase = torch.cumsum(rad, dim=1) * 2 * math.pi
        phase = phase.transpose(1, 2) * scale  # (B, H, T')
        # CHECKPOINT-COMPAT: the causal SineGen upsamples the phase by *nearest* neighbour, so it is constant
        # within each frame (the non-causal CosyVoice 2 vocoder interpolates linearly).
        phase = F.interpolate(phase, scale_factor=float(scale), mode="nearest").transpose(1, 2)  # (B, L, H)
        sines = torch.sin(phase) * self.sine_amp

        f0_up = F.interpolate(f0[:, None], scale_factor=float(scale), mode="nearest").transpose(
            1, 2
        )  # (B, L, 1)
        uv = (f0_up > self.voiced_threshold).to(torch.float32)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        length = sines.shape[1]
        if noise is None:
            device = generator.device if generator is not None else sines.device
            eps = torch.randn(sines.shape, generator=generator, dtype=sines.dtype, device=device)
            n = noise_amp * eps.to(sines.device)
        else:
            if noise.shape[1] < length:
                raise ValueError(f"fixed noise has {noise.shape[1]} samples, the source needs {length}")
            n = noise_amp * noise[:, :length].to(device=sines.device, dtype=sines.dtype)
        return sines * uv + n, uv

    def forward(self, f0: Tensor, noise: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
        """Merged excitation.

        Args:
            f0: (B, T') float32 f0 in Hz.
            noise: see :meth:`sine_waves`.
            generator: see :meth:`sine_waves`.

        Returns:
            source (B, 1, L) in [-1, 1].
        """
        with torch.no_grad():  # upstream builds the sines without gradient; only l_linear trains
            waves, _ = self.sine_waves(f0, noise, generator)
        return torch.tanh(self.l_linear(waves)).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


def istft(spec: Tensor, n_fft: int, hop: int, window: Tensor) -> Tensor:
    """``torch.istft(spec, n_fft, hop, n_fft, window)`` (centred, one-sided, not normalised), sync-free.

    Inverse real FFT per frame, windowed overlap-add, division by the summed squared window, centre
    trim: the same steps as ``torch.istft``, without its host-side check of the window envelope, so
    the vocoder can be captured in a CUDA graph. The Hann window at hop n_fft/4 never has a vanishing
    envelope inside the kept range.

    Args:
        spec: (B, n_fft/2 + 1, F) complex.
        window: (n_fft,) real, on spec's device.

    Returns:
        (B, hop·(F - 1)) real.
    """
    frames = torch.fft.irfft(spec, n=n_fft, dim=1) * window[None, :, None]  # (B, n_fft, F)
    n_frames = frames.shape[2]
    total = n_fft + hop * (n_frames - 1)

    def overlap_add(x: Tensor) -> Tensor:
        return F.fold(x, output_size=(1, total), kernel_size=(1, n_fft), stride=(1, hop)).reshape(x.shape[0], total)

    envelope = overlap_add((window * window)[None, :, None].expand(1, n_fft, n_frames))
    start, end = n_fft // 2, total - n_fft // 2
    return overlap_add(frames)[:, start:end] / envelope[:, start:end]


class HiFTOutput(NamedTuple):
    """Result of :meth:`HiFTGenerator.inference`."""

    wav: Tensor
    """(B, N) float32 in [-audio_limit, audio_limit]; N = S·T, or S·(T - 8) for a non-final chunk."""
    source: Tensor
    """(B, 1, L) float32 NSF excitation."""
    f0: Tensor
    """(B, T') f0 in Hz as the predictor computed it (float64 by default)."""


@dataclass
class HiFTStreamState:
    """Per-request streaming state, owned by the caller (upstream keeps it in a uuid-keyed dict).

    Attributes:
        mel: (B, 80, T) every mel frame received so far, or None before the first chunk.
        emitted_samples: samples already returned to the caller.
        finished: True after the ``finalize=True`` step.
    """

    mel: Tensor | None = None
    emitted_samples: int = 0
    finished: bool = False


class HiFTGenerator(nn.Module):
    """Causal HiFT vocoder (upstream ``CausalHiFTGenerator``); see the module docstring.

    Args:
        config: sizes; :meth:`HiFTConfig.fun_cosyvoice3` for the real model.
        noise_seed: seed of the lazily drawn fixed inference noise (ignored once
            :meth:`set_fixed_noise` installs other noise).
        f0_dtype: dtype the f0 predictor runs in at inference. float64 (upstream) by default: the f0
            feeds a phase accumulator, where fp32 rounding differences grow with length.
    """

    def __init__(
        self, config: HiFTConfig, *, noise_seed: int = 0, f0_dtype: torch.dtype = torch.float64
    ) -> None:
        super().__init__()
        self.config = config
        self.noise_seed = noise_seed
        self.f0_dtype = f0_dtype
        self._noise: FixedNoise | None = None
        c = config
        channels = c.stage_channels()
        n_bins = c.istft_n_fft + 2  # real ‖ imag of n_fft/2 + 1 bins

        self.m_source = HarmonicSource(c)
        self.conv_pre = weight_norm(
            CausalConv1d(c.in_channels, c.base_channels, c.conv_pre_look_right + 1, side="right")
        )
        self.ups = nn.ModuleList(
            weight_norm(CausalConv1dUpsample(c.base_channels // 2**i, channels[i], k, u))
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes))
        )
        # The source STFT runs at S / hop frames per mel frame; stage i runs at prod(rates[:i+1]), so the
        # source is downsampled by the product of the remaining rates (×2 kernel), or not at all at the end.
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (k, d) in enumerate(zip(c.source_resblock_kernel_sizes, c.source_resblock_dilation_sizes)):
            down = math.prod(c.upsample_rates[i + 1 :])
            if down == 1:
                self.source_downs.append(CausalConv1d(n_bins, channels[i], 1))
            else:
                self.source_downs.append(CausalConv1dDownSample(n_bins, channels[i], 2 * down, down))
            self.source_resblocks.append(ResBlock(channels[i], k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(ch, k, d)
            for ch in channels
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)
        )
        self.conv_post = weight_norm(CausalConv1d(channels[-1], n_bins, 7))
        # Registered last so state_dict() lists keys in hift.pt's order.
        self.f0_predictor = F0Predictor(c.f0_in_channels, c.f0_cond_channels, c.f0_num_class)

    # Noise ---------------------------------------------------------------------------------------
    def set_fixed_noise(self, sine_noise: Tensor, rand_ini: Tensor | None = None) -> None:
        """Install the fixed inference noise (e.g. a golden fixture's, or :func:`replay_upstream_fixed_noise`).

        Args:
            sine_noise: (1, N, H) uniform noise; calls may use at most N source samples.
            rand_ini: (1, H) initial phase offsets (no effect on the output, see :class:`FixedNoise`).

        Raises:
            ValueError: on a shape that does not match the config.
        """
        h = self.config.num_sines
        if sine_noise.dim() != 3 or sine_noise.shape[0] != 1 or sine_noise.shape[2] != h:
            raise ValueError(f"sine_noise: expected shape (1, N, {h}), found {tuple(sine_noise.shape)}")
        if rand_ini is None:
            rand_ini = torch.zeros(1, h)
        if tuple(rand_ini.shape) != (1, h):
            raise ValueError(f"rand_ini: expected shape (1, {h}), found {tuple(rand_ini.shape)}")
        self._noise = FixedNoise(
            rand_ini.detach().to("cpu", torch.float32),
            sine_noise.detach().to("cpu", torch.float32),
            seed=None,
        )

    def use_upstream_noise(self, **flow_sizes: Any) -> None:
        """Install the noise upstream draws when it builds ``cosyvoice3.yaml`` (bit-exact upstream parity).

        Costs about 260 MB of CPU memory for 300 s of noise, like upstream, and caps one call at 300 s.

        Args:
            **flow_sizes: passed to :func:`replay_upstream_fixed_noise` (``flow_vocab_size``,
                ``flow_output_size``, ``flow_spk_embed_dim``, ``cfm_noise_shape``, ``num_samples``).
        """
        noise = replay_upstream_fixed_noise(self.config, **flow_sizes)
        self.set_fixed_noise(noise.sine_noise, noise.rand_ini)

    def fixed_noise(self, num_samples: int) -> FixedNoise:
        """The fixed noise, drawn from ``noise_seed`` (or grown) on first need.

        Args:
            num_samples: source samples the caller needs.

        Returns:
            The :class:`FixedNoise` holding at least ``num_samples`` samples.

        Raises:
            ValueError: if installed noise is shorter than ``num_samples`` (upstream's cap is 300 s).
        """
        noise = self._noise
        if noise is None or noise.num_samples < num_samples:
            if noise is not None and noise.seed is None:
                sr = self.config.sampling_rate
                raise ValueError(
                    f"the installed fixed noise covers {noise.num_samples} samples "
                    f"({noise.num_samples / sr:.1f} s) but this call needs {num_samples} "
                    f"({num_samples / sr:.1f} s); vocode shorter pieces or install longer noise"
                )
            # Grow in whole 30 s blocks so a stream of growing calls does not redraw every time.
            block = 30 * self.config.sampling_rate
            n = max(block, -(-num_samples // block) * block)
            self._noise = noise = FixedNoise.draw(self.config.num_sines, n, self.noise_seed)
        return noise

    # Helpers -------------------------------------------------------------------------------------
    def _window(self, device: torch.device) -> Tensor:
        # Periodic Hann (scipy get_window('hann', n, fftbins=True)) = torch.hann_window(periodic=True).
        # Computed in float64 and rounded once, as scipy does.
        # Kept per device: a CPU->GPU copy per call would also make the call impossible to graph-capture.
        cache = self.__dict__.setdefault("_windows", {})
        key = str(device)
        if key not in cache:
            with torch.inference_mode(False):  # a normal tensor: training forwards use it too
                cache[key] = torch.hann_window(self.config.istft_n_fft, periodic=True, dtype=torch.float64).to(
                    device, torch.float32
                )
        return cache[key]

    def _predict_f0(self, mel: Tensor, finalize: bool) -> Tensor:
        """f0 predictor in ``self.f0_dtype`` without changing the module's own parameters."""
        dtype = self.f0_dtype
        # functional_call swaps the module's parameters in place for the call, so concurrent callers (threads
        # sharing this vocoder) must not overlap here, the dtype check included: one would run with (or
        # judge by) the other's swapped-in tensors.
        with _F0_CAST_LOCK:
            params = dict(self.f0_predictor.named_parameters())
            if all(p.dtype == dtype for p in params.values()):
                return self.f0_predictor(mel.to(dtype), finalize=finalize)
            # Upstream casts the whole f0 predictor to float64 in place (which then breaks its training
            # forward); we cast a functional copy of g, v and bias per call instead.
            cast = {k: p.to(dtype) for k, p in params.items()}
            return torch.func.functional_call(self.f0_predictor, cast, (mel.to(dtype),), {"finalize": finalize})

    def decode(self, mel: Tensor, source: Tensor, finalize: bool = True) -> Tensor:
        """Mel + source → waveform.

        Args:
            mel: (B, 80, T') mel frames that get audio (plus ``conv_pre_look_right`` look-ahead frames
                at the end when ``finalize`` is False).
            source: (B, 1, L) NSF excitation for those frames (L = S·T').
            finalize: False for a non-final streaming chunk.

        Returns:
            wav (B, S·T'), or (B, S·(T' - conv_pre_look_right - 1)) when not finalizing.
        """
        c = self.config
        n_fft, hop = c.istft_n_fft, c.istft_hop_len
        window = self._window(source.device)
        spec = torch.view_as_real(
            torch.stft(source.squeeze(1), n_fft, hop, n_fft, window=window, return_complex=True)
        )  # (B, n_fft/2+1, F, 2)
        real, imag = spec[..., 0], spec[..., 1]
        if finalize:
            x = self.conv_pre(mel)
        else:
            look = c.conv_pre_look_right
            x = self.conv_pre(mel[:, :, :-look], mel[:, :, -look:])
            # The look-ahead frames get no audio, so drop their STFT frames too.
            drop = math.prod(c.upsample_rates) * look
            real, imag = real[:, :, :-drop], imag[:, :, :-drop]
        s_stft = torch.cat([real, imag], dim=1)  # (B, n_fft + 2, F)

        n_kernels = len(c.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c.lrelu_slope))
            if i == len(self.ups) - 1:
                # One reflected sample in front makes S/hop·T'+1 frames, the length of the centred STFT.
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * n_kernels](x)
            for j in range(1, n_kernels):
                xs = xs + self.resblocks[i * n_kernels + j](x)
            x = xs / n_kernels
        # CHECKPOINT-COMPAT: this leaky_relu uses PyTorch's default slope 0.01, not lrelu_slope.
        x = self.conv_post(F.leaky_relu(x))  # (B, n_fft + 2, F)
        half = n_fft // 2 + 1
        magnitude = torch.clamp(torch.exp(x[:, :half]), max=1e2)
        phase = torch.sin(x[:, half:])  # upstream's sin of the predicted phase; kept for parity
        wav = istft(torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase)), n_fft, hop, window)
        if not finalize:
            wav = wav[:, : -c.upsample_scale]
        return torch.clamp(wav, -c.audio_limit, c.audio_limit)

    # Entry points --------------------------------------------------------------------------------
    @torch.inference_mode()
    def inference(self, speech_feat: Tensor, finalize: bool = True) -> HiFTOutput:
        """Vocode mel frames with the fixed noise (deterministic; independent of ``self.training``).

        Args:
            speech_feat: (B, 80, T) float32 log-mel (the flow's output).
            finalize: True for a complete utterance (or the last streaming call). False for a non-final
                chunk: the last 3 frames are only f0 look-ahead, the 4 before them only conv_pre
                look-ahead, and one more frame of audio is held back, so S·(T - 8) samples come out;
                they equal the start of what ``finalize=True`` would give on a longer input.

        Returns:
            :class:`HiFTOutput` ``(wav, source, f0)``.

        Raises:
            ValueError: on a wrong input shape, too few frames for a non-final chunk, or input longer
                than installed fixed noise.
        """
        c = self.config
        if speech_feat.dim() != 3 or speech_feat.shape[1] != c.in_channels:
            raise ValueError(
                f"speech_feat: expected (B, {c.in_channels}, T), found {tuple(speech_feat.shape)}"
            )
        if not finalize and speech_feat.shape[2] <= c.chunk_trim_frames:
            raise ValueError(
                f"a non-final chunk needs more than {c.chunk_trim_frames} mel frames, "
                f"found {speech_feat.shape[2]}"
            )
        speech_feat = speech_feat.float()
        with parametrize.cached():
            f0 = self._predict_f0(speech_feat, finalize)  # (B, T')
            f0_32 = f0.to(speech_feat.dtype)
            noise = self.fixed_noise(f0.shape[1] * c.upsample_scale)
            source = self.m_source(f0_32, noise.on(f0_32.device))  # (B, 1, L)
            mel = speech_feat if finalize else speech_feat[:, :, : -self.f0_predictor.look_right]
            wav = self.decode(mel, source, finalize=finalize)
        return HiFTOutput(wav=wav, source=source, f0=f0)

    def forward(self, speech_feat: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Training forward: fp32 f0, *random* Gaussian source noise, ``finalize=True``.

        Args:
            speech_feat: (B, 80, T) float32 log-mel.
            generator: optional RNG for the source noise (CPU generator, or one on the input's device).

        Returns:
            ``(wav (B, S·T), f0 (B, T))``.
        """
        f0 = self.f0_predictor(speech_feat, finalize=True)
        source = self.m_source(f0, None, generator)
        return self.decode(speech_feat, source, finalize=True), f0

    @torch.inference_mode()
    def stream_step(self, state: HiFTStreamState, mel_chunk: Tensor, finalize: bool) -> Tensor:
        """Feed the next mel frames of a stream and get the newly available samples.

        Upstream's CosyVoice 3 scheme: append to the accumulated mel, vocode all of it (causality makes
        earlier samples unchanged) and return what was not emitted before. Cost grows quadratically
        with the utterance, exactly as upstream.

        Args:
            state: the request's :class:`HiFTStreamState` (updated in place).
            mel_chunk: (B, 80, t) new mel frames (t may be 0 on the final call).
            finalize: True on the last call of the stream.

        Returns:
            (B, n) new samples (n may be 0 while too few frames have arrived).

        Raises:
            ValueError: if the stream was already finalized.
        """
        if state.finished:
            raise ValueError("this HiFT stream was already finalized; start a new HiFTStreamState")
        state.mel = mel_chunk if state.mel is None else torch.cat([state.mel, mel_chunk], dim=2)
        if not finalize and state.mel.shape[2] <= self.config.chunk_trim_frames:
            return state.mel.new_zeros(state.mel.shape[0], 0)
        wav = self.inference(state.mel, finalize=finalize).wav
        new = wav[:, state.emitted_samples :]
        state.emitted_samples += new.shape[1]
        state.finished = finalize
        return new


# --------------------------------------------------------------------------------------------------
# Upstream noise replay and checkpoint helpers
# --------------------------------------------------------------------------------------------------


def _replay_conv_init(shape: Sequence[int], g: torch.Generator) -> None:
    # PyTorch's default Conv/Linear reset_parameters: kaiming_uniform_(a=√5) on the weight, then a bias
    # uniform in ±1/√fan_in. Only the number and kind of draws matter here.
    w = torch.empty(*shape)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
    fan_in = math.prod(shape[1:])
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    torch.empty(shape[0]).uniform_(-bound, bound, generator=g)


def replay_upstream_fixed_noise(
    config: HiFTConfig,
    *,
    flow_vocab_size: int = 6561,
    flow_output_size: int = 80,
    flow_spk_embed_dim: int = 192,
    cfm_noise_shape: Sequence[int] = (1, 80, 15000),
    num_samples: int | None = None,
) -> FixedNoise:
    """Redraw the noise upstream gets when it builds the whole ``cosyvoice3.yaml`` (spec §4.4).

    Upstream's ``CausalConditionalCFM`` constructor calls ``torch.manual_seed(0)`` and then the
    following draw from the global CPU RNG, in order: the CFM noise ``randn(cfm_noise_shape)``; the
    flow's ``Embedding(vocab, out)`` (normal) and ``Linear(spk_embed_dim, out)`` inits; the f0
    predictor's five conv inits and its ``Linear(C, 1)``; then ``rand_ini = rand(1, H)`` and
    ``sine_waves = rand(1, 300·sr, H)``. We replay that sequence on a private generator.

    Args:
        config: the vocoder config (f0 predictor widths matter).
        flow_vocab_size: flow token vocabulary (6561).
        flow_output_size: mel bins of the flow (80).
        flow_spk_embed_dim: speaker-embedding size of the flow (192).
        cfm_noise_shape: shape of the CFM's fixed noise.
        num_samples: noise length; upstream's is ``300 · sampling_rate``.

    Returns:
        The :class:`FixedNoise` (``seed`` None: it cannot be grown).
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    torch.randn(*cfm_noise_shape, generator=g)
    torch.empty(flow_vocab_size, flow_output_size).normal_(generator=g)
    _replay_conv_init((flow_output_size, flow_spk_embed_dim), g)
    c = config
    for i in range(5):
        _replay_conv_init(
            (c.f0_cond_channels, c.f0_in_channels if i == 0 else c.f0_cond_channels, 4 if i == 0 else 3), g
        )
    _replay_conv_init((c.f0_num_class, c.f0_cond_channels), g)
    rand_ini = torch.rand(1, c.num_sines, generator=g)
    rand_ini[:, 0] = 0
    n = num_samples if num_samples is not None else UPSTREAM_NOISE_SECONDS * c.sampling_rate
    sine_noise = torch.rand(1, n, c.num_sines, generator=g)
    return FixedNoise(rand_ini=rand_ini, sine_noise=sine_noise, seed=None)
