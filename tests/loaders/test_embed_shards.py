"""loaders/embed_shards.py: mean-pooled aligner embeddings of every sample, written beside the
shards with the tiny preset's frozen audio tower, read back by TrainStream's ADS sampler."""
import io
import json
import tarfile

import numpy as np
import pytest
import soundfile

from engine.tokenizer import build_tiny_tokenizer
from loaders.audio import decode_audio
from loaders.config import DataConfig
from loaders.curriculum import ScheduleConfig
from loaders.embed_shards import aligner_embeddings, load_audio_tower, main
from loaders.embeddings import read_embedding_sidecar, sidecar_path
from loaders.features import log_mel
from loaders.pipeline import TrainStream

# Batched (padded, then packed) and one-clip-at-a-time encoder calls do the same float32 math
# in a different order: agreement to 1e-4 relative.
BATCH_TOLERANCE = 1e-4


def wav_bytes(seconds: float, pitch_hz: float) -> bytes:
    t = np.arange(int(seconds * 16_000)) / 16_000
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * pitch_hz * t)).astype(np.float32), 16_000, format="WAV")
    return buffer.getvalue()


def write_shard(path, records) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in records:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed")
    urls = []
    for s in range(2):
        records = []
        for i in range(5):
            meta = {"text": "كتب", "dialect": "egy" if i % 2 else "glf"}
            records += [(f"k{s}-{i}.json", json.dumps(meta).encode()), (f"k{s}-{i}.wav", wav_bytes(0.3 + 0.2 * i, 200 + 300 * i))]
        records += [("broken.json", b'{"text": "x"}'), ("broken.wav", b"RIFF garbage" * 10)]
        urls.append(write_shard(folder / f"train-00000{s}.tar", records))
    return urls


def test_sidecars_hold_the_mean_pooled_aligner_output_of_every_good_sample(shards, capsys):
    assert main([shards[0].replace("000000", "{000000..000001}"), "--preset", "tiny", "--batch", "3",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "10 samples embedded in 2 shard(s), 2 skipped" in out.out
    assert "broken" in out.err and "undecodable_audio" in out.err
    tower = load_audio_tower("", "tiny", __import__("torch").device("cpu"))
    for url in shards:
        table = read_embedding_sidecar(sidecar_path(url))
        assert sorted(table) == sorted(f"k{url[-5]}-{i}" for i in range(5))
        with tarfile.open(url) as tar:
            for key, stored in table.items():
                features = log_mel(decode_audio(tar.extractfile(f"{key}.wav").read()))
                alone = aligner_embeddings(tower, [features])[0]
                # stored as float16: compare at its precision
                np.testing.assert_allclose(stored.astype(np.float32), alone, rtol=2e-3, atol=2e-3)
        vectors = np.stack([table[k] for k in sorted(table)]).astype(np.float32)
        assert vectors.shape[1] == tower.proj.out_features          # the aligner's output size (LLM width)
        assert np.linalg.matrix_rank(vectors - vectors.mean(0)) >= 3  # samples differ, not one constant


def test_batched_and_single_clip_embeddings_agree(shards):
    import torch

    tower = load_audio_tower("", "tiny", torch.device("cpu"))
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((128, n)).astype(np.float32) for n in (37, 250, 101, 9)]
    together = aligner_embeddings(tower, clips)
    for clip, row in zip(clips, together):
        np.testing.assert_allclose(row, aligner_embeddings(tower, [clip])[0], rtol=BATCH_TOLERANCE, atol=BATCH_TOLERANCE)


def test_ads_in_train_stream_reads_the_stored_embeddings(shards):
    main(shards + ["--preset", "tiny", "--device", "cpu"])
    cfg = DataConfig(train=shards, dialects=["egy", "glf"], shuffle_buffer=4, max_tokens_per_batch=1024)
    stream = TrainStream(cfg, build_tiny_tokenizer(), rank=0, world_size=1, grad_accum=2, seed=0, sampler="ads",
                         active_tasks=["asr", "did"],
                         schedule_cfg=ScheduleConfig(ads_pool=8, ads_window=8, ads_max_wait=4, embedding_dim=16))
    stream.next_step()
    counts = stream.counts()
    assert counts["embedding_hit_rate"] == 1.0 and counts["embeddings"]["stored"] == counts["used"] > 0
    stream.close()
