"""``embfast viz``: a 2-D PCA map of embeddings, coloured by label, for a quick look.

``embfast viz EMBEDDINGS [--labels FILE] -o plot.png``: EMBEDDINGS is what
``embfast encode`` writes (.npy, .parquet or .jsonl); labels come from a text file
(one label per line, one line per row) or a field of a .parquet / .jsonl input
(``--label-field``). More than ``--max-points`` rows are subsampled (fixed seed).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from embfast.text import lone_surrogate, read_lines, surrogate_reason

MAX_COLOURS = 20


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


def plot_embeddings(x: np.ndarray, output: str | Path, labels: list[str] | None = None, *,
                    max_points: int = 20000, title: str | None = None, seed: int = 0) -> dict:
    """Draw the PCA map of ``x`` (n, dim) into ``output`` (PNG); returns {"points", "explained"}.

    The ``MAX_COLOURS - 1`` most frequent labels get their own colour, the rest are "other".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(x)
    if labels is not None and len(labels) != x.shape[0]:
        raise ValueError(f"labels must have one entry per row ({x.shape[0]}), got {len(labels)}")
    idx = np.arange(x.shape[0])
    if x.shape[0] > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False))
    pts, frac = pca_2d(x[idx])
    fig, ax = plt.subplots(figsize=(7, 6))
    if labels is None:
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6)
    else:
        lab = [labels[i] for i in idx]
        top = [k for k, _ in Counter(lab).most_common(MAX_COLOURS - 1)]
        groups = top + (["other"] if len(set(lab)) > len(top) else [])
        cmap = plt.get_cmap("tab20")
        arr = np.asarray(lab, dtype=object)
        for j, g in enumerate(groups):
            mask = ~np.isin(arr, top) if g == "other" and g not in top else arr == g
            ax.scatter(pts[mask, 0], pts[mask, 1], s=6, alpha=0.7, color=cmap(j % 20), label=str(g)[:30])
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_xlabel(f"PC1 ({100 * frac[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * frac[1]:.1f}% of variance)")
    ax.set_title(title or f"PCA of {len(idx)} embeddings")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return {"points": int(len(idx)), "explained": [float(f) for f in frac]}


def cmd_viz(args) -> int:
    from embfast.io import load_vectors

    x = load_vectors(args.embeddings)
    if x.shape[0] == 0:
        raise ValueError(f"{args.embeddings} holds no rows to plot")
    labels = None
    if args.labels or args.label_field:
        labels = read_labels(args.labels or args.embeddings, x.shape[0], args.label_field)
    res = plot_embeddings(x, args.output, labels, max_points=args.max_points, title=args.title)
    print(f"wrote {args.output}: {res['points']} points, PC1 {100 * res['explained'][0]:.1f}% and "
          f"PC2 {100 * res['explained'][1]:.1f}% of variance")
    return 0


def register_cli(sub) -> None:
    """Add ``embfast viz``."""
    s = sub.add_parser("viz", help="draw a 2-D PCA map of embeddings (PNG)")
    s.add_argument("embeddings", help="vectors from embfast encode: .npy, .parquet or .jsonl")
    s.add_argument("--labels", default=None, help="labels: a text file with one line per row, or a .jsonl/.parquet "
                                                  "with --label-field")
    s.add_argument("--label-field", default=None,
                   help="take labels from this field (of --labels, or of EMBEDDINGS itself when no --labels)")
    s.add_argument("-o", "--output", required=True, help="the PNG to write")
    s.add_argument("--max-points", type=int, default=20000, help="subsample above this many rows (default 20000)")
    s.add_argument("--title", default=None)
    s.set_defaults(func=cmd_viz)
