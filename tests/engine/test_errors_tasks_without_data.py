"""Tasks that the schedule's stages name but data.train has no example of are never drawn: the
run says so at its start (which tasks, which stages, what to do) instead of training the others
without a word."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from conftest import REPO
from engine.config import load_config
from engine.runner import tasks_without_data_note
from loaders.make_shards import shard_index_entry, write_index, write_shard
from loaders.shards import count_examples_by_shard, sum_counts

SAMPLE_RATE = 16000


def tone_wav(seconds: float, hz: float) -> bytes:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), SAMPLE_RATE, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def asr_only_shards(tmp_path_factory) -> list[str]:
    """Two shards of asr records only, with the shards.json make_shards writes."""
    folder = tmp_path_factory.mktemp("asr_only")
    entries, urls = {}, []
    for s in range(2):
        samples, records = [], []
        for i in range(6):
            meta, seconds = {"text": "كتب الولد"}, 0.3 + 0.05 * i
            samples.append((f"s{s}-{i}", meta, tone_wav(seconds, 220.0 + 60 * i + 30 * s), "wav"))
            records.append((meta, seconds))
        path = folder / f"train-{s:06d}.tar"
        write_shard(path, samples)
        entries[path.name] = shard_index_entry(records)
        urls.append(str(path))
    write_index(folder, entries)
    return urls


def test_the_note_names_the_tasks_the_stages_and_what_to_do(asr_only_shards):
    data_counts = {0: sum_counts(count_examples_by_shard(asr_only_shards).values())}
    schedule = load_config("hybrid", ["max_steps=10"]).schedule.build(10, None)
    note = tasks_without_data_note(schedule, data_counts)
    assert note is not None and "task(s) sum, did, ser" in note and "no examples in data.train" in note
    named = [stage.name for stage in schedule.stages if set(stage.tasks) != {"asr"}]
    assert named and all(f"'{name}'" in note and "trains asr only" in note for name in named)
    first = schedule.stages[0]
    assert set(first.tasks) == {"asr"} and f"'{first.name}' (" not in note   # a stage with all its data is not named
    assert "Add shards with sum, did, ser samples to data.train" in note
    # every task has data: nothing to say
    full = {0: {"tasks": {"asr": 3, "sum": 2, "did": 4, "ser": 1}}}
    assert tasks_without_data_note(schedule, full) is None


def test_a_run_on_asr_only_shards_says_so_at_its_start(asr_only_shards, tmp_path):
    train = "data.train=" + asr_only_shards[0].replace("000000", "{000000..000001}")
    proc = subprocess.run([sys.executable, "engine/train.py", "--recipe", "random", "max_steps=1", train, "data.val=",
                           "metrics.progress_bar=false", f"output_dir={tmp_path / 'run'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next((line for line in proc.stdout.splitlines() if "no examples in data.train" in line), "")
    assert "task(s) sum, did, ser" in line and "trains asr only" in line, proc.stdout[-3000:]
    # said once, before the first step
    assert proc.stdout.count("no examples in data.train") == 1
    assert proc.stdout.index("no examples in data.train") < proc.stdout.index("step 1/1")
