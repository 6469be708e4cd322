"""Clusters of embeddings and what characterizes them: k-means (faiss or scikit-learn), community detection
(:mod:`embfast.mining`), class-based TF-IDF keywords (as BERTopic) and each cluster's most central texts.

k-means: faiss's ``Kmeans`` when faiss is installed, else scikit-learn's; both are well kept, and
``backend=`` picks one. benchmarks/bench_apps.py times the two side by side (a first run on 2,000 vectors,
with other work on the cores, had faiss far ahead; the quiet-machine figures are still to be taken).
"""

from __future__ import annotations

import numpy as np

from embfast.mining import community_detection, unit_rows

METHODS = ("community", "kmeans")


KMEANS_BACKENDS = ("auto", "faiss", "sklearn")


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def kmeans(vectors, k: int, *, seed: int = 0, max_iter: int = 300, n_init: int = 1,
           backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """k-means on the unit vectors (cosine geometry): Lloyd iterations from a seeded start.

    Args:
        vectors: (n, dim) float embeddings (normalized here).
        k: clusters, 1 <= k <= n.
        seed: random state (default 0: repeatable).
        max_iter / n_init: iterations and restarts (defaults 300 and 1).
        backend: "faiss" (``faiss.Kmeans``, random initial centroids), "sklearn" (``KMeans``, k-means++), or
            "auto" (default): faiss when installed, else scikit-learn.

    Returns:
        labels (n,) int64 in [0, k) (each row's nearest centroid), centroids (k, dim) float32.
    """
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(KMEANS_BACKENDS)}, got {backend!r}")
    x = unit_rows(vectors)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= max(x.shape[0], 1):
        raise ValueError(f"k must be an int in [1, {x.shape[0]}] (the number of vectors), got {k!r}")
    faiss = _faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu")
    if faiss is not None:
        km = faiss.Kmeans(x.shape[1], int(k), niter=max_iter, nredo=n_init, seed=seed, verbose=False,
                          max_points_per_centroid=max(256, x.shape[0] // max(int(k), 1) + 1))
        km.train(x)
        _, labels = km.index.search(x, 1)
        return labels[:, 0].astype(np.int64), np.asarray(km.centroids, dtype=np.float32)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=int(k), n_init=n_init, max_iter=max_iter, random_state=seed).fit(x)
    return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)


def class_tfidf_keywords(texts: list[str], labels: np.ndarray, top_n: int = 8) -> dict[int, list[str]]:
    """The most characteristic words of each cluster: class-based TF-IDF (BERTopic's c-TF-IDF).

    All texts of a cluster form one document; a term's weight in cluster c is its frequency in c
    (L1-normalized per cluster) times log(1 + A / f), with f the term's frequency over all clusters and
    A the average number of words per cluster (Grootendorst 2022, BERTopic). Words come from
    scikit-learn's ``CountVectorizer`` (English stop words removed). Labels < 0 (unclustered) are skipped.

    Returns:
        {cluster label: up to ``top_n`` words, best first}.
    """
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.preprocessing import normalize

    labels = np.asarray(labels)
    classes = sorted(int(c) for c in set(labels.tolist()) if c >= 0)
    if not classes:
        return {}
    docs = [" ".join(texts[i] for i in np.flatnonzero(labels == c)) for c in classes]
    try:
        counts = CountVectorizer(stop_words="english").fit(docs)
    except ValueError:  # only stop words or no words at all
        return {c: [] for c in classes}
    x = counts.transform(docs).astype(np.float64)
    words = counts.get_feature_names_out()
    freq = np.asarray(x.sum(axis=0)).ravel()
    avg = float(x.sum(axis=1).mean())
    idf = np.log(1.0 + avg / np.maximum(freq, 1.0))
    weights = normalize(x, axis=1, norm="l1").multiply(idf[None, :]).tocsr()
    out = {}
    for row, c in enumerate(classes):
        w = weights.getrow(row).toarray().ravel()
        nz = np.flatnonzero(w > 0)
        best = nz[np.lexsort((words[nz], -w[nz]))][:top_n]
        out[c] = [str(words[t]) for t in best]
    return out


def cluster(vectors, *, method: str = "community", k: int | None = None, threshold: float = 0.75,
            min_community_size: int = 10, seed: int = 0) -> np.ndarray:
    """A cluster label per row: ``community`` (rows in no community get -1) or ``kmeans`` (needs ``k``).

    Community labels are 0 for the largest community, 1 for the next, and so on.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    x = unit_rows(vectors)
    if method == "kmeans":
        if k is None:
            raise ValueError("method='kmeans' needs k (the number of clusters)")
        return kmeans(x, k, seed=seed)[0]
    labels = np.full(x.shape[0], -1, dtype=np.int64)
    for c, members in enumerate(community_detection(x, threshold, min_community_size)):
        labels[members] = c
    return labels


def describe_clusters(vectors, labels: np.ndarray, texts: list[str] | None = None, *, top_texts: int = 5,
                      top_words: int = 8) -> list[dict]:
    """One summary per cluster (label >= 0), largest first.

    Each: ``{"cluster", "size", "members" (row ids), "central" (row ids of the ``top_texts`` rows closest
    to the cluster's mean direction), "texts" (their texts, when given), "keywords" (c-TF-IDF, when texts
    are given)}``.
    """
    x = unit_rows(vectors)
    labels = np.asarray(labels)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have one entry per row ({x.shape[0]}), got shape {labels.shape}")
    if texts is not None and len(texts) != x.shape[0]:
        raise ValueError(f"texts must have one entry per row ({x.shape[0]}), got {len(texts)}")
    words = class_tfidf_keywords(texts, labels, top_words) if texts is not None else {}
    out = []
    for c in sorted({int(v) for v in labels.tolist() if v >= 0}):
        members = np.flatnonzero(labels == c)
        centre = x[members].mean(axis=0)
        closeness = x[members] @ centre
        central = members[np.argsort(-closeness, kind="stable")[:top_texts]]
        item = {"cluster": c, "size": int(members.size), "members": members.tolist(), "central": central.tolist()}
        if texts is not None:
            item["texts"] = [texts[i] for i in central]
            item["keywords"] = words.get(c, [])
        out.append(item)
    out.sort(key=lambda d: (-d["size"], d["cluster"]))
    return out
