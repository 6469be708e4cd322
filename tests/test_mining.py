"""Paraphrase mining, near-duplicate pairs and groups, community detection, k-means and c-TF-IDF keywords:
against sentence-transformers' own functions and a brute-force NumPy reference on data made here.

Float noise may order exact or near ties differently from torch; every comparison allows exactly that and
nothing more (see tests/tolerances.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers import util

from embfast import kernels, mining
from embfast.clustering import class_tfidf_keywords, cluster, describe_clusters, kmeans
from embfast.kernels import reference

TIE = 1e-5  # two scores closer than this are a tie for float32 dot products of unit vectors


def clustered(n: int, dim: int = 32, centers: int = 30, noise: float = 0.4, seed: int = 0) -> np.ndarray:
    """Rows around a few centres, with exact duplicates (rows 5 and 100 copy row 7): ties on purpose."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    x[5] = x[7]
    if n > 100:
        x[100] = x[7]
    return x


def cosines(x: np.ndarray) -> np.ndarray:
    u = reference.l2_normalize(x).astype(np.float64)
    return u @ u.T


@pytest.mark.parametrize(("n", "top_k", "max_pairs"), [(3000, 10, 500_000), (3000, 5, 2000), (2500, 100, 500_000),
                                                      (50, 100, 500_000), (1, 3, 10), (0, 3, 10)])
def test_paraphrase_mining_equals_sentence_transformers(n, top_k, max_pairs):
    x = clustered(max(n, 101))[:n]
    ours = mining.paraphrase_mining(x, top_k=top_k, max_pairs=max_pairs)
    theirs = util.paraphrase_mining_embeddings(torch.from_numpy(x), top_k=top_k, max_pairs=max_pairs)
    assert all(i < j for _, i, j in ours)
    assert [s for s, _, _ in ours] == sorted((s for s, _, _ in ours), reverse=True)
    a = {(i, j): s for s, i, j in ours}
    b = {(i, j): s for s, i, j in theirs}
    assert len(a) == len(ours), "each pair once"
    for p in set(a) & set(b):
        assert abs(a[p] - b[p]) <= TIE
    if n < 2:
        assert ours == theirs == []
        return
    # a pair only one side has lies at a cut: a row's (top_k + 1)-th score, or the max_pairs budget's last score
    s = cosines(x)
    kth = np.sort(s, axis=1)[:, ::-1][:, min(top_k, n - 1)]
    budget = min(min(b.values()), min(a.values()))
    for (i, j) in set(a) ^ set(b):
        score = s[i, j]
        assert min(abs(score - kth[i]), abs(score - kth[j]), abs(score - budget)) <= TIE, (i, j, score)
    assert len(set(a) ^ set(b)) <= 0.01 * len(b) + 4  # ties at cuts are rare; a real bug differs everywhere


def test_paraphrase_mining_threshold_and_errors():
    x = clustered(400)
    everything = mining.paraphrase_mining(x, top_k=20)
    high = mining.paraphrase_mining(x, top_k=20, threshold=0.9)
    assert high == [p for p in everything if p[0] >= 0.9] and high
    for kwargs, match in [({"top_k": 0}, "top_k must be an int >= 1"), ({"threshold": 1.5}, "threshold must be"),
                          ({"max_pairs": 1}, "max_pairs must be an int >= 2")]:
        with pytest.raises(ValueError, match=match):
            mining.paraphrase_mining(x, **kwargs)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="finite, got NaN or inf in row 3"):
        mining.paraphrase_mining(bad)
    with pytest.raises(ValueError, match="2-D"):
        mining.paraphrase_mining(x[0])


def test_unit_rows_in_chunks_and_from_a_memory_map(tmp_path, monkeypatch):
    """unit_rows converts in chunks (same result as in one go), reads a memory-mapped file without changing it
    (its pages are released after each chunk, the file stays readable), and names the first non-finite row."""
    monkeypatch.setattr(mining, "UNIT_CHUNK", 64)
    x = clustered(300, dim=16) * 3.0
    x[11] = 0.0
    whole = reference.l2_normalize(x)
    np.testing.assert_allclose(mining.unit_rows(x), whole, rtol=0, atol=1e-6)
    assert not mining.unit_rows(x)[11].any()
    np.save(tmp_path / "v.npy", x)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    got = mining.unit_rows(mapped)
    assert type(got) is np.ndarray and got.flags.c_contiguous and got.dtype == np.float32
    np.testing.assert_array_equal(got, mining.unit_rows(x))
    np.testing.assert_array_equal(mapped, x)  # the file (and the map) unchanged after the pages were dropped
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), x)
    assert mining.paraphrase_mining(mapped, top_k=5) == mining.paraphrase_mining(x, top_k=5)
    bad = x.copy()
    bad[200, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or inf in row 200"):
        mining.unit_rows(bad)
    with pytest.raises(TypeError, match="numeric"):
        mining.unit_rows(np.array([["a", "b"]]))
    assert mining.unit_rows(np.zeros((0, 4))).shape == (0, 4)


@pytest.mark.parametrize("n", [1, 7, 2048, 2049, 4500])
def test_self_topk_equals_a_plain_join(n):
    """The symmetric join (upper tiles, row and column merges) finds what a plain top-k over every row finds."""
    x = reference.l2_normalize(clustered(max(n, 101), dim=24, seed=n)[:n])
    s, i = mining.self_topk(x, 9)
    ref_s, ref_i = kernels.topk_cosine(x, x, 9, assume_normalized=True, backend="reference")
    np.testing.assert_allclose(s, ref_s, rtol=0, atol=TIE)
    true = cosines(x)
    np.testing.assert_allclose(np.take_along_axis(true, i, axis=1), ref_s, rtol=0, atol=TIE)


@pytest.mark.skipif(not kernels.HAS_NATIVE, reason="the native core is not built")
@pytest.mark.parametrize(("heaps", "k", "rows", "blocks"), [(300, 7, 50, 4), (40, 101, 30, 5), (513, 3, 17, 2),
                                                          (5, 0, 4, 1)])
def test_column_merge_equals_a_row_merge_of_the_transpose(heaps, k, rows, blocks):
    """topk_merge_block_columns (the self-join's merge without a transposed copy) gives, bit for bit, what
    topk_merge_block gives on the transpose, and both give the reference top-k: best first, ties to the lower
    index, NaN never kept. Scores come from a few values, so ties are everywhere; heaps fill across blocks."""
    core = kernels._core
    rng = np.random.default_rng(heaps + k)
    state = [(np.empty((heaps, k), np.float32), np.empty((heaps, k), np.int64), np.zeros(heaps, np.int64))
             for _ in range(2)]
    seen = []
    for b in range(blocks):
        scores = rng.choice(np.float32([-1.0, 0.25, 0.5, 0.5, 0.75, 1.0]), size=(rows, heaps))
        scores[rng.random(scores.shape) < 0.05] = np.nan
        seen.append(scores)
        core.topk_merge_block_columns(scores, b * rows, *state[0], 2)
        core.topk_merge_block(np.ascontiguousarray(scores.T), b * rows, None, None, *state[1], 2)
    for heap_s, heap_i, heap_n in state:
        core.topk_finalize(heap_s, heap_i, heap_n)
    np.testing.assert_array_equal(state[0][0], state[1][0])
    np.testing.assert_array_equal(state[0][1], state[1][1])
    full = np.vstack(seen).T  # (heaps, all rows)
    for h in range(heaps):
        ok = np.flatnonzero(~np.isnan(full[h]))
        best = ok[np.lexsort((ok, -full[h, ok]))][:k]  # score descending, then the lower index
        np.testing.assert_array_equal(state[0][1][h, :len(best)], best)
        assert (state[0][1][h, len(best):] == -1).all()


def test_column_merge_rejects_mismatched_heaps():
    if not kernels.HAS_NATIVE:
        pytest.skip("the native core is not built")
    scores = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="num_heaps = scores.shape"):
        kernels._core.topk_merge_block_columns(scores, 0, np.empty((4, 3), np.float32), np.empty((4, 3), np.int64),
                                               np.zeros(4, np.int64), 1)


def test_joins_give_the_same_answers_from_many_threads_at_once():
    """Paraphrase mining and near-duplicate pairs called from several threads at once (and from worker threads
    rather than the main one) give exactly what one call from the main thread gives."""
    from concurrent.futures import ThreadPoolExecutor

    x = clustered(4500, dim=24)
    alone = mining.paraphrase_mining(x, top_k=5)
    alone_pairs = mining.near_duplicate_pairs(x, 0.9)
    with ThreadPoolExecutor(4) as pool:
        mined = list(pool.map(lambda _: mining.paraphrase_mining(x, top_k=5), range(4)))
        dup = list(pool.map(lambda _: mining.near_duplicate_pairs(x, 0.9), range(4)))
    for got in mined:
        assert got == alone
    for got in dup:
        for a, b in zip(got, alone_pairs, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threshold", [0.95, 0.8, 0.0])
def test_near_duplicate_pairs_are_every_pair_above_the_threshold(threshold):
    x = clustered(700, dim=16, centers=12, noise=0.3)
    i, j, s = mining.near_duplicate_pairs(x, threshold)
    full = cosines(x)
    ti, tj = np.nonzero(np.triu(full >= threshold, k=1))
    got, want = set(zip(i.tolist(), j.tolist(), strict=True)), set(zip(ti.tolist(), tj.tolist(), strict=True))
    for p in got ^ want:  # only pairs within float noise of the threshold may differ
        assert abs(full[p] - threshold) <= TIE, (p, full[p])
    np.testing.assert_allclose(s, full[i, j], atol=TIE)
    assert np.all(i < j) and np.all(np.diff(i) >= 0)


def test_duplicate_groups_are_connected_components():
    groups = mining.duplicate_groups(8, np.array([0, 1, 5, 6]), np.array([3, 3, 6, 7]))
    assert groups == [[0, 1, 3], [5, 6, 7]]
    assert mining.duplicate_groups(3, np.array([], np.int64), np.array([], np.int64)) == []


@pytest.mark.parametrize(("threshold", "min_size"), [(0.8, 10), (0.7, 25), (0.9, 3), (0.99, 2), (0.5, 1)])
def test_community_detection_equals_sentence_transformers(threshold, min_size):
    x = clustered(2500)
    ours = mining.community_detection(x, threshold, min_size)
    theirs = util.community_detection(torch.from_numpy(x), threshold, min_size)
    s = cosines(x)
    assert [len(c) for c in ours] == sorted((len(c) for c in ours), reverse=True)
    members = [i for c in ours for i in c]
    assert len(members) == len(set(members)), "communities do not overlap"
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        # the same rows; the central element the same row or an exact tie (duplicate rows)
        assert set(a) == set(b) or _sets_differ_at_threshold(s, a, b, threshold)
        assert a[0] == b[0] or abs(s[a[0], b[0]] - s[b[0], b[0]]) <= TIE


def _sets_differ_at_threshold(s, a, b, threshold) -> bool:
    return all(abs(s[a[0], r] - threshold) <= TIE for r in set(a) ^ set(b))


def test_community_detection_edge_cases():
    assert mining.community_detection(np.zeros((0, 4), np.float32)) == []
    x = clustered(30)
    assert [sorted(c) for c in mining.community_detection(x, 0.9999, 2)] == [[5, 7]]  # the duplicate pair
    one = mining.community_detection(x[:1], 0.5, 10)  # min size clamps to n, as sentence-transformers
    assert one == util.community_detection(torch.from_numpy(x[:1]), 0.5, 10) == [[0]]


def test_kmeans_is_scikit_learn_on_unit_vectors():
    from sklearn.cluster import KMeans

    x = clustered(600, centers=6, noise=0.2)
    labels, centroids = kmeans(x, 6, seed=3, backend="sklearn")
    ref = KMeans(n_clusters=6, n_init=1, random_state=3).fit(reference.l2_normalize(x))
    np.testing.assert_array_equal(labels, ref.labels_)
    assert centroids.shape == (6, 32) and centroids.dtype == np.float32
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 600\]"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        kmeans(x, 2, backend="torch")


def test_kmeans_with_faiss_finds_the_same_clusters():
    pytest.importorskip("faiss")
    x = clustered(600, centers=6, noise=0.05)
    labels, centroids = kmeans(x, 6, seed=3, n_init=5, backend="faiss")  # best of 5 seeded random starts
    u = reference.l2_normalize(x)
    d = ((u[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    assert np.all(d[np.arange(600), labels] <= d.min(axis=1) + 1e-5), "each row labelled by its nearest centroid"
    ref, _ = kmeans(x, 6, seed=3, n_init=5, backend="sklearn")
    # six well-separated blobs: both find them (the same partition, whatever the label numbers)
    pairs = {(int(a), int(b)) for a, b in zip(labels, ref, strict=True)}
    assert len(pairs) == 6 and len({a for a, _ in pairs}) == 6


def test_class_tfidf_keywords_find_each_topic():
    topics = {0: "stock market shares investors trading", 1: "football match goal team league",
              2: "recipe oven flour butter baking"}
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for c, words in topics.items():
        w = words.split()
        for _ in range(20):
            texts.append(" ".join(rng.choice(w, 4)) + " the and of news today")
            labels.append(c)
    labels.append(-1)
    texts.append("unclustered words never counted")
    got = class_tfidf_keywords(texts, np.array(labels), top_n=5)
    for c, words in topics.items():
        assert set(got[c]) == set(words.split()), got[c]  # shared words ("news", "today") rank below
    assert -1 not in got


def test_cluster_and_describe():
    x = clustered(400, centers=4, noise=0.1)
    texts = [f"text {i}" for i in range(400)]
    labels = cluster(x, method="community", threshold=0.8, min_community_size=20)
    comms = mining.community_detection(x, 0.8, 20)
    assert [int((labels == c).sum()) for c in range(len(comms))] == [len(c) for c in comms]
    desc = describe_clusters(x, labels, texts, top_texts=3)
    assert [d["size"] for d in desc] == [len(c) for c in comms]
    for d in desc:
        assert set(d["central"]) <= set(d["members"]) and len(d["texts"]) == 3
    km = cluster(x, method="kmeans", k=4)
    assert set(km.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="needs k"):
        cluster(x, method="kmeans")
    with pytest.raises(ValueError, match="method must be one of"):
        cluster(x, method="dbscan")
