"""What a user reads when the data sources are wrong: shards that yield nothing (named, with what
is wrong), glob patterns given as URLs, the start line that says where the training data comes
from, and a demo folder that cannot be a folder."""
import json
import tarfile

import pytest

from engine.tokenizer import build_tiny_tokenizer
from loaders.config import DataConfig
from loaders.demo_data import main as demo_data_main
from loaders.pipeline import TrainStream
from loaders.shards import INDEX_FILE, ShardError, check_shards_exist
from loaders.sources import data_sources_note, data_sources_problem, no_validation_reason
from test_stream import good, sample, wav_bytes, write_shard   # tests/loaders is on sys.path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def unusable(tmp_path):
    """Four shards that yield no example, each for its own reason."""
    with tarfile.open(tmp_path / "nomembers.tar", "w"):
        pass
    (tmp_path / "notatar.tar").write_text("hello, this is a text file\n")
    write_shard(tmp_path / "nojson.tar", sample("clip", None, wav_bytes(0.3, 1)))
    write_shard(tmp_path / "notarget.tar", sample("clip", {"speaker": "m3"}, wav_bytes(0.3, 2)))
    return {name: str(tmp_path / f"{name}.tar") for name in ("nomembers", "notatar", "nojson", "notarget")}


def stream_error(cfg: DataConfig, tokenizer) -> str:
    with pytest.raises(ShardError) as e:
        TrainStream(cfg, tokenizer, rank=0, world_size=1, grad_accum=1, seed=0)
    return str(e.value)


def test_training_shards_that_yield_nothing_are_named_with_what_is_wrong(unusable, tokenizer):
    msg = stream_error(DataConfig(train=list(unusable.values())), tokenizer)
    assert msg.startswith("data.train: its 4 shard(s) yield no usable example")
    assert f"{unusable['nomembers']} is a tar file with no file members (an empty shard)" in msg
    assert f"{unusable['notatar']} is not a readable tar file (truncated tar header at byte 0)" in msg
    assert f"{unusable['nojson']} holds 1 sample(s), none usable; the first: shard {unusable['nojson']}, " \
           "sample 'clip': no clip.json" in msg
    assert f"{unusable['notarget']} holds 1 sample(s), none usable" in msg and "none of the target fields" in msg
    assert "python -m loaders.make_shards" in msg


def test_one_empty_source_among_several_is_named_by_its_number(tmp_path, unusable, tokenizer):
    shards = [write_shard(tmp_path / f"good-{i}.tar", good(f"k{i}", i)) for i in range(2)]
    msg = stream_error(DataConfig(train=[shards, [unusable["nomembers"]]]), tokenizer)
    assert msg.startswith("data.train (source 2 of 2): its 1 shard(s) yield no usable example")
    assert "good-0.tar" not in msg


def test_an_index_that_counts_nothing_for_a_good_shard_is_blamed(tmp_path, tokenizer):
    shard = write_shard(tmp_path / "train-000000.tar", good("k", 1))
    (tmp_path / INDEX_FILE).write_text(json.dumps(
        {"format": 1, "shards": {"train-000000.tar": {"samples": 1, "tasks": {}, "labels": {}}}}))
    msg = stream_error(DataConfig(train=shard), tokenizer)
    assert f"{shard} holds 1 sample(s) with targets, but shards.json beside it counts no example of it" in msg


def test_validation_with_no_usable_example_names_the_val_shards(tmp_path, unusable):
    train = write_shard(tmp_path / "train.tar", good("k", 1))
    cfg = DataConfig(train=train, val=[unusable["notatar"], unusable["nomembers"]])
    reason = no_validation_reason(cfg, {"read": 1, "skipped": {"corrupt_tar": 1}})
    assert "data.val is empty" not in reason
    assert reason.startswith("no validation data: data.val: its 2 shard(s) yield no usable example")
    assert unusable["notatar"] in reason and unusable["nomembers"] in reason
    assert "; 1 of 1 example(s) read were skipped (corrupt_tar 1). A shard is" in reason
    assert "data.val is empty" in no_validation_reason(DataConfig(train=train), {"read": 0, "skipped": {}})
    long_only = write_shard(tmp_path / "val-long.tar", good("long", 3))   # 0.5 s of audio, over the limit below
    reason = no_validation_reason(DataConfig(train=train, val=long_only, max_audio_seconds=0.1),
                                  {"read": 4, "skipped": {"audio_too_long": 4}})
    assert f"{long_only} holds 1 sample(s) with targets, each skipped under the data settings" in reason
    assert "4 of 4 example(s) read were skipped (audio_too_long 4)" in reason and "shards.json" not in reason


def test_a_glob_pattern_is_said_not_to_be_expanded_with_the_brace_form(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"train-00000{i}.tar", good(f"k{i}", i))
    with pytest.raises(ShardError) as e:
        check_shards_exist([f"{tmp_path}/train-*.tar"], "data.train")
    msg = str(e.value)
    assert "not glob patterns" in msg and "3 file(s) here match it, train-000000.tar ... train-000002.tar" in msg
    assert f"{tmp_path}/train-{{000000..000007}}.tar" in msg
    with pytest.raises(ShardError) as e:
        check_shards_exist([f"{tmp_path}/missing.tar"], "data.train")
    assert "not glob patterns" not in str(e.value) and "Check the path and brace range" in str(e.value)


def test_the_start_note_says_where_training_data_comes_from(tmp_path):
    note = data_sources_note(DataConfig(val=f"{tmp_path}/val-000000.tar", demo_dir=str(tmp_path / "demo")))
    assert note.startswith(f"data: data.train is empty: training on the embedded demo set ({tmp_path / 'demo'})")
    assert "validation on data.val" in note
    note = data_sources_note(DataConfig(train=[["/d/a/train-{000000..000001}.tar"], ["/d/b/train-000000.tar"]],
                                        weights=[1, 3]))
    assert note == ("data: training on 2 sources of data.train (weight 1: 2 shards, /d/a/train-000000.tar ... "
                    "/d/a/train-000001.tar; weight 3: 1 shard, /d/b/train-000000.tar); no validation (data.val is empty)")


def test_a_demo_folder_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    a_file = tmp_path / "some.tar"
    a_file.write_text("x")
    assert demo_data_main([str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert f"{a_file} is a file, not a folder" in err
    assert "data.demo_dir" in data_sources_problem(DataConfig(demo_dir=str(a_file)))
    assert data_sources_problem(DataConfig(demo_dir=str(tmp_path / "new"))) is None


def test_a_source_of_only_empty_or_non_tar_shards_is_refused_before_the_model_is_built(tmp_path, unusable):
    from loaders.sources import check_given_shards_exist

    with pytest.raises(ShardError) as e:
        check_given_shards_exist(DataConfig(train=[unusable["nomembers"], unusable["notatar"]]))
    assert "data.train: its 2 shard(s) yield no usable example" in str(e.value)
    good_shard = write_shard(tmp_path / "good.tar", good("k", 1))
    # One good shard among them: the bad ones are skipped and counted while training, not refused here.
    check_given_shards_exist(DataConfig(train=[good_shard, unusable["notatar"]], val=unusable["notatar"]))
