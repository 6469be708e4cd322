"""The real all-MiniLM-L6-v2 against sentence-transformers on the same folder (cosine >= 0.9999)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SENTENCES = [
    "The cat sat on the mat.", "A man is playing a guitar on stage.", "Two dogs run through a snowy field.",
    "The central bank raised interest rates by a quarter point.", "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy.", "She sells sea shells by the sea shore.",
    "The quick brown fox jumps over the lazy dog.", "I can't believe it's already November!",
    "Proteins fold into three-dimensional structures determined by their sequence.",
]
HARD = [
    "", " ", "\n\t  \n", ".", "日本語のテキストです。東京は大きな都市です。", "Привет, как дела?", "مرحبا بالعالم",
    "🙂🚀🔥 emoji only 🎉", "def f(x):\n    return x ** 2  # square\n", "SELECT * FROM users WHERE id = 1;",
    "a" * 1_000_000, "word " * 200_000, "ÀÉÎÕÜ ñ ß ø å",
]
PASSAGE = ("Background: The prevalence of chronic kidney disease is rising worldwide, and early detection "
           "remains a challenge for primary care physicians. Methods: We enrolled 4,512 adults from twelve "
           "clinics and measured serum creatinine, cystatin C and urinary albumin at baseline and after two "
           "years. ") * 8


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def test_matches_sentence_transformers(minilm, st_minilm):
    texts = SENTENCES + HARD + [PASSAGE, PASSAGE[:700], PASSAGE[:1500]]
    ours, info = minilm.encode(texts, return_info=True)
    theirs = st_minilm.encode(texts, batch_size=32)
    cos = _cos(ours, theirs)
    assert cos.min() >= 0.9999, (cos.min(), texts[int(cos.argmin())][:80])
    # the long passage and the 200k-word text really were truncated at 256 word-pieces
    assert minilm.max_seq_length == 256
    assert info.truncated[texts.index(PASSAGE)] and info.truncated[texts.index("word " * 200_000)]
    assert info.token_counts.max() == 256


def test_single_text_and_batch_agree(minilm, st_minilm):
    one = minilm.encode(SENTENCES[0])
    theirs = st_minilm.encode(SENTENCES[0])
    assert float(_cos(one[None], theirs[None])[0]) >= 0.9999


def test_search_example_from_the_readme(minilm):
    v = minilm.encode(["The cat sat on the mat", "A feline rested on the rug"])
    hits = minilm.search("where did the cat sit?", v, top_k=1)
    assert hits[0][0]["corpus_id"] == 0 and 0.5 < hits[0][0]["score"] < 0.8
