"""Tokenization with Hugging Face ``tokenizers``: truncation (flagged), padding, token counts.

The tokenizer.json of many sentence-transformers models has fixed padding and
truncation at 128 built in; we always override both: no padding at encode time
(we pad each length-sorted batch to its own longest row), truncation at the
model's ``max_seq_length`` (special tokens included), as sentence-transformers does.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, normalizers


def _has_lowercase(spec: dict | None) -> bool:
    """True when a tokenizer.json normalizer is Lowercase or a Sequence holding one (sentence-transformers' test)."""
    if not spec:
        return False
    if spec.get("type") == "Lowercase":
        return True
    return spec.get("type") == "Sequence" and any(n.get("type") == "Lowercase" for n in spec.get("normalizers", []))


class InputTooLongError(ValueError):
    """An input has more tokens than the model takes and truncation was refused (``truncate=False``)."""


@dataclass
class Tokenized:
    """Token ids of a list of texts, unpadded.

    Attributes:
        ids: one list of token ids per text (after truncation).
        lengths: (n,) int64 tokens per text after truncation, special tokens included.
        truncated: (n,) bool, True where the text was cut at max_seq_length.
        type_ids: one list of segment ids per input (0 for the first text of a pair, 1 for the second, as
            the tokenizer's post-processor says), or None: all zeros. Only kept for pairs fed to a model
            that takes ``token_type_ids``.
    """

    ids: list[list[int]]
    lengths: np.ndarray
    truncated: np.ndarray
    type_ids: list[list[int]] | None = None


class TextTokenizer:
    """Wraps one ``tokenizers.Tokenizer``; thread-safe (its settings are fixed at construction).

    Args:
        tokenizer_file: path to tokenizer.json.
        max_seq_length: truncation length in tokens, special tokens included.
        input_names: the ONNX model's inputs (``token_type_ids`` is fed when listed).
        padding_side: "right", or "left" for decoder models.
        do_lower_case: lower-case texts first (sentence_bert_config.json's flag), with a Lowercase
            normalizer in front of the tokenizer's own, as sentence-transformers does.
        pad_token_id: id used for padding; read from the tokenizer when None.
    """

    def __init__(self, tokenizer_file: str | Path, max_seq_length: int, input_names: list[str], *,
                 padding_side: str = "right", do_lower_case: bool = False, pad_token_id: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        self.max_seq_length = max_seq_length
        self.input_names = list(input_names)
        self.padding_side = padding_side
        self.do_lower_case = do_lower_case
        spec = json.loads(self.tokenizer.to_str())
        if do_lower_case and not _has_lowercase(spec.get("normalizer")):
            # as sentence-transformers: a Lowercase normalizer in front (str.lower() differs on a few characters)
            existing = self.tokenizer.normalizer
            self.tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase()]
                                                             + ([existing] if existing is not None else []))
        self.special_ids = frozenset(int(t["id"]) for t in spec.get("added_tokens") or () if t.get("special"))
        self.pad_token_id = self._find_pad_id() if pad_token_id is None else pad_token_id
        self._prompt_lengths: dict[str, int] = {}
        self._left: Tokenizer | None = None  # a copy that cuts from the start, made on first use
        self._lock = threading.Lock()

    def _find_pad_id(self) -> int:
        pad = self.tokenizer.padding
        if pad and pad.get("pad_id") is not None:
            return int(pad["pad_id"])
        for tok in ("[PAD]", "<pad>", "<|endoftext|>", "<|pad|>"):
            tid = self.tokenizer.token_to_id(tok)
            if tid is not None:
                return int(tid)
        return 0

    def prompt_length(self, prompt: str) -> int:
        """Tokens of ``prompt`` to leave out of pooling when the model says ``include_prompt: false``.

        sentence-transformers' count: the prompt tokenized alone with special tokens
        (so a leading [CLS] / <s> counts as prompt), minus a trailing special token
        ([SEP], </s>, EOS) since that one ends the prompt, not the text. 0 for "".
        """
        if not prompt:
            return 0
        n = self._prompt_lengths.get(prompt)
        if n is None:
            ids = self.tokenizer.encode(prompt, add_special_tokens=True).ids
            n = len(ids) - (1 if ids and ids[-1] in self.special_ids else 0)
            self._prompt_lengths[prompt] = n
        return n

    def _cutting_from(self, side: str) -> Tokenizer:
        """The tokenizer that truncates from ``side`` ("right": keep the start; "left": keep the end)."""
        if side == "right":
            return self.tokenizer
        if side != "left":
            raise ValueError(f"truncation_side must be 'right' or 'left', got {side!r}")
        with self._lock:
            if self._left is None:  # settings are fixed per object, so a second object keeps this one thread-safe
                left = Tokenizer.from_str(self.tokenizer.to_str())
                left.no_padding()
                left.enable_truncation(max_length=self.max_seq_length, direction="left")
                self._left = left
            return self._left

    def tokenize(self, texts: list, *, truncate: bool = True, truncation_side: str = "right") -> Tokenized:
        """Tokenize texts (already validated strings) without padding.

        ``texts`` may also hold pairs ``(a, b)`` (a cross-encoder's inputs): they are joined by the
        tokenizer's post-processor ([CLS] a [SEP] b [SEP]) and cut with the longest-first strategy (a
        token at a time from the longer of the two), as Hugging Face tokenizers do; their segment ids
        are kept in ``type_ids`` when the model takes ``token_type_ids``.

        ``truncation_side`` "right" (default, as sentence-transformers) keeps the first tokens of a long
        input; "left" keeps the last ones (TEI's ``truncation_direction: "left"``). Special tokens ([CLS],
        [SEP]) are added after the cut either way; a prompt is part of the input and is cut with it.

        Raises InputTooLongError naming the first over-long input when ``truncate`` is False; ValueError for
        another ``truncation_side``.
        """
        encodings = self._cutting_from(truncation_side).encode_batch(texts, add_special_tokens=True)
        ids = [e.ids for e in encodings]
        type_ids = None
        if "token_type_ids" in self.input_names and any(not isinstance(t, str) for t in texts):
            type_ids = [e.type_ids for e in encodings]
        lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        # A text reached the limit: it was cut if the tokenizer kept an overflow.
        truncated = np.zeros(len(ids), dtype=bool)
        for i in np.flatnonzero(lengths >= self.max_seq_length):
            truncated[i] = len(encodings[i].overflowing) > 0
        if not truncate and truncated.any():
            first = int(np.flatnonzero(truncated)[0])
            raise InputTooLongError(f"input {first} has more than max_seq_length={self.max_seq_length} tokens "
                                    f"({int(truncated.sum())} inputs are too long); pass truncate=True to cut them")
        return Tokenized(ids=ids, lengths=lengths, truncated=truncated, type_ids=type_ids)

    def count_tokens(self, texts: list[str]) -> np.ndarray:
        """Tokens each text would feed the model (after truncation), special tokens included."""
        return self.tokenize(texts).lengths

    def pad(self, ids: list[list[int]], rows: np.ndarray, type_ids: list[list[int]] | None = None
            ) -> dict[str, np.ndarray]:
        """ONNX feeds for the texts ``rows`` (indices into ``ids``), padded to their longest.

        Returns input_ids and attention_mask (batch, seq_len) int64, plus
        token_type_ids when the model takes them: ``type_ids[rows]`` (pairs), or zeros.
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
            if type_ids is not None:
                types = feeds["token_type_ids"]
                for j, r in enumerate(rows):
                    n = len(type_ids[r])
                    if left:
                        types[j, width - n:] = type_ids[r]
                    else:
                        types[j, :n] = type_ids[r]
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        return feeds
