"""What a user reads about bad data: each message says what is wrong with which sample and
what to do; a damaged tar is one error, not two; a bad recording met again is counted but
printed once; with several ranks the warning names the rank."""
import logging
import tarfile

import pytest

from engine.tokenizer import build_tiny_tokenizer
from loaders.audio import AudioError, decode_audio, probe_duration
from loaders.shards import ShardError, check_shards_exist, iter_tar_samples
from loaders.skip_counting import DataError
from loaders.stream import ExampleSource
from test_stream import bad_config, good, sample, wav_bytes, write_shard   # tests/loaders is on sys.path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "loaders" and r.levelno == logging.WARNING]


def pull_epochs(source: ExampleSource, task: str, epochs: int) -> list:
    examples = []
    while not examples or examples[-1].epoch < epochs:
        examples.append(source.pull(task))
    return examples[:-1]


def test_no_target_says_which_field_is_missing_or_empty(tmp_path, tokenizer, caplog):
    shard = write_shard(tmp_path / "t.tar", good("ok", 1)
                        + sample("did-without-dialect", {"task": "did", "text": "كتب"}, wav_bytes(0.3, 2))
                        + sample("empty-text", {"text": ""}, wav_bytes(0.3, 3)))
    source = ExampleSource([[shard]], bad_config(), tokenizer, {}, slot=0, num_slots=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="loaders"):
        pull_epochs(source, "asr", 1)
    messages = "\n".join(warnings_of(caplog))
    assert "sample 'did-without-dialect': task did needs a non-empty 'dialect'" in messages, messages
    assert "sample 'empty-text': 'text' is empty" in messages, messages
    assert "has none of" not in messages
    assert source.counts()["skipped"] == {"no_target": 2}


def test_a_folder_given_as_shards_is_named_a_folder(tmp_path):
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(ShardError, match=r"emptydir is a folder, not a shard \(it holds no \.tar files\).*"
                                         r"emptydir/train-\{000000\.\.000007\}\.tar"):
        check_shards_exist([str(empty)], "data.train")
    full = tmp_path / "shards"
    full.mkdir()
    for i in range(3):
        write_shard(full / f"train-00000{i}.tar", good(f"k{i}", i))
    with pytest.raises(ShardError, match=r"it holds 3 tar file\(s\): train-000000\.tar \.\.\. train-000002\.tar"):
        check_shards_exist([str(full) + "/"], "data.val")


def truncated_in_audio(tmp_path) -> str:
    """A shard of one whole sample and one whose audio member is cut short (JSON first)."""
    path = write_shard(tmp_path / "cut.tar", good("whole", 1) + good("cut", 2) + good("never-read", 3))
    with tarfile.open(path) as tar:
        cut_at = tar.getmember("cut.wav").offset_data + 100
    with open(path, "r+b") as f:
        f.truncate(cut_at)
    return path


def test_a_truncated_audio_member_is_one_corrupt_tar_naming_the_sample(tmp_path):
    path = truncated_in_audio(tmp_path)
    samples = list(iter_tar_samples(path))
    assert [s.key for s in samples] == ["whole", "cut"]
    assert samples[0].error is None
    reason, message = samples[1].error
    assert reason == "corrupt_tar"
    assert "'cut.wav' is truncated" in message and "sample 'cut'" in message and "rest of the shard" in message
    assert "rewrite the shard" in message and "count" not in message   # the skip warning adds how it is counted
    # Resuming past the damage still yields the one error, at the same index.
    assert [(s.index, s.error[0]) for s in iter_tar_samples(path, skip=1)] == [(1, "corrupt_tar")]


def test_a_truncated_shard_counts_one_skip_per_epoch_not_two(tmp_path, tokenizer, caplog):
    source = ExampleSource([[truncated_in_audio(tmp_path)]], bad_config(), tokenizer, {}, slot=0, num_slots=1, seed=0)
    assert [e.key for e in pull_epochs(source, "asr", 1)] == ["whole"]
    assert source.counts()["skipped"] == {"corrupt_tar": 1}
    [warning] = [w for w in warnings_of(caplog) if "corrupt_tar" in w]
    assert "counted as one corrupt_tar" in warning and "does not tell how many samples" in warning


def test_a_truncated_shard_with_on_error_raise_says_what_to_do_not_how_it_is_counted(tmp_path, tokenizer):
    source = ExampleSource([[truncated_in_audio(tmp_path)]], bad_config(on_error="raise"), tokenizer, {}, slot=0,
                           num_slots=1, seed=0)
    with pytest.raises(DataError) as err:
        pull_epochs(source, "asr", 1)
    assert "sample 'cut'" in str(err.value) and "rewrite the shard" in str(err.value) and "count" not in str(err.value)


def test_undecodable_audio_names_shard_and_key_not_a_buffer_object():
    for read in (probe_duration, decode_audio):
        with pytest.raises(AudioError) as err:
            read(b"RIFF\x00\x00garbage" * 20, shard="s.tar", key="k-7")
        message = str(err.value)
        assert "shard s.tar, sample 'k-7'" in message and "BytesIO" not in message and " at 0x" not in message


def test_a_bad_recording_is_counted_each_time_but_printed_once(tmp_path, tokenizer, caplog):
    """'bad' is read by two task streams over three epochs: six skips counted, one warning,
    and the first warning says that repeats are counted but not printed."""
    bad = sample("bad", {"text": "كتب", "summary": "ولد"}, b"RIFF\x00\x00garbage" * 20)
    shard = write_shard(tmp_path / "b.tar", good("ok-0", 1) + bad + good("ok-1", 2))
    source = ExampleSource([[shard]], bad_config(), tokenizer, {}, slot=0, num_slots=1, seed=0, rank=1)
    with caplog.at_level(logging.WARNING, logger="loaders"):
        for task in ("asr", "sum"):
            pull_epochs(source, task, 3)
    assert source.counts()["skipped"] == {"undecodable_audio": 6}
    printed = warnings_of(caplog)
    assert len(printed) == 1, printed
    assert printed[0].startswith("[rank 1] skipped (undecodable_audio): ")
    assert "counted in the skip counts but not printed" in printed[0]
