"""Sound tokenizer: Cosmos 3's AVAE (48 kHz stereo waveform <-> 64-channel latents at 25 Hz).

* Audio at other rates is resampled in torch with a windowed-sinc polyphase filter (Hann window, 6 zero crossings,
  0.99 roll-off: the usual band-limited design), so no torchaudio is needed. Mono is duplicated to stereo,
  stereo averaged to mono; other channel counts are an error, not a guess.
* The sound latent length follows the video's duration as the reference computes it:
  `ceil(int(num_frames / fps * 48000) / hop)` latent frames (hop 1920 -> 25 Hz).
* `encode` runs one clip at a time: the AVAE peak-normalizes its whole input batch, so batching clips would let
  one clip's loudness change another's latents.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The filter bank holds `new x (orig + 2 * width)` taps; every pair of standard audio rates is far below this.
_MAX_FILTER_TAPS = 2**22


def _sinc_kernels(orig: int, new: int, lowpass_width: int, rolloff: float, dtype, device) -> tuple[Tensor, int]:
    """`[new, 1, K]` polyphase filters for `orig -> new` (both already divided by their gcd), and the half width."""
    cutoff = min(orig, new) * rolloff
    width = math.ceil(lowpass_width * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64, device=device)[None, None] / orig  # [1, 1, K]
    phases = torch.arange(0, -new, -1, dtype=torch.float64, device=device)[:, None, None] / new  # [new, 1, 1]
    t = ((phases + taps) * cutoff).clamp(-lowpass_width, lowpass_width)
    window = torch.cos(t * math.pi / lowpass_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * window * (cutoff / orig)).to(dtype), width


def resample(waveform: Tensor, orig_sample_rate: int, new_sample_rate: int, *, lowpass_width: int = 6,
             rolloff: float = 0.99) -> Tensor:
    """Band-limited resampling of `[..., N]` audio; the output has `ceil(N * new / orig)` samples."""
    for name, rate in (("orig_sample_rate", orig_sample_rate), ("new_sample_rate", new_sample_rate)):
        if not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
            raise ValueError(f"`{name}` must be a positive int, got {rate!r}.")
    if not isinstance(waveform, Tensor) or not waveform.is_floating_point() or waveform.ndim < 1:
        raise ValueError("`waveform` must be a floating tensor [..., samples].")
    if orig_sample_rate == new_sample_rate:
        return waveform
    g = math.gcd(orig_sample_rate, new_sample_rate)
    orig, new = orig_sample_rate // g, new_sample_rate // g
    if new * (orig + 2 * lowpass_width * orig // min(orig, new) + 2) > _MAX_FILTER_TAPS:
        raise ValueError(
            f"Cannot resample {orig_sample_rate} Hz -> {new_sample_rate} Hz: the rates share too few factors "
            f"(reduced ratio {orig}:{new}), the polyphase filter bank would be too large. Resample to a standard "
            "rate (8000, 16000, 22050, 24000, 32000, 44100, 48000, 96000 Hz) first."
        )
    kernels, width = _sinc_kernels(orig, new, lowpass_width, rolloff, waveform.dtype, waveform.device)
    shape, length = waveform.shape[:-1], waveform.shape[-1]
    x = F.pad(waveform.reshape(-1, 1, length), (width, width + orig))
    y = F.conv1d(x, kernels, stride=orig)  # [N, new, frames]: phase-major
    y = y.transpose(1, 2).reshape(x.shape[0], -1)  # interleave the phases into one signal
    return y[:, : math.ceil(new * length / orig)].reshape(*shape, -1)


def convert_channels(waveform: Tensor, channels: int) -> Tensor:
    """`[C, N]` -> `[channels, N]`: mono is duplicated, stereo averaged to mono; anything else is an error."""
    if waveform.ndim != 2:
        raise ValueError(f"`waveform` must be [channels, samples], got shape {tuple(waveform.shape)}.")
    have = waveform.shape[0]
    if have == channels:
        return waveform
    if have == 1:
        return waveform.expand(channels, -1).clone()
    if channels == 1:
        return waveform.mean(0, keepdim=True)
    raise ValueError(f"Cannot convert {have}-channel audio to {channels} channels (only mono <-> multi-channel).")


class Cosmos3SoundTokenizer:
    """Waveforms <-> sound latents with a diffusers `Cosmos3AVAEAudioTokenizer`."""

    def __init__(self, avae):
        self.avae = avae
        self.sample_rate = int(avae.config.sampling_rate)
        self.hop_size = int(avae._hop_size)
        self.channels = int(avae.config.dec_out_channels)
        self.latent_channels = int(avae.config.vocoder_input_dim)

    @property
    def latent_rate(self) -> float:
        """Latent frames per second (25 for 48 kHz and hop 1920)."""
        return self.sample_rate / self.hop_size

    def num_samples(self, num_frames: int, fps: float) -> int:
        """Waveform samples covering a `num_frames`-frame video at `fps` (the reference's rounding: down)."""
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"`num_frames` must be a positive int, got {num_frames!r}.")
        if not fps > 0:
            raise ValueError(f"`fps` must be > 0, got {fps!r}.")
        return int(num_frames / fps * self.sample_rate)

    def latent_length(self, num_frames: int, fps: float) -> int:
        """Sound latent frames aligned with a `num_frames`-frame video at `fps`."""
        return -(-self.num_samples(num_frames, fps) // self.hop_size)

    def prepare(self, waveform: Tensor, sample_rate: int) -> Tensor:
        """Any-rate, mono or stereo `[C, N]` float audio -> the tokenizer's rate and channel count."""
        if not isinstance(waveform, Tensor) or waveform.ndim != 2 or not waveform.is_floating_point():
            got = tuple(waveform.shape) if isinstance(waveform, Tensor) else type(waveform).__name__
            raise ValueError(f"`waveform` must be a float tensor [channels, samples], got {got}.")
        return convert_channels(resample(waveform, sample_rate, self.sample_rate), self.channels)

    @torch.no_grad()
    def encode(
        self,
        waveform: Tensor,
        sample_rate: int,
        *,
        num_frames: int | None = None,
        fps: float | None = None,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """`[C, N]` audio at `sample_rate` -> latents `[latent_channels, T]` (posterior mode unless `sample`).

        With `num_frames` and `fps`, the audio is cut or zero-padded to the video's duration first, so the latents
        have exactly `latent_length(num_frames, fps)` frames.
        """
        audio = self.prepare(waveform, sample_rate)
        if (num_frames is None) != (fps is None):
            raise ValueError("Give both `num_frames` and `fps` (to align with a video), or neither.")
        if num_frames is not None:
            n = self.num_samples(num_frames, fps)
            audio = F.pad(audio[:, :n], (0, max(0, n - audio.shape[1])))
        dtype = next(self.avae.parameters()).dtype
        # force_pad: pad to the hop in training mode too, so the length never depends on the module's mode.
        posterior = self.avae.encode(audio[None].to(dtype), force_pad=True).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        return latents[0].to(waveform.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents `[latent_channels, T]` (or `[B, latent_channels, T]`) -> waveform `[channels, T * hop]`, [-1, 1]."""
        if not isinstance(latents, Tensor) or latents.ndim not in (2, 3) or latents.shape[-2] != self.latent_channels:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            c = self.latent_channels
            raise ValueError(f"`latents` must be [{c}, T] or [B, {c}, T], got {got}.")
        dtype = next(self.avae.parameters()).dtype
        return self.avae.decode(latents.to(dtype)).to(latents.dtype)
