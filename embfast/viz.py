"""``embfast viz``: a 2-D map of embeddings (PCA, UMAP or t-SNE), coloured by label or by cluster, as a PNG
and as an interactive HTML page.

``embfast viz EMBEDDINGS [--method pca|umap|tsne] [--color-by label|cluster] [--labels FILE] [--texts FILE]
-o map.png [--html map.html]``: EMBEDDINGS is what ``embfast encode`` writes (.npy, .parquet or .jsonl);
labels come from a text file (one label per line, one line per row) or a field of a .parquet / .jsonl input
(``--label-field``); ``--color-by cluster`` colours by community detection (or k-means with ``--k``) and
names each cluster by its c-TF-IDF words when texts are given. More than ``--max-points`` rows are
subsampled (fixed seed). The HTML page (plotly, its JavaScript embedded, so it opens offline) shows each
point's text on hover and zooms.

Projections: PCA (NumPy SVD), UMAP (umap-learn, cosine metric) and t-SNE (scikit-learn, cosine metric,
PCA initialisation); the last two need ``pip install 'embfast[apps]'``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from embfast.text import lone_surrogate, read_lines, surrogate_reason

MAX_COLOURS = 20
METHODS = ("pca", "umap", "tsne")
GREY_GROUPS = ("other", "none")  # labels drawn in grey: the rest of the labels, rows in no cluster


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows onto their first two principal components.

    Args:
        x: (n, dim) float, n >= 1.

    Returns:
        points (n, 2) float64, and the fraction of variance each component explains (2,)
        (zeros when all rows are equal). A dim of 1 gives a zero second coordinate.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be 2-D with at least one row, got shape {x.shape}")
    centered = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    comps = vt[:2]
    pts = centered @ comps.T
    if pts.shape[1] < 2:
        pts = np.hstack([pts, np.zeros((pts.shape[0], 2 - pts.shape[1]))])
    var = s**2
    frac = var[:2] / var.sum() if var.sum() > 0 else np.zeros(min(2, var.size))
    return pts, np.pad(frac, (0, 2 - frac.size))


def read_labels(path: str | Path, n: int, field: str | None = None) -> list[str]:
    """Labels for ``n`` rows: a text file (one per line), or ``field`` of a .jsonl / .parquet file."""
    path = Path(path)
    if field is not None and path.suffix.lower() == ".parquet":
        from embfast.io import _pyarrow

        _, pq = _pyarrow()
        labels = [str(v) for v in pq.read_table(path, columns=[field]).column(0).to_pylist()]
    elif field is not None:
        labels = []
        for lineno, line in enumerate(read_lines(path), 1):
            try:
                labels.append(str(json.loads(line)[field]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with field {field!r} ({exc})") from exc
    else:
        labels = read_lines(path)
    for lineno, label in enumerate(labels, 1):  # matplotlib cannot draw a lone surrogate
        pos = lone_surrogate(label)
        if pos >= 0:
            raise ValueError(f"{path}:{lineno}: {surrogate_reason(label, pos)}")
    if len(labels) != n:
        raise ValueError(f"labels must have one entry per embedding row ({n}), got {len(labels)} in {path}")
    return labels


def project_2d(x: np.ndarray, method: str = "pca", *, seed: int = 0) -> tuple[np.ndarray, str, str]:
    """(n, 2) float64 map coordinates of the rows of ``x`` (n, dim), and the two axis titles.

    ``pca``: :func:`pca_2d`; ``umap``: umap-learn (cosine, 15 neighbours, min_dist 0.1); ``tsne``:
    scikit-learn's TSNE (cosine, PCA init, perplexity min(30, n - 1)). ``seed`` makes each repeatable.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be 2-D with at least one row, got shape {x.shape}")
    if method == "pca" or x.shape[0] < 4:
        pts, frac = pca_2d(x)
        return pts, f"PC1 ({100 * frac[0]:.1f}% of variance)", f"PC2 ({100 * frac[1]:.1f}% of variance)"
    if method == "umap":
        try:
            import umap
        except ImportError as exc:
            raise ImportError("--method umap needs umap-learn: pip install 'embfast[apps]'") from exc
        reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=min(15, x.shape[0] - 1), min_dist=0.1,
                            random_state=seed, n_jobs=1)  # a seed makes umap-learn serial anyway
        return np.asarray(reducer.fit_transform(x), dtype=np.float64), "UMAP 1", "UMAP 2"
    from sklearn.manifold import TSNE

    tsne = TSNE(n_components=2, metric="cosine", init="pca", perplexity=float(min(30, x.shape[0] - 1)),
                random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float64), "t-SNE 1", "t-SNE 2"


def _groups(labels: list[str]) -> tuple[list[str], np.ndarray]:
    """The ``MAX_COLOURS - 1`` most frequent labels (+ "other") and each point's group index."""
    top = [k for k, _ in Counter(labels).most_common(MAX_COLOURS - 1)]
    groups = top + (["other"] if len(set(labels)) > len(top) else [])
    where = {g: j for j, g in enumerate(top)}
    other = len(top)
    return groups, np.asarray([where.get(v, other) for v in labels], dtype=np.int64)


def plot_embeddings(x: np.ndarray, output: str | Path | None, labels: list[str] | None = None, *,
                    max_points: int = 20000, title: str | None = None, seed: int = 0, method: str = "pca",
                    hover: list[str] | None = None, html: str | Path | None = None) -> dict:
    """Draw the 2-D map of ``x`` (n, dim) into ``output`` (PNG) and/or ``html`` (interactive page).

    Args:
        labels: one per row; the ``MAX_COLOURS - 1`` most frequent get their own colour, the rest are "other".
        max_points: subsample (fixed ``seed``) above this many rows (default 20,000).
        method: pca | umap | tsne (:func:`project_2d`).
        hover: one text per row, shown on hover in the HTML page (cut at 300 characters).
        html: write a self-contained plotly page here (its JavaScript embedded: it opens offline).

    Returns:
        {"points", "method", "groups", "explained" (PCA only)}.
    """
    x = np.asarray(x)
    for name, col in (("labels", labels), ("hover", hover)):
        if col is not None and len(col) != x.shape[0]:
            raise ValueError(f"{name} must have one entry per row ({x.shape[0]}), got {len(col)}")
    if output is None and html is None:
        raise ValueError("give an output PNG, an html page, or both")
    idx = np.arange(x.shape[0])
    if x.shape[0] > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False))
    pts, xlabel, ylabel = project_2d(x[idx], method, seed=seed)
    lab = None if labels is None else [str(labels[i]) for i in idx]
    groups, gid = _groups(lab) if lab is not None else ([], np.zeros(len(idx), np.int64))
    title = title or f"{method.upper() if method != 'tsne' else 't-SNE'} map of {len(idx)} embeddings"
    if output is not None:
        _png(pts, groups, gid, output, title, xlabel, ylabel, lab is not None)
    if html is not None:
        texts = None if hover is None else [hover[i] for i in idx]
        _html(pts, groups, gid, html, title, xlabel, ylabel, texts, lab is not None)
    out = {"points": int(len(idx)), "method": method, "groups": len(groups)}
    if method == "pca":
        out["explained"] = [float(v) for v in pca_2d(x[idx])[1]]
    return out


def _png(pts, groups, gid, output, title, xlabel, ylabel, coloured: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    if not coloured:
        ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.6)
    else:
        cmap = plt.get_cmap("tab20")
        for j, g in enumerate(groups):  # "other" and "none" (unclustered) in grey, under the coloured groups
            mask = gid == j
            grey = g in GREY_GROUPS
            ax.scatter(pts[mask, 0], pts[mask, 1], s=3 if grey else 4, alpha=0.35 if grey else 0.75,
                       color="lightgrey" if grey else cmap(j % 20), label=str(g)[:40], zorder=1 if grey else 2)
        ax.legend(fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def _html(pts, groups, gid, path, title, xlabel, ylabel, texts, coloured: bool) -> None:
    try:
        import plotly.graph_objects as go
    except ImportError as exc:
        raise ImportError("--html needs plotly: pip install 'embfast[apps]'") from exc
    fig = go.Figure()
    names = groups if coloured else ["points"]
    for j, g in enumerate(names):
        mask = gid == j
        hover = None if texts is None else [texts[i] if len(texts[i]) <= 300 else texts[i][:297] + "..."
                                            for i in np.flatnonzero(mask)]
        marker = {"size": 4, "opacity": 0.75, **({"color": "lightgrey"} if g in GREY_GROUPS else {})}
        fig.add_trace(go.Scatter(x=pts[mask, 0], y=pts[mask, 1], mode="markers", name=str(g)[:60], marker=marker,
                                 text=hover, hoverinfo="text+name" if hover is not None else "name"))
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title=ylabel, template="plotly_white",
                      legend={"itemsizing": "constant"}, width=1100, height=800)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def cmd_viz(args) -> int:
    from embfast.io import load_vectors

    x = load_vectors(args.embeddings)
    if x.shape[0] == 0:
        raise ValueError(f"{args.embeddings} holds no rows to plot")
    labels = None
    if args.labels or args.label_field:
        labels = read_labels(args.labels or args.embeddings, x.shape[0], args.label_field)
    texts = read_labels(args.texts, x.shape[0]) if args.texts else None
    if args.color_by == "none":
        labels = None
    elif args.color_by == "cluster":
        if labels is not None:
            raise ValueError("--color-by cluster colours by cluster: leave out --labels / --label-field")
        labels = cluster_labels(x, texts, method=args.cluster_method, k=args.k, threshold=args.threshold,
                                min_community_size=args.min_community_size)
    elif args.color_by == "label" and labels is None:
        raise ValueError("--color-by label needs --labels FILE or --label-field FIELD")
    if args.output is None and args.html is None:
        raise ValueError("give -o map.png, --html map.html, or both")
    res = plot_embeddings(x, args.output, labels, max_points=args.max_points, title=args.title, method=args.method,
                          hover=texts if texts is not None else labels, html=args.html)
    wrote = " and ".join(str(p) for p in (args.output, args.html) if p)
    extra = (f": PC1 {100 * res['explained'][0]:.1f}% and PC2 {100 * res['explained'][1]:.1f}% of variance"
             if "explained" in res else "")
    print(f"wrote {wrote}: {res['points']} points ({res['method']}, {res['groups']} colours){extra}")
    return 0


def cluster_labels(x: np.ndarray, texts: list[str] | None, *, method: str = "community", k: int | None = None,
                   threshold: float = 0.75, min_community_size: int = 10) -> list[str]:
    """One display label per row: "3: word word word" (cluster number and its c-TF-IDF words), or "none"."""
    from embfast.clustering import class_tfidf_keywords, cluster

    ids = cluster(x, method=method, k=k, threshold=threshold, min_community_size=min_community_size)
    words = class_tfidf_keywords(texts, ids, top_n=3) if texts is not None else {}
    names = {c: f"{c}: {' '.join(words.get(c, []))}".strip() for c in set(ids.tolist()) if c >= 0}
    return [names[c] if c >= 0 else "none" for c in ids.tolist()]


def register_cli(sub) -> None:
    """Add ``embfast viz``."""
    s = sub.add_parser("viz", help="draw a 2-D map of embeddings (PNG and interactive HTML)")
    s.add_argument("embeddings", help="vectors from embfast encode: .npy, .parquet or .jsonl")
    s.add_argument("--method", choices=METHODS, default="pca", help="projection (default pca)")
    s.add_argument("--color-by", choices=["none", "label", "cluster"], default=None,
                   help="colour by --labels (default when given) or by cluster")
    s.add_argument("--labels", default=None, help="labels: a text file with one line per row, or a .jsonl/.parquet "
                                                  "with --label-field")
    s.add_argument("--label-field", default=None,
                   help="take labels from this field (of --labels, or of EMBEDDINGS itself when no --labels)")
    s.add_argument("--texts", default=None, help="a text file, one text per row: hover text and cluster words")
    s.add_argument("--cluster-method", choices=["community", "kmeans"], default="community")
    s.add_argument("--k", type=int, default=None, help="clusters for --cluster-method kmeans")
    s.add_argument("--threshold", type=float, default=0.75, help="community detection threshold (default 0.75)")
    s.add_argument("--min-community-size", type=int, default=10, help="smallest community (default 10)")
    s.add_argument("-o", "--output", default=None, help="the PNG to write")
    s.add_argument("--html", default=None, help="an interactive HTML page to write (plotly, opens offline)")
    s.add_argument("--max-points", type=int, default=20000, help="subsample above this many rows (default 20000)")
    s.add_argument("--title", default=None)
    s.set_defaults(func=cmd_viz)
