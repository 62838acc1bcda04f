"""loaders/features.py: parity with WhisperFeatureExtractor(feature_size=128) on real Arabic
speech, no truncation (45 s of audio -> 45 s of features)."""
from pathlib import Path

import numpy as np
import pytest
import soundfile

from loaders.audio import decode_audio
from loaders.features import FEATURE_PARITY_ATOL, FRAMES_PER_SECOND, N_MELS, log_mel, reference_log_mel
from loaders.prompts import audio_token_count

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "arabic-speech"


def _real_clips() -> list[Path]:
    clips = sorted(ASSETS.glob("*.flac"))
    if not clips:
        pytest.fail(f"no real Arabic FLAC clips in {ASSETS}; the test assets are part of the repository")
    return clips


def _decoded(path: Path) -> np.ndarray:
    return decode_audio(path.read_bytes(), shard=str(path.parent), key=path.stem)


def test_parity_with_whisper_extractor_on_real_arabic_speech():
    for path in _real_clips():
        wave = _decoded(path)
        ours, reference = log_mel(wave), reference_log_mel(wave)
        assert ours.shape == reference.shape == (N_MELS, wave.size // 160), path.name
        assert ours.dtype == np.float32
        diff = np.abs(ours - reference)
        assert diff.max() <= FEATURE_PARITY_ATOL, f"{path.name}: max |diff| {diff.max():.3g} at {np.unravel_index(diff.argmax(), diff.shape)}"
        assert ours.std() > 0.05  # real speech, not a flat spectrogram


def test_long_clip_is_not_truncated():
    longest = max(_real_clips(), key=lambda p: soundfile.info(str(p)).duration)
    wave = _decoded(longest)
    assert wave.size / 16_000 > 45, "the assets need a clip longer than 45 s"
    clip45 = wave[: 45 * 16_000]
    features = log_mel(clip45)
    assert features.shape == (N_MELS, 45 * FRAMES_PER_SECOND)  # 4500 frames, not 3000
    assert audio_token_count(features.shape[1]) == 45 * 25
    # The extractor agrees once told not to truncate; its default would stop at 30 s.
    reference = reference_log_mel(clip45)
    assert reference.shape == features.shape
    assert np.abs(features - reference).max() <= FEATURE_PARITY_ATOL


def test_rejects_too_short_or_multichannel_input():
    with pytest.raises(ValueError, match="at least 160"):
        log_mel(np.ones(100, dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        log_mel(np.ones((2, 16000), dtype=np.float32))
