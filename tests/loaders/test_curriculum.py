"""Schedules: stage parsing and validation, defaults, switches on the fly, exact resume."""
import json

import pytest

from loaders.curriculum import (HYBRID_FRACTIONS, Schedule, ScheduleConfig, ScheduleError, ScheduledSampler,
                                default_schedule, parse_stage)
from test_ads import DIM, SKEW, SyntheticStreams   # tests/loaders is on sys.path (rootdir-relative import)

LABELS = {"did": list(SKEW)}


def build(stages, max_steps=None, max_tokens=None):
    return Schedule([parse_stage(i, raw) for i, raw in enumerate(stages)], max_steps, max_tokens)


def test_default_schedules_and_fractions():
    tpc = ScheduleConfig(name="tpc").build(max_steps=100, max_tokens=None)
    assert [s.tasks for s in tpc.stages] == [("asr",), ("asr", "sum"), ("asr", "sum", "did", "ser")]
    assert tpc.ends == (25, 50, None) and {s.sampler for s in tpc.stages} == {"random"}
    hybrid = ScheduleConfig(name="hybrid").build(max_steps=200, max_tokens=None)
    assert [s.sampler for s in hybrid.stages] == ["random"] * 3 + ["ads"]
    assert hybrid.stages[-1].tasks == ("asr", "sum", "did", "ser")
    assert hybrid.ends == (30, 70, 130, None) and sum(HYBRID_FRACTIONS[:3]) == pytest.approx(0.65)
    for name in ("random", "ads"):
        only = ScheduleConfig(name=name).build(max_steps=None, max_tokens=None)
        assert len(only) == 1 and only.stages[0].sampler == name and only.stage_at(10**9, 0)[0] == 0

    no_replay = default_schedule("tpc", replay=False)
    assert [s["tasks"] for s in no_replay] == [["asr"], ["sum"], ["did", "ser"]]
    weighted = default_schedule("tpc", replay=0.3)
    assert weighted[2]["weights"] == {"asr": 0.3, "sum": 0.3, "did": 1.0, "ser": 1.0}
    by_tokens = ScheduleConfig(name="tpc").build(max_steps=None, max_tokens=10_000)
    assert by_tokens.unit == "tokens" and by_tokens.ends == (2500, 5000, None)


def test_stage_at_switches_at_the_configured_step_and_token():
    steps = build([{"tasks": ["asr"], "steps": 3}, {"tasks": "all", "sampler": "ads", "steps": 0.5},
                   {"name": "tail", "tasks": ["asr"]}], max_steps=10)
    assert steps.ends == (3, 8, None)       # 3 absolute, then half of 10 more
    assert [steps.stage_at(s, 0)[0] for s in range(10)] == [0] * 3 + [1] * 5 + [2] * 2
    tokens = build([{"name": "a", "tasks": ["asr"], "tokens": 1000}, {"name": "b", "tasks": ["asr", "sum"]}])
    assert tokens.stage_at(5, 999)[1].name == "a" and tokens.stage_at(0, 1000)[1].name == "b"
    assert "tokens [0, 1000)" in tokens.describe()[0]


@pytest.mark.parametrize("stages,max_steps,message", [
    ([{"tasks": ["asr"], "step": 3}], 10, r"stages\[0\].*unknown key 'step'"),
    ([{"tasks": ["asr", "xyz"]}], 10, r"stages\[0\].*unknown task 'xyz'"),
    ([{"name": "one"}], 10, r"stages\[0\] \('one'\): missing key 'tasks'"),
    ([{"tasks": ["asr"], "steps": 3}, {"name": "b", "tasks": ["sum"], "tokens": 9}], 10, r"\('b'\).*one unit"),
    ([{"name": "f", "tasks": ["asr"], "steps": 0.5}, {"tasks": ["sum"]}], None, r"\('f'\).*no max_steps"),
    ([{"name": "w", "tasks": ["asr", "sum"], "weights": {"asr": 1}}], 10, r"\('w'\).*'weights' must name"),
    ([{"name": "n", "tasks": ["asr"], "weights": {"asr": -1}}], 10, r"weights\.asr"),
    ([{"name": "z", "tasks": ["asr"], "steps": 0.01}, {"tasks": ["sum"]}], 10, r"\('z'\).*resolves to 0"),
    ([{"name": "o", "tasks": ["asr"], "steps": 20}], 10, r"\('o'\): ends at 20.*max_steps=10"),
    ([{"name": "e", "tasks": ["asr"], "steps": 10}, {"tasks": ["sum"]}], 10, r"\('e'\).*would never start"),
    ([{"name": "m", "tasks": ["asr"]}, {"tasks": ["sum"]}], 10, r"\('m'\): missing 'steps'"),
    ([{"name": "s", "tasks": ["asr"], "sampler": "greedy"}], 10, r"\('s'\): 'sampler' must be one of"),
    ([{"name": "x", "tasks": ["asr"], "steps": 2.5}], 10, r"\('x'\): 'steps' = 2.5"),
    ([{"name": "d", "tasks": ["asr"], "steps": 2}, {"name": "d", "tasks": ["sum"]}], 10, r"stages\[1\].*'d' is used twice"),
])
def test_invalid_stages_name_the_stage_and_key(stages, max_steps, message):
    with pytest.raises(ScheduleError, match=message):
        ScheduleConfig(stages=stages).build(max_steps=max_steps, max_tokens=None)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ScheduleError, match="unknown key 'ads_pol'"):
        ScheduleConfig.from_dict({"name": "ads", "ads_pol": 4})
    with pytest.raises(ScheduleError, match="schedule.ads_pool"):
        ScheduleConfig.from_dict({"ads_pool": 0})
    with pytest.raises(ScheduleError, match="schedule.replay"):
        ScheduleConfig.from_dict({"replay": 1.5})
    with pytest.raises(ScheduleError, match="schedule.name"):
        ScheduleConfig.from_dict({"name": "curriculum"})
    config = ScheduleConfig.from_dict({"name": "hybrid", "replay": False, "ads_pool": 32})
    assert config.ads_pool == 32 and config.build(100, None).stages[1].tasks == ("sum",)


def make_sampler(streams, schedule, seed=4):
    config = ScheduleConfig(ads_pool=32, ads_window=30, ads_max_wait=8, embedding_dim=DIM)
    return ScheduledSampler(schedule, streams, token_budget=700, config=config, labels=LABELS,
                            natural_counts=streams.natural_counts(), seed=seed)


def run(sampler, start_step, n_steps, tokens=0):
    """The engine's view: one micro-batch per step; returns per-step (stage, keys) and tokens."""
    out = []
    for step in range(start_step, start_step + n_steps):
        stage, batch = sampler.next_batch(step, tokens)
        tokens += sum(ex["num_tokens"] for ex in batch)
        out.append((stage, [ex["key"] for ex in batch], {ex["task"] for ex in batch}))
    return out, tokens


HYBRID_STEPS = 40
HYBRID = [{"name": "asr", "tasks": ["asr"], "steps": 0.25}, {"name": "asr+sum", "tasks": ["asr", "sum"], "steps": 10},
          {"name": "all", "tasks": ["asr", "sum", "did"], "steps": 0.25},
          {"name": "ads", "tasks": ["asr", "sum", "did"], "sampler": "ads"}]


def test_stage_switches_on_the_fly_and_later_tasks_never_appear_earlier():
    streams = SyntheticStreams()
    schedule = build(HYBRID, max_steps=HYBRID_STEPS)
    assert schedule.ends == (10, 20, 30, None)
    sampler = make_sampler(streams, schedule)
    steps, _ = run(sampler, 0, HYBRID_STEPS)
    assert [stage for stage, _, _ in steps] == [0] * 10 + [1] * 10 + [2] * 10 + [3] * 10
    for stage, keys, tasks in steps:
        assert keys and tasks <= set(schedule.stages[stage].tasks)
    assert all(tasks == {"asr"} for stage, _, tasks in steps if stage == 0)
    assert not any(key.startswith("did") for stage, keys, _ in steps if stage < 2 for key in keys)
    assert any("sum" in tasks for stage, _, tasks in steps if stage == 1)
    # streams of inactive tasks are not read; counts add up across the switches
    assert all(task in ("asr", "sum", "did") for task, _ in streams.positions)
    emitted = sum(len(keys) for _, keys, _ in steps)
    draws = sum(sampler.puller.counter.draws.values())
    assert draws == emitted + len(sampler.pending_records()) == sum(streams.positions.values())


def test_samples_of_a_task_dropped_by_the_next_stage_wait_for_it():
    streams = SyntheticStreams()
    stages = [{"name": "asr", "tasks": ["asr"], "steps": 3}, {"name": "sum", "tasks": ["sum"], "steps": 3},
              {"name": "both", "tasks": ["asr", "sum"]}]
    sampler = make_sampler(streams, build(stages, max_steps=12))
    steps, tokens = run(sampler, 0, 4)
    assert sampler.stats()["parked"] == 1        # the asr sample that did not fit the last asr batch
    more, _ = run(sampler, 4, 8, tokens)
    steps += more
    assert all(tasks <= {"sum"} for stage, _, tasks in steps if stage == 1)
    asr_keys = [k for _, keys, _ in steps for k in keys if k.startswith("asr")]
    assert len(asr_keys) == len(set(asr_keys))              # the parked asr sample comes back once, not lost
    assert sampler.puller.counter.draws[("asr", None)] == len(asr_keys) + sum(
        1 for r in sampler.pending_records() if r[1] == "asr")


@pytest.mark.parametrize("stop", [7, 10, 24, 33])    # inside TPC stages, at a switch, inside the ADS stage
def test_resume_mid_stage_reproduces_the_uninterrupted_sequence(stop):
    schedule = build(HYBRID, max_steps=HYBRID_STEPS)
    uninterrupted = make_sampler(SyntheticStreams(), schedule)
    reference, _ = run(uninterrupted, 0, HYBRID_STEPS)

    streams = SyntheticStreams()
    first = make_sampler(streams, schedule)
    head, tokens = run(first, 0, stop)
    state, rewind = first.state_dict(), first.rewind_counts()
    positions = {stream: position - rewind.get(stream, 0) for stream, position in streams.positions.items()}
    resumed = make_sampler(SyntheticStreams(positions=positions), schedule)
    resumed.load_state_dict(json.loads(json.dumps(state)))          # a checkpoint stores it as JSON
    assert resumed.state_dict()["pending"] == state["pending"]      # a checkpoint right after resume is the same
    tail, _ = run(resumed, stop, HYBRID_STEPS - stop, tokens)
    assert head + tail == reference
    assert resumed.puller.counter.draws == uninterrupted.puller.counter.draws    # re-reads are not counted twice


def test_token_measured_stages_switch_at_the_first_step_past_the_boundary():
    schedule = build([{"name": "asr", "tasks": ["asr"], "tokens": 3000}, {"name": "both", "tasks": ["asr", "sum"]}])
    sampler = make_sampler(SyntheticStreams(), schedule)
    tokens, seen = 0, []
    for step in range(12):
        stage, batch = sampler.next_batch(step, tokens)
        seen.append((tokens, stage, {ex["task"] for ex in batch}))
        tokens += sum(ex["num_tokens"] for ex in batch)
    assert [stage for start, stage, _ in seen] == [0 if start < 3000 else 1 for start, _, _ in seen]
    assert {0, 1} == {stage for _, stage, _ in seen}
    assert all(tasks == {"asr"} for _, stage, tasks in seen if stage == 0)
