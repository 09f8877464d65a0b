"""dynatrack.analysis.patterns against independent references: Python sets, DuckDB, naive loops."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dynatrack.analysis import patterns as P


def _random_patterns(rng: np.random.Generator, n: int, width: int, pool: int = 40) -> np.ndarray:
    """Packed patterns with many duplicates: rows drawn from a small pool, plus some unique rows."""
    base = rng.random((pool, width)) < 0.5
    rows = base[rng.integers(0, pool, n)]
    fresh = rng.random(n) < 0.3
    rows[fresh] = rng.random((int(fresh.sum()), width)) < 0.5
    return np.packbits(rows, axis=1, bitorder="big")


def _naive(bits: np.ndarray, groups: np.ndarray) -> dict[int, tuple[int, int, int]]:
    out: dict[int, Counter] = {}
    for row, g in zip(bits, groups):
        out.setdefault(int(g), Counter())[bytes(row)] += 1
    return {g: (sum(c.values()), len(c), sum(v for v in c.values() if v >= 2)) for g, c in out.items()}


def _as_dict(t: P.DistinctTable) -> dict[int, tuple[int, int, int]]:
    return {
        int(g): (int(a), int(b), int(c)) for g, a, b, c in zip(t.group, t.n_samples, t.n_distinct, t.n_shared)
    }


@pytest.fixture(params=["packed-key sort", "per-group sort", "argsort fallback"])
def sort_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "argsort fallback":
        monkeypatch.setattr(P, "_MIN_HASH_BITS", 65)  # never enough bits: use the argsort path
    if request.param == "per-group sort":
        monkeypatch.setattr(P, "_SEGMENT_SORT_MIN", 0)  # group by code first, then sort each group
    else:
        monkeypatch.setattr(P, "_SEGMENT_SORT_MIN", 1 << 62)  # one sort over all keys
    return request.param


@pytest.mark.parametrize("width", [5, 13, 64, 70, 200])
@pytest.mark.parametrize("group_values", [[3, 10, 11, 250], [-7, 2**40, 5], [0]])
def test_distinct_counts_match_python_sets(width: int, group_values: list[int], sort_path: str) -> None:
    rng = np.random.default_rng(width + len(group_values))
    n = 3000
    bits = _random_patterns(rng, n, width)
    groups = np.asarray(group_values, dtype=np.int64)[rng.integers(0, len(group_values), n)]
    got = _as_dict(P.distinct_counts(bits, groups))
    assert got == _naive(bits, groups)
    assert got[int(groups[0])][1] < got[int(groups[0])][0]  # the data really has duplicates


def test_distinct_counts_one_group_and_empty() -> None:
    rng = np.random.default_rng(1)
    bits = _random_patterns(rng, 500, 11)
    t = P.distinct_counts(bits)
    assert _as_dict(t) == _naive(bits, np.zeros(500, dtype=int))
    empty = P.distinct_counts(np.zeros((0, 2), np.uint8), np.zeros(0, np.int64))
    assert len(empty.group) == 0 and len(empty.n_distinct) == 0


def test_distinct_counts_match_duckdb(tmp_path) -> None:  # noqa: ANN001
    duckdb = pytest.importorskip("duckdb")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(7)
    n, width, layers = 20_000, 45, ["net.1", "net.3", "net.5"]
    bits = _random_patterns(rng, n, width, pool=300)
    step = rng.choice([0, 1, 10, 100], n).astype(np.int64)
    layer_idx = rng.integers(0, len(layers), n)
    table = pa.table(
        {
            "step": step,
            "layer": np.asarray(layers)[layer_idx],
            "bits": pa.array([r.tobytes() for r in bits], type=pa.binary()),
        }
    )
    path = tmp_path / "patterns.parquet"
    pq.write_table(table, path)
    rows = duckdb.sql(
        f"SELECT step, layer, COUNT(*), COUNT(DISTINCT bits) FROM read_parquet('{path}') GROUP BY step, layer"
    ).fetchall()
    expected = {(int(s), layers.index(lay)): (int(c), int(d)) for s, lay, c, d in rows}

    t = P.distinct_counts(bits, step * len(layers) + layer_idx)
    got = {(int(g) // len(layers), int(g) % len(layers)): (int(a), int(b)) for g, a, b in
           zip(t.group, t.n_samples, t.n_distinct)}  # fmt: skip
    assert got == expected


WEAK_HASHES = {
    "constant": lambda w: np.zeros(len(w), dtype=np.uint64),
    "two buckets": lambda w: w[:, 0] & np.uint64(1),
    "first word only": lambda w: w[:, 0].copy(),
}


@pytest.mark.parametrize("hash_name", sorted(WEAK_HASHES))
def test_forced_hash_collisions_stay_exact(hash_name: str, sort_path: str) -> None:
    rng = np.random.default_rng(3)
    n, width = 4000, 150  # 3 words: rows that agree on the first word collide under "first word only"
    rows = rng.random((60, width)) < 0.5
    rows[:, :64] = rows[0, :64]  # all pool rows share word 0
    bits = np.packbits(rows[rng.integers(0, 60, n)], axis=1)
    groups = rng.integers(0, 5, n)
    expected = _naive(bits, groups)
    assert _as_dict(P.distinct_counts(bits, groups, hash_fn=WEAK_HASHES[hash_name])) == expected

    state = P.distinct_update(P.distinct_init(bits.shape[1]), bits[groups == 2], hash_fn=WEAK_HASHES[hash_name])
    assert tuple(P.distinct_compute(state)) == expected[2]
    assert sorted(map(bytes, state.patterns)) == sorted(set(map(bytes, bits[groups == 2])))


def test_hash_rows_is_deterministic_and_spreads() -> None:
    rng = np.random.default_rng(0)
    w = rng.integers(0, 2**63, (10_000, 4), dtype=np.uint64)
    h = P.hash_rows(w)
    assert np.array_equal(h, P.hash_rows(w.copy()))
    assert len(np.unique(h)) == len(w)
    one_bit = w.copy()
    one_bit[:, 3] ^= np.uint64(1)
    assert not np.any(P.hash_rows(one_bit) == h)
    assert 0.45 < np.mean((h >> np.uint64(63)) == 1) < 0.55  # the top bit (used for sorting) is balanced


def test_distinct_merge_equals_all_at_once() -> None:
    rng = np.random.default_rng(11)
    bits = _random_patterns(rng, 5000, 37)
    shard = rng.integers(0, 6, len(bits))
    parts = [P.distinct_update(P.distinct_init(bits.shape[1]), bits[shard == s]) for s in range(6)]
    merged = P.distinct_merge(*parts)
    whole = P.distinct_update(P.distinct_init(bits.shape[1]), bits)
    assert P.distinct_compute(merged) == P.distinct_compute(whole)
    assert tuple(P.distinct_compute(merged)) == _naive(bits, np.zeros(len(bits), int))[0]
    got = dict(zip(map(bytes, merged.patterns), merged.counts.tolist()))
    assert got == Counter(map(bytes, bits))
    # incremental updates fold in the same way
    state = P.distinct_init(bits.shape[1])
    for s in range(6):
        state = P.distinct_update(state, bits[shard == s])
    assert P.distinct_compute(state) == P.distinct_compute(whole)
    with pytest.raises(ValueError, match="bytes"):
        P.distinct_merge(P.distinct_init(2), P.distinct_init(3))


def test_popcount_and_unpack() -> None:
    rng = np.random.default_rng(5)
    bools = rng.random((300, 77)) < 0.4
    bits = np.packbits(bools, axis=1)
    assert np.array_equal(P.popcount(bits), np.unpackbits(bits, axis=1).sum(1))
    assert P.popcount(bits).dtype == np.int32
    assert np.array_equal(P.unpack(bits, 77), bools)
    assert P.unpack(bits, 77).dtype == bool
    with pytest.raises(ValueError, match="width"):
        P.unpack(bits, 90)


def _naive_churn(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, list[int]]:
    n_changed = hamming_sum = 0
    flips = [0] * a.shape[1]
    for i in range(a.shape[0]):
        d = 0
        for j in range(a.shape[1]):
            if a[i, j] != b[i, j]:
                d += 1
                flips[j] += 1
        hamming_sum += d
        n_changed += d > 0
    return a.shape[0], n_changed, hamming_sum, flips


@pytest.mark.parametrize("width", [6, 16, 29])
def test_churn_matches_naive_loop(width: int) -> None:
    rng = np.random.default_rng(width)
    before = rng.random((400, width)) < 0.5
    after = before ^ (rng.random((400, width)) < 0.05)
    bits_a, bits_b = np.packbits(before, axis=1), np.packbits(after, axis=1)
    if width % 8:  # garbage in the padding bits must not count
        bits_b[:, -1] |= np.uint8((1 << (8 - width % 8)) - 1)
    state = P.churn_update(P.churn_init(width), bits_a, bits_b)
    n, n_changed, hamming_sum, flips = _naive_churn(before, after)
    assert (state.n_samples, state.n_changed, state.hamming_sum, state.flips.tolist()) == (
        n, n_changed, hamming_sum, flips
    )
    summary = P.churn_compute(state)
    assert summary.mean_hamming == pytest.approx(hamming_sum / n)
    assert summary.frac_changed == pytest.approx(n_changed / n)
    assert np.allclose(summary.flip_rate, np.asarray(flips) / n)
    assert np.array_equal(P.hamming(bits_a, np.packbits(after, axis=1)), (before != after).sum(1))


def test_churn_merge_equals_all_at_once() -> None:
    rng = np.random.default_rng(2)
    width = 21
    before = rng.random((1000, width)) < 0.5
    after = before ^ (rng.random((1000, width)) < 0.1)
    a, b = np.packbits(before, axis=1), np.packbits(after, axis=1)
    shard = rng.integers(0, 4, len(a))
    parts = [P.churn_update(P.churn_init(width), a[shard == s], b[shard == s]) for s in range(4)]
    merged = P.churn_merge(*parts)
    whole = P.churn_update(P.churn_init(width), a, b)
    assert (merged.n_samples, merged.n_changed, merged.hamming_sum) == (
        whole.n_samples, whole.n_changed, whole.hamming_sum
    )
    assert np.array_equal(merged.flips, whole.flips)
    with pytest.raises(ValueError, match="width"):
        P.churn_update(P.churn_init(width + 8), a, b)


def test_churn_aligned_by_sample_id() -> None:
    rng = np.random.default_rng(4)
    width = 10
    before = rng.random((50, width)) < 0.5
    after = before ^ (rng.random((50, width)) < 0.2)
    ids = np.arange(50) * 3
    perm = rng.permutation(50)[:40]  # the later step lists 40 of the samples, shuffled
    common, (ia, ib) = P.align(ids, ids[perm])
    assert np.array_equal(common, np.sort(ids[perm]))
    state = P.churn_update(
        P.churn_init(width), np.packbits(before, axis=1)[ia], np.packbits(after[perm], axis=1)[ib]
    )
    keep = np.isin(ids, ids[perm])
    assert state.hamming_sum == int((before[keep] != after[keep]).sum())
    with pytest.raises(ValueError, match="repeats"):
        P.align(np.array([1, 1, 2]), np.array([1, 2]))


@pytest.mark.parametrize("widths", [[5, 13, 3], [8, 16]])
def test_concat_layers_is_neuronwise_concatenation(widths: list[int]) -> None:
    rng = np.random.default_rng(sum(widths))
    n = 60
    per_layer = [rng.random((n, w)) < 0.5 for w in widths]
    layers = []
    for k, bools in enumerate(per_layer):
        keep = rng.permutation(n)[: n - k]  # layer k misses k samples, rows shuffled
        layers.append((keep.astype(np.int64), np.packbits(bools[keep], axis=1)))
    ids, bits, total = P.concat_layers(layers, widths)
    assert total == sum(widths)
    expected_ids = sorted(set.intersection(*(set(i.tolist()) for i, _ in layers)))
    assert ids.tolist() == expected_ids
    expected = np.concatenate([b[ids] for b in per_layer], axis=1)
    assert np.array_equal(P.unpack(bits, total), expected)
    # whole-network distinct patterns: the count of distinct concatenated rows
    assert P.distinct_counts(bits).n_distinct[0] == len({r.tobytes() for r in expected})


def test_distinct_counts_many_groups() -> None:
    rng = np.random.default_rng(9)
    bits = _random_patterns(rng, 6000, 9, pool=8)
    groups = rng.integers(0, 3000, len(bits))
    assert _as_dict(P.distinct_counts(bits, groups)) == _naive(bits, groups)


@pytest.mark.parametrize("hash_name", ["strong", "two buckets"])
def test_distinct_counts_large_input(hash_name: str) -> None:
    # enough rows for the bucketed sort (tens of thousands of keys per call)
    rng = np.random.default_rng(13)
    bits = _random_patterns(rng, 150_000, 70, pool=2000)
    groups = rng.integers(0, 3, len(bits)) * 10
    hash_fn = P.hash_rows if hash_name == "strong" else WEAK_HASHES[hash_name]
    assert _as_dict(P.distinct_counts(bits, groups, hash_fn=hash_fn)) == _naive(bits, groups)
