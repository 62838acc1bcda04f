"""Recipes, overrides and the errors a user sees for a bad config."""
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, available_recipes, load_config, save_config

REPO = Path(__file__).resolve().parents[2]


def test_the_four_recipes_exist_and_start_with_their_launch_command():
    assert set(available_recipes()) >= {"random", "tpc", "ads", "hybrid"}
    for name in ("random", "tpc", "ads", "hybrid"):
        text = (REPO / "recipes" / f"{name}.yaml").read_text()
        assert text.splitlines()[0] == f"# torchrun --nproc_per_node=2 engine/train.py --recipe {name} [key=value ...]"
        assert "max_steps:" in text and "output_dir:" in text
        cfg = load_config(name)
        assert cfg.recipe == name and cfg.schedule.name == name


def test_overrides_are_parsed_and_typed():
    cfg = load_config("hybrid", ["optim.lr=2e-4", "model.path=/ckpt/Qwen2.5-Omni-7B", "max_steps=7",
                                 "lora.targets=[q_proj,v_proj]", "optim.warmup_steps=3", "lora.alpha=32"])
    assert cfg.optim.lr == pytest.approx(2e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.path == "/ckpt/Qwen2.5-Omni-7B"
    assert cfg.max_steps == 7 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)  # int accepted for a float key
    assert cfg.output_dir.startswith("runs/hybrid-")


def test_unknown_key_names_the_nearest_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config("random", ["optim.lrr=1e-3"])
    assert "optim.lrr" in str(e.value) and "optim.lr" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config("random", ["max_step=3"])
    assert "max_steps" in str(e.value)


def test_wrong_type_names_key_value_and_expected_type():
    with pytest.raises(ConfigError) as e:
        load_config("random", ["max_steps=ten"])
    msg = str(e.value)
    assert "max_steps" in msg and "'ten'" in msg and "int" in msg
    with pytest.raises(ConfigError) as e:
        load_config("random", ["model.train_audio_encoder=3"])
    assert "model.train_audio_encoder" in str(e.value) and "bool" in str(e.value)


def test_missing_recipe_lists_the_recipes_that_exist():
    with pytest.raises(ConfigError) as e:
        load_config("hybird")
    msg = str(e.value)
    assert "hybird" in msg and all(n in msg for n in ("random", "tpc", "ads", "hybrid"))


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("tpc", ["optim.lr=5e-4", f"output_dir={tmp_path / 'run'}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg


def test_cli_prints_config_errors_and_exits_2():
    proc = subprocess.run([sys.executable, "engine/train.py", "--recipe", "random", "optim.betas=fast"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "optim.betas" in proc.stderr and "list" in proc.stderr


def test_token_budget_runs_and_scientific_integers():
    cfg = load_config("random", ["max_steps=0", "max_tokens=5e6"])
    assert cfg.max_steps == 0 and cfg.max_tokens == 5_000_000
    with pytest.raises(ConfigError, match="no end"):
        load_config("random", ["max_steps=0"])
    with pytest.raises(ConfigError, match="max_tokens"):
        load_config("random", ["max_tokens=2.5"])
    with pytest.raises(ConfigError, match="max_steps=-3 is negative"):
        load_config("random", ["max_steps=-3"])
    with pytest.raises(ConfigError, match="max_tokens=-1 is negative"):
        load_config("random", ["max_steps=10", "max_tokens=-1"])


@pytest.mark.parametrize("override, allowed", [
    ("lora.targets=[q_proj,foo_proj]", "q_proj, k_proj"),
    ("lora.rank=-1", ">= 1"),
    ("lora.rank=0", ">= 1"),
    ("lora.dropout=1.5", "[0.0, 1.0)"),
    ("lora.impl=cuda", "triton"),
    ("model.preset=70b", "tiny, 7b"),
    ("metrics.log_every=0", ">= 1"),
    ("optim.grad_accum=0", ">= 1"),
    ("model.fsdp=sometimes", "auto, true, false"),
    ("loss.impl=fused", "reference"),
])
def test_out_of_range_values_name_key_value_and_what_is_allowed(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as e:
        load_config("random", [override])
    msg = str(e.value)
    assert key in msg and allowed in msg, msg
    assert (value.strip("[]").split(",")[-1] if key == "lora.targets" else value) in msg, msg


def test_unknown_schedule_name_is_a_config_error():
    with pytest.raises(ConfigError, match="schedule.name.*'foo'"):
        load_config("random", ["schedule.name=foo"])


def test_cli_prints_validation_errors_in_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, "engine/train.py", "--recipe", "random", "lora.rank=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("omnitrain: error: ") and "lora.rank" in proc.stderr


def test_output_dir_that_is_a_file_or_under_one_is_refused(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        load_config("random", [f"output_dir={afile}"])
    with pytest.raises(ConfigError, match="which is a file"):
        load_config("random", [f"output_dir={afile}/run"])
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="gone is a broken link"):
        load_config("random", [f"output_dir={tmp_path}/gone/run"])
    assert load_config("random", [f"output_dir={tmp_path}/new/run"]).output_dir == f"{tmp_path}/new/run"


def test_source_weights_are_checked_against_the_sources_before_any_shard_is_read(tmp_path):
    two = f"data.train=[[{tmp_path}/a-000000.tar],[{tmp_path}/b-000000.tar]]"   # the shards need not exist yet
    with pytest.raises(ConfigError, match="1 entries for 2 source"):
        load_config("random", [two, "data.weights=[1]"])
    with pytest.raises(ConfigError, match="positive"):
        load_config("random", [two, "data.weights=[1, 0]"])
    assert load_config("random", [two, "data.weights=[3, 1]"]).data.weights == [3, 1]


def test_a_repeated_key_is_noted_and_a_repeated_shard_list_refused():
    from engine.config import check_repeated_keys

    assert check_repeated_keys(["max_steps=3", "optim.lr=1e-3"]) == []
    assert check_repeated_keys(["max_steps=3", "optim.lr=1e-3", "max_steps=4"]) == [
        "max_steps is given 2 times (3, 4): the last, 4, is used"]
    with pytest.raises(ConfigError, match="data.val is given 2 times"):
        check_repeated_keys(["data.val=/d/val-000000.tar", "data.val=/d/val-000001.tar"])


def test_a_list_of_brace_range_sources_is_read_as_typed(tmp_path):
    """YAML cannot parse a brace range inside a flow list; the override still means two sources."""
    cfg = load_config("random", ["data.train=[[/d/a/train-{000000..000001}.tar],[/d/b/train-{000000..000003}.tar]]",
                                 "data.weights=[1,3]", "data.val=[/d/val-{0,1}.tar, '/d/x-{2..3}.tar']",
                                 f"output_dir={tmp_path / 'run'}"])
    assert cfg.data.train == [["/d/a/train-{000000..000001}.tar"], ["/d/b/train-{000000..000003}.tar"]]
    assert cfg.data.weights == [1.0, 3.0]
    assert cfg.data.val == ["/d/val-{0,1}.tar", "/d/x-{2..3}.tar"]
    from loaders.shards import expand_sources
    assert [len(urls) for urls in expand_sources(cfg.data.train)] == [2, 4]
    # A value starting with "{" stays a brace URL string, as before.
    cfg = load_config("random", ["data.train={/d/a,/d/b}/train-000000.tar", f"output_dir={tmp_path / 'run'}"])
    assert expand_sources(cfg.data.train) == [["/d/a/train-000000.tar", "/d/b/train-000000.tar"]]


@pytest.mark.parametrize("value, problem", [
    ("[[/d/a/train-{000000..000001}.tar],[/d/b/train-{0..1.tar]]", "is not closed by '}'"),
    ("[/d/a/train-{0..1}.tar, /d/b/x.tar", "'[' is not closed"),
    ("[/d/a-{0..1}.tar] /d/b.tar", "after the list"),
    ("[/d/a-{0..1}.tar,,/d/b.tar]", "empty item"),
])
def test_a_list_that_cannot_be_read_is_an_error_that_says_to_quote_each_url(value, problem):
    with pytest.raises(ConfigError) as e:
        load_config("random", [f"data.train={value}"])
    msg = str(e.value)
    assert "data.train" in msg and problem in msg and "quote each URL" in msg
    assert "[['/d/a/train-{000000..000007}.tar'], ['/d/b/train-{000000..000003}.tar']]" in msg


def test_demo_dir_that_is_a_file_is_a_config_error_when_the_demo_set_is_used(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    for demo_dir in (a_file, a_file / "demo"):
        with pytest.raises(ConfigError) as e:
            load_config("random", [f"data.demo_dir={demo_dir}", f"output_dir={tmp_path / 'run'}"])
        assert "data.demo_dir" in str(e.value) and str(a_file) in str(e.value) and "not a folder" in str(e.value)
    # With data.train set the demo set is not used, so its folder does not matter.
    cfg = load_config("random", [f"data.demo_dir={a_file}", "data.train=/d/train-000000.tar",
                                 f"output_dir={tmp_path / 'run'}"])
    assert cfg.data.demo_dir == str(a_file)
