"""Tokenization with Hugging Face ``tokenizers``: truncation (flagged), padding, token counts.

The tokenizer.json of many sentence-transformers models has fixed padding and
truncation at 128 built in; we always override both: no padding at encode time
(we pad each length-sorted batch to its own longest row), truncation at the
model's ``max_seq_length`` (special tokens included), as sentence-transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class InputTooLongError(ValueError):
    """An input has more tokens than the model takes and truncation was refused (``truncate=False``)."""


@dataclass
class Tokenized:
    """Token ids of a list of texts, unpadded.

    Attributes:
        ids: one list of token ids per text (after truncation).
        lengths: (n,) int64 tokens per text after truncation, special tokens included.
        truncated: (n,) bool, True where the text was cut at max_seq_length.
    """

    ids: list[list[int]]
    lengths: np.ndarray
    truncated: np.ndarray


class TextTokenizer:
    """Wraps one ``tokenizers.Tokenizer``; thread-safe (its settings are fixed at construction).

    Args:
        tokenizer_file: path to tokenizer.json.
        max_seq_length: truncation length in tokens, special tokens included.
        input_names: the ONNX model's inputs (``token_type_ids`` is fed when listed).
        padding_side: "right", or "left" for decoder models.
        do_lower_case: lower-case texts first (sentence_bert_config.json's flag).
        pad_token_id: id used for padding; read from the tokenizer when None.
    """

    def __init__(self, tokenizer_file: str | Path, max_seq_length: int, input_names: list[str], *,
                 padding_side: str = "right", do_lower_case: bool = False, pad_token_id: int | None = None):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        self.max_seq_length = max_seq_length
        self.input_names = list(input_names)
        self.padding_side = padding_side
        self.do_lower_case = do_lower_case
        self.pad_token_id = self._find_pad_id() if pad_token_id is None else pad_token_id

    def _find_pad_id(self) -> int:
        pad = self.tokenizer.padding
        if pad and pad.get("pad_id") is not None:
            return int(pad["pad_id"])
        for tok in ("[PAD]", "<pad>", "<|endoftext|>", "<|pad|>"):
            tid = self.tokenizer.token_to_id(tok)
            if tid is not None:
                return int(tid)
        return 0

    def tokenize(self, texts: list[str], *, truncate: bool = True) -> Tokenized:
        """Tokenize texts (already validated strings) without padding.

        Raises InputTooLongError naming the first over-long input when ``truncate`` is False.
        """
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        ids = [e.ids for e in encodings]
        lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        # A text reached the limit: it was cut if the tokenizer kept an overflow.
        truncated = np.zeros(len(ids), dtype=bool)
        for i in np.flatnonzero(lengths >= self.max_seq_length):
            truncated[i] = len(encodings[i].overflowing) > 0
        if not truncate and truncated.any():
            first = int(np.flatnonzero(truncated)[0])
            raise InputTooLongError(f"input {first} has more than max_seq_length={self.max_seq_length} tokens "
                                    f"({int(truncated.sum())} inputs are too long); pass truncate=True to cut them")
        return Tokenized(ids=ids, lengths=lengths, truncated=truncated)

    def count_tokens(self, texts: list[str]) -> np.ndarray:
        """Tokens each text would feed the model (after truncation), special tokens included."""
        return self.tokenize(texts).lengths

    def pad(self, ids: list[list[int]], rows: np.ndarray) -> dict[str, np.ndarray]:
        """ONNX feeds for the texts ``rows`` (indices into ``ids``), padded to their longest.

        Returns input_ids and attention_mask (batch, seq_len) int64, plus
        token_type_ids (zeros) when the model takes them.
        """
        width = int(max((len(ids[r]) for r in rows), default=0)) or 1
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        left = self.padding_side == "left"
        for j, r in enumerate(rows):
            seq = ids[r]
            n = len(seq)
            if left:
                input_ids[j, width - n:] = seq
                mask[j, width - n:] = 1
            else:
                input_ids[j, :n] = seq
                mask[j, :n] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        return feeds
