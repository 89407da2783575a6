"""Signal stages for pipelines: framing (``window``) and log-mel features (``logmel``), numpy only."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from edgert.backends.base import TensorSpec
from edgert.engine.stages import BuiltinStage, Lookup, StageMismatch, describe, make_spec, need_float

__all__ = ["LOG_FLOOR", "LogMel", "Window", "mel_filterbank"]

#: Added before the log in ``logmel`` so silence gives a finite value.
LOG_FLOOR = 1e-6


@dataclass(frozen=True)
class Window(BuiltinStage):
    """Cut a signal [..., S] into frames [..., F, size] every ``hop`` samples (no padding)."""

    op: ClassVar[str] = "window"
    size: int = 400
    hop: int = 160

    def _frames(self, spec: TensorSpec) -> int | None:
        samples = spec.shape[-1] if spec.shape else None
        if not spec.shape:
            raise StageMismatch("a signal [..., samples]", describe(spec.dtype, spec.shape),
                                "send at least one axis of samples")
        if samples is None:
            return None
        if samples < self.size:
            raise StageMismatch(f"at least {self.size} samples on the last axis",
                                describe(spec.dtype, spec.shape), "send longer signals or use a smaller size")
        return 1 + (samples - self.size) // self.hop

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """[..., S] -> [..., F, size]."""
        frames = self._frames(spec)
        return (make_spec(spec.name, spec.dtype, (*spec.shape[:-1], frames, self.size)),)

    def _framed(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] < self.size:
            raise ValueError(f"a signal of {x.shape[-1]} samples is shorter than one window ({self.size})")
        view = np.lib.stride_tricks.sliding_window_view(x, self.size, axis=-1)
        return view[..., :: self.hop, :]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Frames as a contiguous copy."""
        return (np.ascontiguousarray(self._framed(x)),)


@dataclass(frozen=True)
class LogMel(Window):
    """Log-mel features of a float signal [..., S] -> [..., F, n_mels] (Hann window, |rfft|^2, HTK mels)."""

    op: ClassVar[str] = "logmel"
    sample_rate: int = 16000
    n_mels: int = 40
    fmin: float = 0.0
    fmax: float = 0.0  # 0 = sample_rate / 2

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """Float [..., S] -> float32 [..., F, n_mels]."""
        need_float(self.name, spec)
        frames = self._frames(spec)
        return (make_spec(spec.name, np.float32, (*spec.shape[:-1], frames, self.n_mels)),)

    @cached_property
    def _bank(self) -> tuple[np.ndarray, np.ndarray]:
        return np.hanning(self.size + 1)[:-1], mel_filterbank(
            self.sample_rate, self.size, self.n_mels, self.fmin, self.fmax or self.sample_rate / 2)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Frame, window, power spectrum, mel filterbank, log."""
        hann, bank = self._bank
        power = np.abs(np.fft.rfft(self._framed(x) * hann, axis=-1)) ** 2
        return (np.log(power @ bank.T + LOG_FLOOR).astype(np.float32),)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular HTK-mel filters [n_mels, n_fft // 2 + 1] over the rfft bins."""

    def mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(np.array(fmin)), mel(np.array(fmax)), n_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / np.maximum(centre - lower, 1e-9)
    falling = (upper - bins) / np.maximum(upper - centre, 1e-9)
    return np.maximum(0.0, np.minimum(rising, falling))
