"""Audio bytes from a shard -> mono float32 waveform at 16 kHz.

Decoded with soundfile (libsndfile: wav, flac, ogg/vorbis, opus, mp3 where the library
supports it), downmixed by averaging channels, resampled with soxr. Every error names the
shard and the sample key so a user can find the file.
"""
from __future__ import annotations

import io
import re

import numpy as np
import soundfile
import soxr

# Qwen2.5-Omni's audio encoder (Whisper front end) expects 16 kHz input.
TARGET_SAMPLE_RATE = 16_000


class AudioError(ValueError):
    """A sample's audio cannot be used. ``reason`` is the count key ("undecodable_audio", ...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# libsndfile's messages name the file object it was given ("Error opening <_io.BytesIO object
# at 0x7f...>: ..."), which tells a user nothing: the message names shard and key instead.
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _where(shard: str, key: str) -> str:
    return f"shard {shard}, sample {key!r}"


def _undecodable(shard: str, key: str, exc: Exception) -> AudioError:
    reason = _BUFFER_REPR.sub(f"the audio of {key!r}", str(exc))
    return AudioError("undecodable_audio", f"{_where(shard, key)}: audio cannot be decoded ({reason}); "
                                           "re-encode it as wav/flac/ogg")


def probe_duration(data: bytes, *, shard: str = "?", key: str = "?") -> float:
    """Duration in seconds read from the file header only (no decoding)."""
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception as exc:  # libsndfile raises LibsndfileError/RuntimeError/TypeError
        raise _undecodable(shard, key, exc) from exc
    if info.samplerate <= 0:
        raise AudioError("undecodable_audio", f"{_where(shard, key)}: audio header has sample rate {info.samplerate}")
    return info.frames / info.samplerate


def decode_audio(data: bytes, *, shard: str = "?", key: str = "?") -> np.ndarray:
    """Decode, downmix to mono and resample to 16 kHz. Raises AudioError with shard and key."""
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise _undecodable(shard, key, exc) from exc
    if samples.shape[0] == 0:
        raise AudioError("empty_audio", f"{_where(shard, key)}: audio has no samples; remove it from the shard")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if rate != TARGET_SAMPLE_RATE:
        mono = soxr.resample(mono, rate, TARGET_SAMPLE_RATE, quality="HQ")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if mono.size == 0:
        raise AudioError("empty_audio", f"{_where(shard, key)}: audio is shorter than one sample at 16 kHz")
    return mono
