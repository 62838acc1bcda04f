"""A curriculum stage switch takes effect at the new stage's first micro-batch: the examples
drawn for the old stage and still waiting in the bucketing lookahead (LOOKAHEAD_BATCHES
budgets) are released and counted, not trained on first. Before, short stages trained none of
their new tasks (a 2-step stage of did+ser after a ser stage trained only ser)."""
import pytest

from engine.tokenizer import build_tiny_tokenizer
from loaders.config import DataConfig
from loaders.curriculum import ScheduleConfig
from loaders.demo_data import write_demo_shards
from loaders.pipeline import TrainStream
from test_pipeline import check_counts_add_up   # tests/loaders is on sys.path
from test_schedule_stream import run_schedule as run_stages

# Small ADS settings keep the test fast; the mechanics are those of the defaults.
SCHEDULE = dict(ads_pool=32, ads_window=16, ads_max_wait=8, embedding_dim=32)
# The QA repro: a 2-step ser stage, a 2-step did+ser ADS stage, then everything.
STAGES = [{"name": "a", "tasks": ["ser"], "steps": 2},
          {"name": "b", "tasks": ["did", "ser"], "sampler": "ads", "steps": 2},
          {"name": "c", "tasks": "all"}]
# TPC's first switch, with equal weights so the expected share is known: asr, then asr+sum.
TPC_STAGES = [{"name": "asr", "tasks": ["asr"], "steps": 2},
              {"name": "asr+sum", "tasks": ["asr", "sum"], "weights": {"asr": 1, "sum": 1}}]
GRAD_ACCUM = 2
# Over a 2-to-4-step stage (~30-60 examples) a task's share of the used examples stays within
# 0.2 of its drawn share: bucketing by length delays some examples by a micro-batch or two.
SHARE_TOLERANCE = 0.2
# The share of the tasks a random stage adds after an ADS stage, over its first two steps: at
# least this (their natural share is ~0.55; bucketing by length lets some wait a step).
MIN_NEW_SHARE = 0.25


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def train_urls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "shards"
    write_demo_shards(str(folder))
    return sorted(str(p) for p in folder.glob("train-*.tar"))


def run_schedule(cfg, tokenizer, stages, steps, save_at=()):
    """test_schedule_stream's stage loop over ``stages``, every step's counts checked; returns the
    tasks of each micro-batch per step and the final counts."""
    def make():
        return TrainStream(cfg, tokenizer, rank=0, world_size=1, grad_accum=GRAD_ACCUM, seed=3,
                           schedule_cfg=ScheduleConfig(**SCHEDULE))

    trace, counts_per_step = run_stages(make, steps, save_at, stages=stages)
    for counts in counts_per_step:
        check_counts_add_up(counts)
    return [(index, [[task for _, task in mb] for mb in mbs]) for index, mbs in trace], counts_per_step[-1]


def share(trace, steps, task) -> float:
    tasks = [t for index, mbs in trace[steps] for mb in mbs for t in mb]
    return tasks.count(task) / len(tasks)


@pytest.mark.parametrize("num_workers,packing", [(0, False), (2, False), (0, True)])
def test_a_short_stage_trains_its_new_tasks_from_its_first_micro_batch(train_urls, tokenizer, num_workers, packing):
    cfg = DataConfig(train=train_urls, val=train_urls, emotions=["neutral", "happy"], shuffle_buffer=16,
                     max_tokens_per_batch=1024, num_workers=num_workers, packing=packing)
    trace, counts = run_schedule(cfg, tokenizer, STAGES, 6)
    assert [index for index, _ in trace] == [0, 0, 1, 1, 2, 2]
    assert all(set(mb) == {"ser"} for _, mbs in trace[:2] for mb in mbs)
    first_of_b = trace[2][1][0]
    assert "did" in first_of_b, trace[2]
    # ADS gives the stage's tasks equal shares
    assert abs(share(trace, slice(2, 4), "did") - 0.5) < SHARE_TOLERANCE, trace[2:]
    assert counts["released_at_switch"] > 0 and set(counts["released_tasks"]) >= {"ser"}


@pytest.mark.parametrize("packing", [False, True])
def test_a_random_stage_switch_follows_the_new_weights_at_once(train_urls, tokenizer, packing):
    cfg = DataConfig(train=train_urls, val=train_urls, shuffle_buffer=16, max_tokens_per_batch=1024, packing=packing)
    trace, counts = run_schedule(cfg, tokenizer, TPC_STAGES, 5)
    assert all(set(mb) == {"asr"} for _, mbs in trace[:2] for mb in mbs)
    assert "sum" in {t for mb in trace[2][1] for t in mb}, trace[2]     # the new stage's first step
    assert abs(share(trace, slice(2, 5), "sum") - 0.5) < SHARE_TOLERANCE, trace[2:]
    assert counts["released_tasks"] == {"asr": counts["released_at_switch"]} and counts["released_at_switch"] > 0


# Checkpoints before the a->b switch is made (step 2), inside b, and before b->c (step 4).
@pytest.mark.parametrize("num_workers,packing,save_at", [(0, False, {1, 2, 3, 4}), (2, False, {2, 4}),
                                                         (0, True, {2, 3})])
def test_a_resume_at_or_around_a_switch_sees_the_uninterrupted_sequence(train_urls, tokenizer, num_workers, packing,
                                                                        save_at):
    cfg = DataConfig(train=train_urls, val=train_urls, emotions=["neutral", "happy"], shuffle_buffer=16,
                     max_tokens_per_batch=1024, num_workers=num_workers, packing=packing)
    reference, reference_counts = run_schedule(cfg, tokenizer, STAGES, 6)
    resumed, resumed_counts = run_schedule(cfg, tokenizer, STAGES, 6, save_at=save_at)
    assert resumed == reference
    assert resumed_counts == reference_counts


def test_after_an_ads_stage_a_random_stage_mixes_all_its_tasks_from_its_first_step(train_urls, tokenizer):
    cfg = DataConfig(train=train_urls, val=train_urls, emotions=["neutral", "happy"], shuffle_buffer=16,
                     max_tokens_per_batch=1024)
    trace, _ = run_schedule(cfg, tokenizer, STAGES, 6)
    assert [index for index, _ in trace][4:] == [2, 2]
    # asr and sum are about 55% of the demo data; over stage c's first two steps (~30 examples)
    # they keep at least MIN_NEW_SHARE with length bucketing, ~7% when the ADS pool comes first
    assert share(trace, slice(4, 6), "asr") + share(trace, slice(4, 6), "sum") >= MIN_NEW_SHARE, trace[4:]
