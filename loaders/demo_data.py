"""The embedded demo set: synthetic Arabic "speech" that a tiny model can really learn.

    python -m loaders.demo_data OUT_DIR [--seed 0] [--train-shards 8] [--val-shards 2]
        [--samples-per-shard 24]

How it is made
--------------
Lexicon. 28 short Modern Standard Arabic words (``LEXICON``): 22 content words (nouns and
verbs) and 6 function words (prepositions and ``ثم``).

Words as sounds. Each word is a chord of three steady sinusoids taken from 15 frequency
slots spaced evenly on the mel scale between 300 and 4500 Hz (``WORD_SLOTS_HZ``; neighbours
are at least 125 Hz apart, three bins of the 400-point FFT, so every slot lands in its own
log-mel bins). The 28 chords come from a packing of 3-slot sets in which any two words
share at most one slot, so no two words look alike in log-mel space. The three partials of
a word have word-specific relative levels (one of six orderings of 1 : 0.65 : 0.4), a second,
weaker cue to the word's identity. Each word lasts 0.16-0.32 s (by emotion) with 15 ms
raised-cosine edges and is followed by a short silence.

Transcript (asr target ``text``). 2-6 words drawn at random (about 30% function words,
at least one content word), joined by single spaces.

Summary (sum target ``summary``). A deterministic function of the transcript: its first
two distinct content words, in order of appearance, joined by a space (one word when the
transcript has only one). Learnable from the words alone.

Dialect (did target ``dialect``). A global spectral property of the whole clip: a pair of
steady tones in a dialect-specific band above the word slots (5.2-7.4 kHz,
``DIALECT_BAND_HZ``), present from the first sample to the last, under speech and silence.

Emotion (ser target ``emotion``). Prosody only: tempo (word and gap length), energy (peak
level, about 4-7 dB between neighbouring emotions; the breath-noise floor between words
follows it) and pitch movement (a rising glide for happy, a falling glide for sad, a 9 Hz
tremolo for angry); see ``EMOTION_PROSODY``. Glides stay within +-4%, well under half the
distance between word slots (15-40%), so words stay recognisable.

Speakers. Eight synthetic speakers, each with a fixed small frequency scale (+-2%) and
level offset (+-1 dB). Every clip gets a white-noise floor (-50 dBFS for neutral) and a
+-1 dB level jitter. Clips last about 0.6-3 s.

Labels and targets. Dialects and emotions are deliberately skewed (``DIALECT_WEIGHTS``:
msa ~60%, nor ~5%; ``EMOTION_WEIGHTS``: neutral ~55%, angry ~6%) so that balancing
matters. Every recording has a dialect and an emotion in its sound, but not every record
carries every target: ``text`` always, ``summary`` in ~50%, ``dialect`` in ~60%,
``emotion`` in ~60% (``TARGET_RATES``). About 5% of records instead name a single task
with an explicit ``task`` field (did or ser), exercising that form of the shard format.

Files. 16 kHz mono PCM16: WAV for most samples, FLAC for every 8th (``FLAC_EVERY``) so both
decode paths are used. Shards ``train-000000.tar`` ... and ``val-000000.tar`` ... hold
``<key>.json`` then ``<key>.wav|flac``; ``shards.json`` indexes them (see
loaders.make_shards) and records the generator settings under ``"demo"``.

Size. The default set (8 train and 2 val shards of 24 samples) is about 10 MB and takes
about a second to make.

Determinism. Every sample draws from its own generator seeded by (seed, split, shard,
position), so the set is byte-for-byte identical for a seed and a smaller set is a prefix
of a larger one. Tar members carry fixed metadata (mtime 0, uid 0). The set is written into
a temporary folder beside OUT_DIR and renamed into place, so a reader (or a second
process generating at the same time) never sees half a set; when OUT_DIR already holds
a complete set made with the same settings nothing is written.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import shutil
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np
import soundfile

from loaders.make_shards import INDEX_FILE, shard_index_entry, shard_name, write_index, write_shard
from loaders.output_folder import output_folder_problem

# Bump when the rendering changes, so an old set on disk is regenerated.
DEMO_VERSION = 1
SAMPLE_RATE = 16_000  # the rate the model's feature extractor expects

CONTENT_WORDS = (
    "كتاب", "بيت", "ماء", "شمس", "قمر", "ولد", "بنت", "باب", "قلم", "نهر", "جبل",
    "بحر", "خبز", "طريق", "سوق", "مدينة", "ذهب", "كتب", "قرأ", "جلس", "أكل", "شرب",
)
FUNCTION_WORDS = ("في", "من", "على", "إلى", "مع", "ثم")
LEXICON = CONTENT_WORDS + FUNCTION_WORDS
FUNCTION_WORD_RATE = 0.3
WORDS_PER_CLIP = (2, 6)
SUMMARY_WORDS = 2

# 15 slots evenly spaced in mel between 300 and 4500 Hz: the closest neighbours (the lowest)
# are 125 Hz apart, three times the 40 Hz bin spacing of the Whisper extractor's 400-point FFT.
WORD_SLOT_COUNT = 15
WORD_SLOT_RANGE_HZ = (300.0, 4500.0)
PARTIAL_LEVELS = (1.0, 0.65, 0.4)
EDGE_SECONDS = 0.015
LEAD_SECONDS = 0.08

DIALECTS = ("egy", "glf", "lev", "msa", "nor")
DIALECT_WEIGHTS = (0.15, 0.08, 0.12, 0.60, 0.05)
# Centre of each dialect's tone pair; the second tone sits DIALECT_PAIR_OFFSET_HZ above.
# 500 Hz apart is 2-3 mel bins at these frequencies.
DIALECT_BAND_HZ = {"egy": 5200.0, "glf": 5700.0, "lev": 6200.0, "msa": 6700.0, "nor": 7200.0}
DIALECT_PAIR_OFFSET_HZ = 200.0
DIALECT_LEVEL = 0.06

EMOTIONS = ("neutral", "happy", "sad", "angry")
EMOTION_WEIGHTS = (0.55, 0.22, 0.17, 0.06)
# word seconds, gap seconds, peak level, glide (relative pitch change over a word), tremolo depth
EMOTION_PROSODY = {
    "neutral": dict(word=0.24, gap=0.06, level=0.22, glide=0.0, tremolo=0.0),
    "happy": dict(word=0.19, gap=0.045, level=0.42, glide=+0.08, tremolo=0.0),
    "sad": dict(word=0.32, gap=0.10, level=0.09, glide=-0.08, tremolo=0.0),
    "angry": dict(word=0.16, gap=0.035, level=0.80, glide=0.0, tremolo=0.6),
}
TREMOLO_HZ = 9.0
NOISE_LEVEL = 0.003  # about -50 dBFS
LEVEL_JITTER_DB = 1.0

SPEAKER_COUNT = 8
SPEAKER_SCALE_RANGE = 0.02
SPEAKER_LEVEL_DB = 1.0

TARGET_RATES = {"summary": 0.5, "dialect": 0.6, "emotion": 0.6}
EXPLICIT_TASK_RATE = 0.05
FLAC_EVERY = 8
SPLITS = ("train", "val")

DEFAULT_TRAIN_SHARDS = 8
DEFAULT_VAL_SHARDS = 2
DEFAULT_SAMPLES_PER_SHARD = 24


def _mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


WORD_SLOTS_HZ = _hz(np.linspace(_mel(WORD_SLOT_RANGE_HZ[0]), _mel(WORD_SLOT_RANGE_HZ[1]), WORD_SLOT_COUNT))


def _word_chords() -> list[tuple[int, int, int]]:
    """3-slot sets, any two sharing at most one slot (greedy packing; 35 exist for 15 slots)."""
    chords: list[tuple[int, int, int]] = []
    for candidate in itertools.combinations(range(WORD_SLOT_COUNT), 3):
        if all(len(set(candidate) & set(chord)) <= 1 for chord in chords):
            chords.append(candidate)
    if len(chords) < len(LEXICON):
        raise RuntimeError(f"only {len(chords)} distinct chords for {len(LEXICON)} words")
    return chords[: len(LEXICON)]


WORD_CHORDS = _word_chords()
_LEVEL_ORDERS = list(itertools.permutations(PARTIAL_LEVELS))
WORD_PARTIAL_ORDERS = [_LEVEL_ORDERS[index % len(_LEVEL_ORDERS)] for index in range(len(LEXICON))]


def summarize(words: list[str]) -> str:
    """The sum target: the first SUMMARY_WORDS distinct content words, in order."""
    picked: list[str] = []
    for word in words:
        if word in CONTENT_WORDS and word not in picked:
            picked.append(word)
    return " ".join(picked[:SUMMARY_WORDS])


def _speaker_traits(seed: int) -> list[tuple[float, float]]:
    rng = np.random.default_rng([seed, 7_777])
    scales = 1.0 + rng.uniform(-SPEAKER_SCALE_RANGE, SPEAKER_SCALE_RANGE, SPEAKER_COUNT)
    levels = 10.0 ** (rng.uniform(-SPEAKER_LEVEL_DB, SPEAKER_LEVEL_DB, SPEAKER_COUNT) / 20.0)
    return list(zip(scales.tolist(), levels.tolist()))


def _render_word(word_index: int, prosody: dict, scale: float) -> np.ndarray:
    count = int(round(prosody["word"] * SAMPLE_RATE))
    position = np.arange(count) / count
    seconds = np.arange(count) / SAMPLE_RATE
    pitch = 1.0 + prosody["glide"] * (position - 0.5)
    signal = np.zeros(count)
    for slot, level in zip(WORD_CHORDS[word_index], WORD_PARTIAL_ORDERS[word_index]):
        phase = 2.0 * np.pi * np.cumsum(WORD_SLOTS_HZ[slot] * scale * pitch) / SAMPLE_RATE
        signal += level * np.sin(phase)
    signal /= sum(PARTIAL_LEVELS)
    if prosody["tremolo"]:
        signal *= 1.0 - prosody["tremolo"] * 0.5 * (1.0 - np.cos(2.0 * np.pi * TREMOLO_HZ * seconds))
    edge = int(EDGE_SECONDS * SAMPLE_RATE)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(edge) / edge)
    signal[:edge] *= ramp
    signal[-edge:] *= ramp[::-1]
    return signal


def render_clip(words: list[str], dialect: str, emotion: str, speaker: int, seed: int,
                rng: np.random.Generator) -> np.ndarray:
    """Float waveform in [-1, 1] at SAMPLE_RATE for one recording."""
    prosody = EMOTION_PROSODY[emotion]
    scale, speaker_level = _speaker_traits(seed)[speaker]
    gap = np.zeros(int(prosody["gap"] * SAMPLE_RATE))
    lead = np.zeros(int(LEAD_SECONDS * SAMPLE_RATE))
    pieces = [lead]
    for number, word in enumerate(words):
        if number:
            pieces.append(gap)
        pieces.append(_render_word(LEXICON.index(word), prosody, scale))
    pieces.append(lead)
    level = prosody["level"] * speaker_level * 10.0 ** (rng.uniform(-LEVEL_JITTER_DB, LEVEL_JITTER_DB) / 20.0)
    speech = np.concatenate(pieces) * level
    seconds = np.arange(len(speech)) / SAMPLE_RATE
    band = DIALECT_BAND_HZ[dialect]
    offsets = rng.uniform(0.0, 2.0 * np.pi, 2)
    dialect_tones = DIALECT_LEVEL * 0.5 * (
        np.sin(2.0 * np.pi * band * seconds + offsets[0])
        + np.sin(2.0 * np.pi * (band + DIALECT_PAIR_OFFSET_HZ) * seconds + offsets[1])
    )
    # Breath noise follows vocal effort, so energy is a cue in the pauses too.
    noise = NOISE_LEVEL * (prosody["level"] / EMOTION_PROSODY["neutral"]["level"]) * rng.standard_normal(len(speech))
    return np.clip(speech + dialect_tones + noise, -1.0, 1.0)


def _pcm16(signal: np.ndarray) -> np.ndarray:
    return np.round(signal * 32767.0).astype("<i2")


def encode_wav(signal: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(_pcm16(signal).tobytes())
    return buffer.getvalue()


def encode_flac(signal: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, _pcm16(signal), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def _draw_words(rng: np.random.Generator) -> list[str]:
    count = int(rng.integers(WORDS_PER_CLIP[0], WORDS_PER_CLIP[1] + 1))
    words = []
    for _ in range(count):
        pool = FUNCTION_WORDS if rng.random() < FUNCTION_WORD_RATE else CONTENT_WORDS
        words.append(pool[int(rng.integers(len(pool)))])
    if not any(word in CONTENT_WORDS for word in words):
        words[int(rng.integers(count))] = CONTENT_WORDS[int(rng.integers(len(CONTENT_WORDS)))]
    return words


def _record(words: list[str], dialect: str, emotion: str, speaker: int, seconds: float,
            rng: np.random.Generator) -> dict:
    """The sample's JSON: which targets it carries is drawn, the sound always has them all."""
    meta = {"text": " ".join(words), "lang": "ar", "speaker": f"spk{speaker:02d}", "duration": round(seconds, 3)}
    draws = rng.random(4)
    if draws[0] < TARGET_RATES["summary"]:
        meta["summary"] = summarize(words)
    if draws[1] < TARGET_RATES["dialect"]:
        meta["dialect"] = dialect
    if draws[2] < TARGET_RATES["emotion"]:
        meta["emotion"] = emotion
    if draws[3] < EXPLICIT_TASK_RATE:
        task = "did" if draws[3] < EXPLICIT_TASK_RATE / 2 else "ser"
        meta["task"] = task
        meta["dialect" if task == "did" else "emotion"] = dialect if task == "did" else emotion
    return meta


def make_sample(seed: int, split: str, shard: int, position: int) -> tuple[str, dict, bytes, str, float]:
    """One demo recording: (key, meta, audio bytes, extension, seconds)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), shard, position])
    words = _draw_words(rng)
    dialect = DIALECTS[int(rng.choice(len(DIALECTS), p=DIALECT_WEIGHTS))]
    emotion = EMOTIONS[int(rng.choice(len(EMOTIONS), p=EMOTION_WEIGHTS))]
    speaker = int(rng.integers(SPEAKER_COUNT))
    signal = render_clip(words, dialect, emotion, speaker, seed, rng)
    seconds = len(signal) / SAMPLE_RATE
    meta = _record(words, dialect, emotion, speaker, seconds, rng)
    key = f"demo-{split}-{shard:04d}-{position:05d}"
    if position % FLAC_EVERY == FLAC_EVERY - 1:
        return key, meta, encode_flac(signal), "flac", seconds
    return key, meta, encode_wav(signal), "wav", seconds


def _settings(seed: int, train_shards: int, val_shards: int, samples_per_shard: int) -> dict:
    return {"generator": "loaders.demo_data", "version": DEMO_VERSION, "seed": seed,
            "train_shards": train_shards, "val_shards": val_shards, "samples_per_shard": samples_per_shard}


def _complete_index(out_dir: Path, settings: dict) -> dict | None:
    """The index of a complete set made with these settings in out_dir, else None."""
    path = out_dir / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(index, dict) or index.get("demo") != settings:
        return None
    expected = {shard_name(split, n) for split, count in (("train", settings["train_shards"]), ("val", settings["val_shards"])) for n in range(count)}
    shards = index.get("shards", {})
    if set(shards) != expected or not all((out_dir / name).is_file() for name in expected):
        return None
    return index


def _generate_into(folder: Path, settings: dict) -> dict:
    entries = {}
    for split, count in (("train", settings["train_shards"]), ("val", settings["val_shards"])):
        for shard in range(count):
            samples = [make_sample(settings["seed"], split, shard, position) for position in range(settings["samples_per_shard"])]
            name = shard_name(split, shard)
            write_shard(folder / name, [(key, meta, audio, ext) for key, meta, audio, ext, _ in samples])
            entries[name] = shard_index_entry([(meta, seconds) for _, meta, _, _, seconds in samples])
    return write_index(folder, entries, extra={"demo": settings})


def _is_demo_only(folder: Path) -> bool:
    """True when a folder holds nothing but demo shards and an index (safe to replace)."""
    for child in folder.iterdir():
        name = child.name
        if not child.is_file():
            return False
        if name != INDEX_FILE and not (name.endswith(".tar") and name.split("-")[0] in SPLITS):
            return False
    return True


_FOREIGN_FOLDER = "{out_dir} holds files that are not a demo set; choose an empty or new folder for the demo data"


def _move_into_place(staging: Path, out_dir: Path, settings: dict) -> None:
    """Rename the finished set onto out_dir; if another process won the race, keep theirs."""
    try:
        os.rename(staging, out_dir)  # replaces out_dir only when it is missing or empty
        return
    except OSError:
        pass
    if _complete_index(out_dir, settings) is not None:
        shutil.rmtree(staging)
        return
    if not _is_demo_only(out_dir):
        shutil.rmtree(staging)
        raise FileExistsError(_FOREIGN_FOLDER.format(out_dir=out_dir))
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, retired / "set")
    os.rename(staging, out_dir)
    shutil.rmtree(retired)


def write_demo_shards(out_dir: str | os.PathLike, seed: int = 0, train_shards: int = DEFAULT_TRAIN_SHARDS,
                      val_shards: int = DEFAULT_VAL_SHARDS,
                      samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD) -> dict:
    """Make the demo set in out_dir (unless a complete one with these settings is there).

    Returns the shards.json content: {"format": 1, "shards": {...}, "demo": settings}.
    """
    if min(train_shards, val_shards, samples_per_shard) < 1:
        raise ValueError("train_shards, val_shards and samples_per_shard must each be at least 1")
    out_dir = Path(out_dir)
    settings = _settings(seed, train_shards, val_shards, samples_per_shard)
    existing = _complete_index(out_dir, settings)
    if existing is not None:
        return existing
    problem = output_folder_problem(out_dir)
    if problem:
        raise ValueError(f"{problem}; choose a folder for the demo data (a new or an empty one)")
    if out_dir.is_dir() and not _is_demo_only(out_dir):
        raise FileExistsError(_FOREIGN_FOLDER.format(out_dir=out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        index = _generate_into(staging, settings)
        os.chmod(staging, 0o755)  # mkdtemp makes 0700; the set should be readable like any folder
        _move_into_place(staging, out_dir, settings)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loaders.demo_data",
                                     description="Write the synthetic, learnable demo shards (see the module docs).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS)
    parser.add_argument("--val-shards", type=int, default=DEFAULT_VAL_SHARDS)
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    args = parser.parse_args(argv)
    try:
        index = write_demo_shards(args.out_dir, args.seed, args.train_shards, args.val_shards, args.samples_per_shard)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, entry in index["shards"].items():
        print(f"{args.out_dir / name}: {entry['samples']} samples, {entry['audio_seconds']:.1f} s, tasks {entry['tasks']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
