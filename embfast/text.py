"""What counts as a text and as a line, defined once for every place where text enters embfast.

- **Valid text** is a ``str`` that UTF-8 can encode: no lone UTF-16 surrogate
  (U+D800..U+DFFF). Python strings can hold one (JSON ``"caf\\ud800e"`` decodes to
  it, and so do careless .jsonl / .csv / .parquet producers), but no tokenizer,
  UTF-8 file or JSON encoder can take it, so it is refused where it enters, with
  its position, instead of failing deep inside with a cryptic ``TypeError``.
- **A line** ends at ``\\n`` and nowhere else; one trailing ``\\r`` is dropped
  (Windows line ends). Form feed, vertical tab, ``\\x1c``-``\\x1e``, ``\\x85``,
  U+2028 and U+2029 are ordinary characters inside a line (``str.splitlines()``
  would split on them). A final ``\\n`` ends the last line; it does not start an
  empty one. Row i of every line-oriented reader (``embfast encode``, index
  build / add, corpus-text files, viz labels) is line i.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidTextError(ValueError):
    """A text holds a lone UTF-16 surrogate.

    Attributes:
        index: which input (0-based), or None for a single text.
        position: 0-based character position of the first surrogate.
        codepoint: the surrogate, e.g. 0xD800.
    """

    def __init__(self, message: str, *, index: int | None, position: int, codepoint: int):
        super().__init__(message)
        self.index, self.position, self.codepoint = index, position, codepoint


def lone_surrogate(text: str) -> int:
    """0-based position of the first lone surrogate in ``text``, or -1 when it is valid.

    ASCII text is answered without a scan; otherwise one regex pass (C speed).
    """
    if text.isascii():
        return -1
    m = _SURROGATE.search(text)
    return -1 if m is None else m.start()


def surrogate_reason(text: str, position: int) -> str:
    """``"invalid Unicode (lone surrogate U+D800 at column 4)"``; column is 1-based, in characters."""
    return f"invalid Unicode (lone surrogate U+{ord(text[position]):04X} at column {position + 1})"


def check_text(text: str, label: str = "text", *, index: int | None = None) -> None:
    """Raise :class:`InvalidTextError` if ``text`` holds a lone surrogate.

    The message names ``label`` (e.g. ``sentences[1]``), the 1-based character column and the fix:
    ``sentences[1] has invalid Unicode (lone surrogate U+D800 at column 4); ...``.
    """
    pos = lone_surrogate(text)
    if pos >= 0:
        raise InvalidTextError(
            f"{label} has {surrogate_reason(text, pos)}; a str must be encodable as UTF-8 (a lone surrogate is "
            "often half of an emoji's surrogate pair: decode the source with errors='replace', or fix the producer)",
            index=index, position=pos, codepoint=ord(text[pos]))


def check_texts(texts: Iterable[str], name: str = "sentences") -> None:
    """:func:`check_text` on each text, labelled ``name[i]``; raises for the first invalid one."""
    for i, t in enumerate(texts):
        if not t.isascii():
            check_text(t, f"{name}[{i}]", index=i)


def strip_line_end(line: str) -> str:
    """``line`` without its ``\\n`` and one ``\\r`` before it (only those)."""
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return line


def split_lines(text: str) -> list[str]:
    """Split ``text`` into lines at ``\\n`` only (see the module docstring); ``""`` gives ``[]``.

    >>> split_lines("a\\fb\\r\\nc\\u2028d\\n")
    ['a\\x0cb', 'c\\u2028d']
    """
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def iter_lines(fh) -> Iterator[str]:
    """Lines of an open text file, streaming, by :func:`split_lines`' rule.

    Open the file with ``newline="\\n"``: Python's default (universal newlines) and
    ``newline=""`` would also end a line at a lone ``\\r``.
    """
    for raw in fh:
        yield strip_line_end(raw)


def read_lines(path, encoding: str = "utf-8") -> list[str]:
    """All lines of a text file (UTF-8, a leading BOM dropped) by :func:`split_lines`' rule.

    Raises UnicodeDecodeError for invalid UTF-8 and OSError for an unreadable file.
    """
    with open(path, encoding="utf-8-sig" if encoding == "utf-8" else encoding, newline="\n") as fh:
        return split_lines(fh.read())
