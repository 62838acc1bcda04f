"""ADS: quota drawing, k-center selection (numba vs NumPy reference), embeddings, sampler."""
import json
from dataclasses import dataclass

import numpy as np
import pytest

from loaders.tasks import TASKS
from loaders.ads import (ADSError, BalancedDrawer, balanced_streams, k_center_select, k_center_select_reference,
                         pick_start, quantize_embeddings, stream_counts)
from loaders.embeddings import (EmbeddingSource, decode_embedding_member, fallback_embedding, read_embedding_sidecar,
                                sidecar_path, write_embedding_sidecar)
from loaders.sampling import ADSSampler, ProportionalSampler

DIM = 24                      # small embedding size keeps the tests fast; the bench uses 256
SKEW = {"egy": 0.8, "glf": 0.2}
# Tolerance on label shares over the long window: the quota drawer is exact per window, the
# selection steers cumulative counts to the targets; 0.03 leaves room for one window's remainder.
SHARE_TOLERANCE = 0.03


class SyntheticStreams:
    """Deterministic per-(task, label) streams over a fixed synthetic data set, with epochs.

    did holds ``n_did`` samples labelled 80/20 egy/glf; asr and sum hold plain samples. Each
    stream cycles over its samples (epoch wrap). ``positions`` is the resumable state.
    Embeddings cluster by label with per-sample noise; token counts vary 40..240.
    """

    def __init__(self, n_did=200, n_plain=150, dim=DIM, seed=7, positions=None):
        rng = np.random.default_rng(seed)
        self.dim = dim
        n_egy = int(n_did * SKEW["egy"])
        self.samples = {"did": [("did", "egy" if i < n_egy else "glf", int(i)) for i in rng.permutation(n_did)],
                        "asr": [("asr", None, i) for i in range(n_plain)],
                        "sum": [("sum", None, i) for i in range(n_plain)]}
        self.centers = {label: rng.standard_normal(dim) for label in ("egy", "glf", None)}
        self.positions = dict(positions or {})

    def members(self, task, label):
        return [s for s in self.samples[task] if label is None or s[1] == label]

    def natural_counts(self):
        tasks = {task: len(samples) for task, samples in self.samples.items()}
        labels = {"did": {label: len(self.members("did", label)) for label in SKEW}}
        return stream_counts(tasks, labels)

    def example(self, sample):
        task, label, index = sample
        rng = np.random.default_rng([TASKS.index(task), index])
        return {"task": task, "label": label, "key": f"{task}-{index:05d}", "num_tokens": int(rng.integers(40, 241)),
                "embedding": (self.centers[label] + 0.7 * rng.standard_normal(self.dim)).astype(np.float32)}

    def __call__(self, task, label):
        members = self.members(task, label)
        position = self.positions.get((task, label), 0)
        self.positions[(task, label)] = position + 1
        return self.example(members[position % len(members)])


def random_pool(rng, m, d, n_groups):
    codes = quantize_embeddings(rng.standard_normal((m, d)))
    groups = rng.integers(0, n_groups, m)
    lengths = rng.integers(20, 400, m)
    return codes, groups, lengths


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("m,d,n_groups,budget", [(37, 33, 3, 1500), (501, 24, 7, 9000), (1531, 256, 11, 20000)])
def test_numba_and_reference_select_the_same_indices(m, d, n_groups, budget, padded):
    rng = np.random.default_rng(m)
    budget = 2 * budget if padded else budget   # padded slots cost more than the lengths' sum
    for trial in range(4):
        codes, groups, lengths = random_pool(rng, m, d, n_groups)
        quota = rng.integers(0, 6, n_groups)
        eligible = rng.random(m) < 0.9
        forced = rng.random(m) < (0.02 if trial % 2 else 0.0)
        start = pick_start(rng, groups, lengths, quota, budget, eligible)
        kwargs = dict(eligible=eligible, forced=forced, padded=padded)
        fast = k_center_select(codes, groups, lengths, quota, budget, start, **kwargs)
        reference = k_center_select_reference(codes, groups, lengths, quota, budget, start, **kwargs)
        assert len(fast) > 3
        np.testing.assert_array_equal(fast, reference)
        cost = len(fast) * lengths[fast].max() if padded else lengths[fast].sum()
        assert cost <= budget and eligible[fast].all() and len(set(fast.tolist())) == len(fast)
        if padded:   # the padded budget is binding: the sum rule would have taken more
            assert len(fast) < len(k_center_select(codes, groups, lengths, quota, budget, start, eligible=eligible,
                                                   forced=forced))


def test_numba_and_reference_agree_when_distances_tie():
    rng = np.random.default_rng(5)
    for trial in range(6):
        m = 97 + trial
        codes = quantize_embeddings(rng.integers(-1, 2, (m, 3)).astype(np.float32))   # few distinct points
        groups, lengths = rng.integers(0, 4, m), rng.integers(1, 4, m)
        quota = rng.integers(0, 4, 4)
        args = (codes, groups, lengths, quota, 60, int(rng.integers(m)))
        kwargs = {"max_items": 25 if trial % 2 else None, "forced": rng.random(m) < 0.03}
        fast, reference = k_center_select(*args, **kwargs), k_center_select_reference(*args, **kwargs)
        assert len(fast) >= 10
        np.testing.assert_array_equal(fast, reference)


def test_selection_spreads_over_clusters_and_keeps_quotas():
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((8, 64)) * 4
    cluster = rng.integers(0, 8, 800)
    codes = quantize_embeddings(centers[cluster] + rng.standard_normal((800, 64)) * 0.3)
    groups, lengths = np.zeros(800, np.int64), np.full(800, 10)
    chosen = k_center_select(codes, groups, lengths, np.array([8]), 10_000, 0, max_items=8)
    assert sorted(set(cluster[chosen].tolist())) == list(range(8))    # one pick per cluster
    first_eight_in_order = np.arange(8)                                # no diversity: same cluster mix as data
    assert len(set(cluster[first_eight_in_order].tolist())) < 8

    groups = rng.integers(0, 3, 800)
    quota = np.array([2, 5, 3])
    chosen = k_center_select(codes, groups, np.full(800, 100), quota, 1000, 0)
    assert len(chosen) == 10 and np.bincount(groups[chosen], minlength=3).tolist() == [2, 5, 3]


def test_quotas_relax_only_to_fill_the_token_budget():
    rng = np.random.default_rng(4)
    codes, groups, _ = random_pool(rng, 300, 16, 2)
    lengths = np.full(300, 50)
    chosen = k_center_select(codes, groups, lengths, np.array([1, 1]), 400, 0)
    counts = np.bincount(groups[chosen], minlength=2)
    assert lengths[chosen].sum() == 400 and counts.sum() == 8
    assert sorted(groups[chosen[:2]].tolist()) == [0, 1]          # quotas first, one per group
    no_quota = pick_start(np.random.default_rng(0), groups, lengths, np.array([0, 0]), 400, np.ones(300, bool))
    assert 0 <= no_quota < 300                                       # still a start when no group has quota


def test_balanced_drawer_is_exact_per_window_and_seeded():
    streams, shares, absent = balanced_streams(["asr", "did"], {"did": ["egy", "glf", "lev"]},
                                               natural_counts={("did", "egy"): 5, ("did", "glf"): 1, ("did", "lev"): 0})
    assert absent == [("did", "lev")] and streams == [("asr", None), ("did", "egy"), ("did", "glf")]
    np.testing.assert_allclose(shares, [0.5, 0.25, 0.25])
    drawer = BalancedDrawer(streams, shares, window=40, seed=1)
    draws = [drawer.next_stream() for _ in range(400)]
    for w in range(10):
        window = draws[40 * w: 40 * (w + 1)]
        assert [window.count(s) for s in streams] == [20, 10, 10]
    again = BalancedDrawer(streams, shares, window=40, seed=1)
    assert [again.next_stream() for _ in range(400)] == draws
    other = BalancedDrawer(streams, shares, window=40, seed=2)
    assert [other.next_stream() for _ in range(400)] != draws
    with pytest.raises(ADSError, match="ads_window"):
        BalancedDrawer(streams, shares, window=2, seed=1)


def run_batches(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def label_shares(batches, task="did"):
    labels = [ex["label"] for batch in batches for ex in batch if ex["task"] == task]
    return {label: labels.count(label) / len(labels) for label in SKEW}, len(labels)


def test_ads_balances_a_skewed_dialect_stream_and_random_keeps_the_skew():
    streams = SyntheticStreams()
    ads = ADSSampler(streams, ["asr", "did"], labels={"did": list(SKEW)}, token_budget=1200, pool_size=64,
                     window=40, embedding_dim=DIM, natural_counts=streams.natural_counts(), seed=5)
    batches = run_batches(ads, 300)
    shares, n_did = label_shares(batches)
    assert n_did > 1000
    for label in SKEW:
        assert abs(shares[label] - 0.5) < SHARE_TOLERANCE, shares
    tasks = [ex["task"] for batch in batches for ex in batch]
    assert abs(tasks.count("asr") / len(tasks) - 0.5) < SHARE_TOLERANCE
    for batch in batches:
        assert sum(ex["num_tokens"] for ex in batch) <= 1200 and batch

    # repeats: draws beyond the natural count; the rare label repeats far more
    counter = ads.puller.counter
    natural = streams.natural_counts()
    repeats = counter.repeats()
    for label in SKEW:
        assert repeats["did"][label] == max(0, counter.draws[("did", label)] - natural[("did", label)])
    assert repeats["did"]["glf"] > repeats["did"]["egy"] > 0
    epochs = {label: counter.draws[("did", label)] / natural[("did", label)] for label in SKEW}
    assert epochs["glf"] > 3 * epochs["egy"]          # 80/20 data drawn 50/50: the rare label cycles 4x faster
    # counts add up: every sample read is either in a batch or still pending in the pool
    emitted = len(tasks)
    assert sum(counter.draws.values()) == emitted + len(ads.pending_records()) == sum(streams.positions.values())

    natural_streams = SyntheticStreams()
    baseline = ProportionalSampler(natural_streams, ["asr", "did"], token_budget=1200,
                                   natural_counts=natural_streams.natural_counts(), seed=5)
    shares, _ = label_shares(run_batches(baseline, 300))
    assert abs(shares["egy"] - SKEW["egy"]) < 0.05, shares


def test_same_seed_same_batches_other_seed_differs():
    def keys(seed):
        sampler = ADSSampler(SyntheticStreams(), ["did", "sum"], labels={"did": list(SKEW)}, token_budget=900,
                             pool_size=48, window=30, embedding_dim=DIM, seed=seed)
        return [[ex["key"] for ex in batch] for batch in run_batches(sampler, 25)]
    assert keys(11) == keys(11)
    assert keys(11) != keys(12)


def test_numpy_implementation_gives_the_same_batches():
    def keys(implementation):
        sampler = ADSSampler(SyntheticStreams(), ["asr", "did"], labels={"did": list(SKEW)}, token_budget=900,
                             pool_size=48, window=30, embedding_dim=DIM, seed=3, implementation=implementation)
        return [[ex["key"] for ex in batch] for batch in run_batches(sampler, 20)]
    assert keys("numba") == keys("numpy")


def test_resume_from_state_dict_reproduces_the_batch_sequence():
    def make(streams):
        return ADSSampler(streams, ["asr", "did"], labels={"did": list(SKEW)}, token_budget=900, pool_size=40,
                          window=30, max_wait=6, embedding_dim=DIM, seed=9)
    reference = [[ex["key"] for ex in b] for b in run_batches(make(SyntheticStreams()), 30)]
    streams = SyntheticStreams()
    first = make(streams)
    head = [[ex["key"] for ex in b] for b in run_batches(first, 13)]
    state, rewind = first.state_dict(), first.rewind_counts()
    assert rewind and all(n >= 1 for n in rewind.values())
    rewound = {stream: pos - rewind.get(stream, 0) for stream, pos in streams.positions.items()}
    resumed = make(SyntheticStreams(positions=rewound))
    resumed.load_state_dict(state)
    tail = [[ex["key"] for ex in b] for b in run_batches(resumed, 17)]
    assert head + tail == reference
    # or: streams restored to an earlier snapshot (here the start of the run); used samples are skipped
    replayed = make(SyntheticStreams())
    replayed.load_state_dict(json.loads(json.dumps(state)), stream_offsets={})
    assert [[ex["key"] for ex in b] for b in run_batches(replayed, 17)] == tail
    assert replayed.puller.reread_skipped == sum(len(b) for b in head)
    # streams not rewound: the re-read finds other samples and says what to do
    wrong = make(SyntheticStreams(positions=streams.positions))
    wrong.load_state_dict(state)
    with pytest.raises(ADSError, match="rewind_counts"):
        wrong.next_batch()


@dataclass
class ObjectExample:          # the shape of loaders.stream.Example that ADS reads
    key: str
    shard: str
    task: str
    label: str | None
    input_ids: np.ndarray
    features: np.ndarray

    @property
    def num_tokens(self):
        return int(self.input_ids.shape[0])


class ObjectSource:
    """A stand-in for loaders.stream.ExampleSource: pull(task, label) -> example object."""

    def __init__(self):
        self.streams = SyntheticStreams()

    def pull(self, task, label=None):
        ex = self.streams(task, label)
        rng = np.random.default_rng(int(ex["key"][-5:]))
        features = rng.standard_normal((128, 7)).astype(np.float32) + (2.0 if ex["label"] == "glf" else 0.0)
        return ObjectExample(ex["key"], "train-000000.tar", ex["task"], ex["label"],
                             np.zeros(ex["num_tokens"], np.int64), features)


def test_sampler_protocol_with_example_objects_and_fallback_embeddings():
    source, embeddings = ObjectSource(), EmbeddingSource(dim=DIM)
    sampler = ADSSampler(None, ["asr", "did"], labels={"did": list(SKEW)}, token_budget=10_000, pool_size=32,
                         window=30, embedding_dim=DIM, seed=2,
                         embed=lambda ex: embeddings.embedding_for(ex.shard, ex.key, ex.features.mean(axis=1)))
    for budget in (600, 900, 1300):
        batch = sampler.next_examples(source, budget)
        assert batch and isinstance(batch[0], ObjectExample)
        assert sum(ex.num_tokens for ex in batch) <= budget
    assert json.loads(json.dumps(sampler.state_dict()))["pool"]
    # one embedding per sample read (no sidecar beside the shard: all fall back)
    assert embeddings.misses == sum(sampler.puller.counter.draws.values()) and embeddings.hit_rate == 0.0


def test_stale_candidates_are_taken_first():
    def longest_wait(max_wait):
        sampler = ADSSampler(SyntheticStreams(), ["asr", "did"], labels={"did": list(SKEW)}, token_budget=1200,
                             pool_size=40, window=30, max_wait=max_wait, embedding_dim=DIM, seed=1)
        waits = []
        for _ in range(80):
            sampler.next_batch()
            waits.append(max(item.waited for item in sampler._pool))
        return max(waits)
    bounded, unbounded = longest_wait(12), longest_wait(10_000)
    # a stale candidate goes into the next batch; more than one batch of stale ones may wait a little longer
    assert bounded <= 12 + 2 < unbounded


def test_bad_examples_are_named():
    streams = SyntheticStreams(dim=DIM + 1)
    sampler = ADSSampler(streams, ["asr"], token_budget=500, pool_size=8, window=8, embedding_dim=DIM)
    with pytest.raises(ADSError, match=r"asr-00000.*embedding_dim"):
        sampler.next_batch()

    def mislabelled(task, label):
        return {**SyntheticStreams()(task, label), "label": "glf"}
    sampler = ADSSampler(mislabelled, ["did"], labels={"did": ["egy"]}, token_budget=500, pool_size=8, window=8,
                         embedding_dim=DIM)
    with pytest.raises(ADSError, match=r"stream \('did', 'egy'\).*label 'glf'"):
        sampler.next_batch()


def test_oversize_sample_comes_alone_and_is_counted():
    def stream(task, label):
        return {"task": "asr", "label": None, "key": "long", "num_tokens": 5000,
                "embedding": np.ones(DIM, np.float32)}
    sampler = ADSSampler(stream, ["asr"], token_budget=1000, pool_size=4, window=4, embedding_dim=DIM)
    assert [ex["key"] for ex in sampler.next_batch()] == ["long"] and sampler.oversize == 1


# --- embeddings -------------------------------------------------------------------------------

def test_fallback_embedding_is_fixed_and_ignores_loudness():
    spectrum = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    a = fallback_embedding(spectrum, 32)
    np.testing.assert_array_equal(a, fallback_embedding(spectrum.copy(), 32))
    np.testing.assert_allclose(a, fallback_embedding(spectrum + 3.0, 32), atol=1e-4)
    assert a.shape == (32,) and a.dtype == np.float32 and np.abs(a).sum() > 0
    assert not np.allclose(a, fallback_embedding(spectrum[::-1].copy(), 32))
    with pytest.raises(ADSError, match="128 bins"):
        fallback_embedding(spectrum[:80], 32)


def test_sidecar_round_trip_hit_rate_and_errors(tmp_path):
    shard = str(tmp_path / "train-000000.tar")
    assert sidecar_path(shard) == str(tmp_path / "train-000000.emb.npz")
    vectors = np.random.default_rng(1).standard_normal((3, 40))
    write_embedding_sidecar(sidecar_path(shard), ["a", "b", "c"], vectors, source="tiny")
    table = read_embedding_sidecar(sidecar_path(shard))
    assert sorted(table) == ["a", "b", "c"] and table["b"].dtype == np.float16
    source = EmbeddingSource(dim=16)
    spectrum = np.linspace(-1, 1, 128)
    got = source.embedding_for(shard, "b", spectrum)
    assert got.shape == (16,)
    assert not np.allclose(got, fallback_embedding(spectrum, 16))
    source.embedding_for(shard, "zzz", spectrum)
    source.embedding_for(str(tmp_path / "other.tar"), "a", spectrum)
    assert (source.hits, source.misses) == (1, 2) and source.hit_rate == pytest.approx(1 / 3)
    member = source.embedding_for(shard, "zzz", spectrum, member=np.ones(16))
    np.testing.assert_array_equal(member, np.ones(16, np.float32))

    import io
    buffer = io.BytesIO()
    np.save(buffer, np.arange(5, dtype=np.float16))
    np.testing.assert_array_equal(decode_embedding_member(buffer.getvalue(), "x.emb.npy"), np.arange(5))
    bad = tmp_path / "bad.emb.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ADSError, match=r"bad\.emb\.npz.*embed_shards"):
        read_embedding_sidecar(str(bad))


def test_stored_embeddings_change_the_selection(tmp_path):
    rng = np.random.default_rng(2)
    keys = [f"s{i:03d}" for i in range(120)]
    spectra = rng.standard_normal((120, 128)).astype(np.float32)
    shard = str(tmp_path / "train-000001.tar")
    write_embedding_sidecar(sidecar_path(shard), keys, rng.standard_normal((120, 96)))

    def select(source):
        vectors = np.stack([source.embedding_for(shard, key, spectrum) for key, spectrum in zip(keys, spectra)])
        codes = quantize_embeddings(vectors)
        return k_center_select(codes, np.zeros(120, np.int64), np.full(120, 10), np.array([12]), 120, 0)
    stored, fallback = EmbeddingSource(dim=32), EmbeddingSource(dim=32)
    fallback._sidecars[shard] = {}      # as if the sidecar were absent
    with_stored, without = select(stored), select(fallback)
    assert stored.hit_rate == 1.0 and fallback.hit_rate == 0.0
    assert len(with_stored) == len(without) == 12
    assert with_stored.tolist() != without.tolist()
