"""128-bin log-mel features, exactly as Qwen2.5-Omni's processor computes them.

Qwen2.5-Omni uses transformers' ``WhisperFeatureExtractor(feature_size=128)``. Its math
(``_torch_extract_fbank_features``): a centred 400-point STFT with a periodic Hann window
and hop 160 (100 frames per second at 16 kHz), the last frame dropped (so n samples give
n // 160 frames), power spectrum through the extractor's own Slaney mel filter bank,
``log10(max(mel, 1e-10))``, clamped to (max - 8), then ``(x + 4) / 4``. The maximum is taken
over the clip itself.

We compute exactly that with torch, per clip and without padding, taking the filter bank
from the extractor itself, so nothing is re-derived. Why not call the extractor: per call it
converts, pads and wraps the clip in Python (BatchFeature, attention-mask rescaling), which
costs more than the STFT on short clips; ``profiling/bench_loader.py`` measures the whole
pipeline against the extractor called per sample. ``tests/loaders/test_features.py`` checks
parity with the extractor (truncation=False) on real Arabic recordings within
``FEATURE_PARITY_ATOL``.

No truncation: a 45 s clip gives 4500 frames (the extractor's default would cut at 30 s).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from loaders.audio import TARGET_SAMPLE_RATE

N_MELS = 128  # Qwen2.5-Omni audio encoder: num_mel_bins=128
N_FFT = 400  # Whisper front end: 25 ms window at 16 kHz
HOP_LENGTH = 160  # 10 ms hop -> 100 frames per second
FRAMES_PER_SECOND = TARGET_SAMPLE_RATE // HOP_LENGTH
# Whisper's dynamic-range clamp (log10 units) and affine rescale.
LOG_DYNAMIC_RANGE = 8.0
LOG_OFFSET = 4.0
LOG_FLOOR = 1e-10
# Max |ours - WhisperFeatureExtractor| on real speech. Both run float32 torch.stft; the only
# difference is the order of float32 operations in the mel projection, well under 1e-4 of a
# feature range of about 2.
FEATURE_PARITY_ATOL = 1e-4


@functools.lru_cache(maxsize=1)
def _mel_filters() -> torch.Tensor:
    """[n_freq=201, 128] float32 filter bank, taken from transformers' extractor."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=TARGET_SAMPLE_RATE)
    return torch.from_numpy(np.asarray(extractor.mel_filters, dtype=np.float32))


@functools.lru_cache(maxsize=1)
def _window() -> torch.Tensor:
    return torch.hann_window(N_FFT)


def num_frames(num_samples: int) -> int:
    """Feature frames for a clip of ``num_samples`` at 16 kHz (the last STFT frame is dropped)."""
    return num_samples // HOP_LENGTH


def log_mel(waveform: np.ndarray) -> np.ndarray:
    """[128, n // 160] float32 log-mel of one mono 16 kHz clip, no padding, no truncation."""
    if waveform.ndim != 1:
        raise ValueError(f"log_mel expects a mono waveform [samples], got shape {waveform.shape}")
    if waveform.size < HOP_LENGTH:
        raise ValueError(f"clip has {waveform.size} samples; at least {HOP_LENGTH} (10 ms) are needed for one frame")
    # One clip is a few small ops: on one thread they run 10-30x faster than with intra-op
    # threads that must synchronise on a busy machine (measured on the 2-core CI box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _log_mel_one_thread(waveform)
    finally:
        torch.set_num_threads(threads)


def _log_mel_one_thread(waveform: np.ndarray) -> np.ndarray:
    # Shaped [1, n] like the extractor's batch, so torch runs the same kernels.
    signal = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))[None]
    stft = torch.stft(signal, N_FFT, HOP_LENGTH, window=_window(), return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()
    mel = _mel_filters().T @ power
    logs = torch.clamp(mel, min=LOG_FLOOR).log10()
    logs = torch.maximum(logs, logs.max() - LOG_DYNAMIC_RANGE)
    return ((logs + LOG_OFFSET) / LOG_OFFSET)[0].numpy()


def reference_log_mel(waveform: np.ndarray) -> np.ndarray:
    """The same features from transformers' WhisperFeatureExtractor (used by tests and the baseline)."""
    extractor = _reference_extractor()
    out = extractor(
        waveform, sampling_rate=TARGET_SAMPLE_RATE, truncation=False, padding="longest", return_tensors="np"
    )
    return out["input_features"][0]


@functools.lru_cache(maxsize=1)
def _reference_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=TARGET_SAMPLE_RATE)
