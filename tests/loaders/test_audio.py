"""loaders/audio.py: decode from bytes, downmix, resample to 16 kHz; errors name shard and key."""
import io

import numpy as np
import pytest
import soundfile
import soxr

from loaders.audio import TARGET_SAMPLE_RATE, AudioError, decode_audio, probe_duration


def _encode(signal: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, signal, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _tone(seconds: float, rate: int, hz: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    left = 0.3 * np.sin(2 * np.pi * hz * t)
    if channels == 1:
        return left.astype(np.float32)
    right = 0.2 * np.sin(2 * np.pi * (hz * 1.5) * t)
    return np.stack([left, right], axis=1).astype(np.float32)


def test_stereo_44k_wav_is_downmixed_and_resampled():
    stereo = _tone(1.3, 44_100, 440.0, channels=2)
    data = _encode(stereo, 44_100, "WAV", "FLOAT")
    out = decode_audio(data, shard="s.tar", key="k")
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(out.size - round(1.3 * TARGET_SAMPLE_RATE)) <= 1
    expected = soxr.resample(stereo.mean(axis=1), 44_100, TARGET_SAMPLE_RATE, quality="HQ")
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_16k_flac_passes_through_unresampled():
    mono = _tone(0.7, 16_000, 300.0)
    out = decode_audio(_encode(mono, 16_000, "FLAC", "PCM_16"))
    np.testing.assert_allclose(out, mono, atol=1.0 / 32768 + 1e-7)  # PCM16 quantisation


def test_ogg_vorbis_decodes():
    mono = _tone(1.0, 22_050, 500.0)
    out = decode_audio(_encode(mono, 22_050, "OGG", "VORBIS"))
    assert abs(out.size - TARGET_SAMPLE_RATE) <= 2
    assert np.abs(out).max() > 0.1  # a real tone came out, not silence


def test_probe_duration_reads_the_header():
    data = _encode(_tone(2.5, 22_050, 200.0), 22_050, "FLAC")
    assert probe_duration(data) == pytest.approx(2.5, abs=1e-4)


def test_undecodable_bytes_name_shard_and_key():
    with pytest.raises(AudioError) as err:
        decode_audio(b"RIFF....not really audio" * 10, shard="data/train-000003.tar", key="utt-17")
    assert err.value.reason == "undecodable_audio"
    assert "data/train-000003.tar" in str(err.value) and "utt-17" in str(err.value)
    with pytest.raises(AudioError):
        probe_duration(b"garbage", shard="s", key="k")


def test_empty_audio_is_its_own_reason():
    data = _encode(np.zeros(0, dtype=np.float32), 16_000, "WAV", "PCM_16")
    with pytest.raises(AudioError) as err:
        decode_audio(data, shard="s.tar", key="empty-1")
    assert err.value.reason == "empty_audio" and "empty-1" in str(err.value)
