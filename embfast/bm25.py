"""BM25 as a sparse model with no network: term weights from ``bm25s`` behind SparseEncoder's interface.

Where a user has no SPLADE model, BM25 (Robertson & Zaragoza, "The probabilistic relevance framework:
BM25 and beyond", 2009) gives sparse document vectors whose dot product with a query's term vector
is the query's BM25 score, so :func:`embfast.sparse_search`, :mod:`embfast.hybrid` and
``embfast eval retrieval --sparse bm25`` take it as they take a SparseEncoder. Tokenization
(lower-casing, English stopwords, optional Snowball stemming through PyStemmer) and the weights
(``method="lucene"``: ``idf = log(1 + (N - df + 0.5) / (df + 0.5))`` times
``tf / (tf + k1 * (1 - b + b * dl / avgdl))``) are bm25s' own (Lù, "BM25S", 2024, arXiv:2407.03618);
``pip install 'embfast[bm25]'``.

BM25 weights depend on the corpus (document frequencies, average length): :meth:`BM25Encoder.encode_document`
fits them on the documents it is given (all at once) and :meth:`encode_query` then gives each distinct
known query term weight 1 (unknown terms are dropped).
"""

from __future__ import annotations

import numpy as np

from embfast.encoder import EncodeInfo, as_text_list

__all__ = ["BM25Encoder", "load_sparse_model"]


class BM25Encoder:
    """BM25 term weights as sparse vectors (bm25s), with ``encode_document`` / ``encode_query``.

    Args:
        k1: term-frequency saturation (default 1.5). b: length normalization (default 0.75).
        method: bm25s' variant: "lucene" (default), "robertson", "atire", "bm25l", "bm25+".
        stopwords: "en" (default) or None or a list of words. stemmer: "english" (needs PyStemmer) or None
            (default: no stemming).

    Raises:
        ImportError: bm25s is not installed.
    """

    name = "bm25"
    precision = "n/a"
    device = "cpu"

    def __init__(self, *, k1: float = 1.5, b: float = 0.75, method: str = "lucene", stopwords="en",
                 stemmer: str | None = None):
        try:
            import bm25s  # noqa: F401
        except ImportError as exc:
            raise ImportError("BM25 needs bm25s: pip install 'embfast[bm25]'") from exc
        self.k1, self.b, self.method, self.stopwords = k1, b, method, stopwords
        self._stemmer = None
        if stemmer is not None:
            try:
                import Stemmer
            except ImportError as exc:
                raise ImportError("stemming needs PyStemmer: pip install PyStemmer") from exc
            self._stemmer = Stemmer.Stemmer(stemmer).stemWords
        self._tokenizer = None
        self.vocab_size = 0

    def __repr__(self) -> str:
        return f"BM25Encoder(k1={self.k1}, b={self.b}, method={self.method!r}, vocab_size={self.vocab_size})"

    def _new_tokenizer(self):
        from bm25s.tokenization import Tokenizer

        return Tokenizer(stopwords=self.stopwords, stemmer=self._stemmer)

    def encode_document(self, sentences, batch_size: int = 32, *, return_info: bool = False, **_):
        """Fit BM25 on these documents and return their weights: ``csr_array`` (n, vocab_size) float32.

        ``batch_size`` is accepted for interface parity and unused. Fitting replaces any previous fit.
        """
        import bm25s
        import scipy.sparse as sp

        texts, _ = as_text_list(sentences)
        self._tokenizer = self._new_tokenizer()
        ids = self._tokenizer.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False)
        vocab = self._tokenizer.get_vocab_dict()
        self.vocab_size = max(vocab.values(), default=-1) + 1
        retriever = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        retriever.index(bm25s.tokenization.Tokenized(ids=ids, vocab=vocab), show_progress=False)
        s = retriever.scores
        width = len(s["indptr"]) - 1
        m = sp.csc_array((s["data"].astype(np.float32), s["indices"], s["indptr"]),
                         shape=(int(s["num_docs"]), width)).tocsr()
        m.resize((len(texts), self.vocab_size))
        m.sort_indices()
        lengths = np.array([len(t) for t in ids], np.int64)
        return (m, EncodeInfo(lengths, np.zeros(len(texts), bool), 0.0)) if return_info else m

    def encode_query(self, sentences, batch_size: int = 32, **_):
        """Term vectors of queries: weight 1 per distinct term known to the fitted corpus; ``csr_array``
        (n, vocab_size) float32. Raises RuntimeError before :meth:`encode_document`."""
        import scipy.sparse as sp

        if self._tokenizer is None:
            raise RuntimeError("BM25 has no corpus yet: call encode_document(corpus) first (BM25 weights depend on "
                               "the corpus' statistics)")
        texts, _ = as_text_list(sentences)
        vocab = self._tokenizer.get_vocab_dict()
        rows, cols = [], []
        for r, tokens in enumerate(self._tokenizer.tokenize(texts, update_vocab=False, return_as="string",
                                                            show_progress=False)):
            known = sorted({vocab[t] for t in tokens if t in vocab and t != ""})
            rows.extend([r] * len(known))
            cols.extend(known)
        data = np.ones(len(rows), np.float32)
        return sp.csr_array((data, (np.array(rows, np.int64), np.array(cols, np.int64))),
                            shape=(len(texts), self.vocab_size))

    encode = encode_query


def load_sparse_model(name: str, **kwargs):
    """``"bm25"`` -> :class:`BM25Encoder`; anything else -> :class:`~embfast.SparseEncoder` (``kwargs``:
    device, precision, threads)."""
    if name == "bm25":
        return BM25Encoder()
    from embfast.sparse_encoder import SparseEncoder

    return SparseEncoder(name, **kwargs)
