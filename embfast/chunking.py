"""Token-bounded chunking of long documents for retrieval (``embfast encode --chunk-tokens``).

:class:`Chunker` splits a text into overlapping windows of at most ``chunk_tokens`` word-pieces, on word
boundaries where it can, with each chunk's character span so that ``text[start:end]`` is the chunk.
"""

from __future__ import annotations


class Chunker:
    """Split long documents into overlapping windows of at most ``chunk_tokens`` word-pieces.

    Windows never start or end inside a word when a word boundary is available (a
    word longer than the window is cut). Every chunk re-tokenizes to at most
    ``chunk_tokens`` pieces: each window is checked by tokenizing its text, and shrunk
    by a token while it does not fit (a cut inside a word can re-tokenize to more pieces
    than it spanned: a continuation piece "##xyz" becomes a word start); a single piece
    that alone does not fit is cut by characters. The only exception is one character
    that alone needs more than ``chunk_tokens`` pieces (a byte-level vocabulary may give a
    character up to 4), which becomes a chunk of its own. Consecutive windows share about
    ``overlap`` tokens.

    Args:
        embedder: the Embedder whose tokenizer counts the tokens.
        chunk_tokens: tokens per chunk, special tokens not counted; at most the model's
            max_seq_length minus its special tokens (e.g. 254 for 256 with [CLS] and [SEP]).
        overlap: tokens shared by consecutive chunks, 0 <= overlap < chunk_tokens.
    """

    def __init__(self, embedder, chunk_tokens: int, overlap: int = 0):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(embedder.tokenizer.tokenizer.to_str())  # a private copy: no truncation
        tok.no_truncation()
        tok.no_padding()
        specials = len(tok.encode("", add_special_tokens=True).ids)
        limit = embedder.max_seq_length - specials
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or not 1 <= chunk_tokens <= limit:
            raise ValueError(f"chunk_tokens must be an int in [1, {limit}] (max_seq_length {embedder.max_seq_length} "
                             f"minus {specials} special tokens), got {chunk_tokens!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < chunk_tokens:
            raise ValueError(f"chunk_overlap must be an int in [0, {chunk_tokens - 1}] (less than chunk_tokens), "
                             f"got {overlap!r}")
        self.tokenizer = tok
        self.chunk_tokens, self.overlap = chunk_tokens, overlap
        self.lower = embedder.tokenizer.do_lower_case

    def _pieces(self, text: str, start: int, end: int) -> int:
        """Pieces that ``text[start:end]`` re-tokenizes to (no special tokens)."""
        chunk = text[start:end]
        if self.lower and len(chunk.lower()) == len(chunk):
            chunk = chunk.lower()
        return len(self.tokenizer.encode(chunk, add_special_tokens=False).ids)

    def _fit_chars(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        """Spans covering ``text[start:end]``, each as many characters as fit in ``chunk_tokens`` pieces."""
        out = []
        while start < end:
            if self._pieces(text, start, end) <= self.chunk_tokens:
                out.append((start, end))
                break
            lo, hi = start + 1, end - 1  # the longest prefix that fits (at least one character)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._pieces(text, start, mid) <= self.chunk_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            out.append((start, lo))
            start = lo
        return out

    def split(self, text: str) -> list[tuple[int, int]]:
        """Character spans ``(start, end)`` of the chunks of ``text``, in order; ``text[start:end]`` is the chunk.

        A text with no tokens (e.g. only control characters) is one chunk ``(0, len(text))``.
        """
        enc = self.tokenizer.encode(text.lower() if self.lower and len(text.lower()) == len(text) else text,
                                    add_special_tokens=False)
        offsets, words = enc.offsets, enc.word_ids
        n = len(offsets)
        if n == 0:
            return [(0, len(text))]
        spans: list[tuple[int, int]] = []
        start = 0
        while True:
            end = min(start + self.chunk_tokens, n)
            if end < n and words[end] is not None and words[end] == words[end - 1]:
                cut = end - 1
                while cut > start and words[cut] == words[end]:
                    cut -= 1
                if cut > start:  # else one word fills the window: cut inside it
                    end = cut + 1
            while end > start + 1 and self._pieces(text, offsets[start][0], offsets[end - 1][1]) > self.chunk_tokens:
                end -= 1
            if end == start + 1:
                spans.extend(self._fit_chars(text, offsets[start][0], offsets[start][1]))
            else:
                spans.append((offsets[start][0], offsets[end - 1][1]))
            if end >= n:
                return spans
            nxt = max(end - self.overlap, start + 1)
            if words[nxt] is not None and words[nxt] == words[nxt - 1]:  # mid-word: back to the word's start
                back = nxt
                while back > start + 1 and words[back] == words[back - 1]:
                    back -= 1
                if words[back] != words[back - 1]:
                    nxt = back
                else:  # the word reaches back to ``start``: go forward to the next word instead
                    fwd = nxt
                    while fwd < end and words[fwd] == words[fwd - 1]:
                        fwd += 1
                    nxt = fwd if fwd < end else nxt
            start = nxt
