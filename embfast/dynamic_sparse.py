"""The sparse-encoder callers of :class:`~embfast.DynamicBatcher` (a mixin, so dynamic.py stays one concern).

The worker runs :meth:`SparseEncoder.embed_token_ids <embfast.SparseEncoder.embed_token_ids>` (the graph
pools: (rows, vocab) float32 SPLADE weights come back); each caller turns its own rows into a
``scipy.sparse.csr_array`` (with ``max_active_dims``) in its own thread.
"""

from __future__ import annotations

import time

from embfast.encoder import EncodeInfo, as_text_list
from embfast.tokenization import Tokenized


class SparseCalls:
    """``encode_sparse`` / ``encode_sparse_async`` for a batcher over a :class:`~embfast.SparseEncoder`."""

    def encode_sparse(self, sentences, *, max_active_dims: int | None = None, prompt: str | None = None,
                      prompt_name: str | None = None, truncate: bool = True, return_info: bool = False,
                      timeout: float | None = None):
        """:meth:`SparseEncoder.encode <embfast.SparseEncoder.encode>`, batched with other callers; blocks.

        Returns a ``scipy.sparse.csr_array`` (n, vocab_size) (a str: one row); with ``return_info``
        (vectors, info). Raises as :meth:`encode` (TypeError for a batcher over another kind).
        """
        t0 = time.perf_counter()
        texts, prefix, k = self._prepare_sparse(sentences, max_active_dims, prompt, prompt_name, truncate, timeout)
        if not texts:
            return self.embedder.encode([], return_info=return_info)
        rows, (tok, _) = self._submit_wait(lambda: self._tokenize(texts, prefix, truncate), timeout, "encode_sparse")
        return self._finish_sparse(rows, tok, k, return_info, t0)

    async def encode_sparse_async(self, sentences, *, max_active_dims: int | None = None, prompt: str | None = None,
                                  prompt_name: str | None = None, truncate: bool = True, return_info: bool = False,
                                  timeout: float | None = None):
        """The coroutine form of :meth:`encode_sparse` (same arguments, results and errors)."""
        t0 = time.perf_counter()
        texts, prefix, k = self._prepare_sparse(sentences, max_active_dims, prompt, prompt_name, truncate, timeout)
        if not texts:
            return self.embedder.encode([], return_info=return_info)
        chars = sum(map(len, texts)) + len(prefix) * len(texts)
        rows, (tok, _) = await self._submit_wait_async(lambda: self._tokenize(texts, prefix, truncate), chars,
                                                       timeout, "encode_sparse_async")
        return self._finish_sparse(rows, tok, k, return_info, t0)

    def _prepare_sparse(self, sentences, max_active_dims, prompt, prompt_name, truncate, timeout):
        from embfast.sparse_encoder import _check_max_active_dims

        self._require("sparse-encoder", "encode_sparse")
        texts, _ = as_text_list(sentences)
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate must be a bool, got {type(truncate).__name__}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
        k = _check_max_active_dims(max_active_dims) if max_active_dims is not None else self.embedder.max_active_dims
        return texts, self.embedder._prompt_text(prompt, prompt_name), k

    def _finish_sparse(self, rows, tok: Tokenized, k, return_info: bool, t0: float):
        out = self.embedder.postprocess(rows, max_active_dims=k)
        return (out, EncodeInfo(tok.lengths, tok.truncated, time.perf_counter() - t0)) if return_info else out
