"""Text in: UTF-8 decoding of files and pipes, and cutting text where a WordPiece tokenizer may be cut.

BERT-family tokenizers (the slow Python one and the fast Rust one alike) first match added tokens
such as ``[SEP]``, then normalise the text, split it into words at whitespace (and punctuation) and
split each word into word pieces independently. So the text may be cut after a character both of
them call whitespace (" ", tab, newline, carriage return, category Zs; never inside an added token,
which holds none), when the next character is not a combining mark (accent stripping could merge
it): tokenizing the pieces one by one gives exactly the ids of the whole text. Characters that they
delete (control characters such as U+000B or U+001C, which Python's ``str.isspace`` calls whitespace)
are never cut points: they join the words around them. Punctuation is not used either: a cut there
could split an added token like ``[SEP]``.

A word longer than ``max_input_chars_per_word`` (100 for BERT) becomes one ``[UNK]``: a run of more
letters or digits than that is a part of such a word, so ``collapse_long_words`` keeps only its first
``max + 1`` letters, which gives the same ``[UNK]`` and bounds the text held for a text without
whitespace. ``stream_chunks`` reads a source incrementally, in time linear in its length.
"""
from __future__ import annotations

import codecs
import io
import os
import re
import unicodedata
from typing import Iterable, Iterator, List, Optional

# Both tokenizers' whitespace (Python's slow BERT: " ", \t, \n, \r and category Zs; Rust's is a superset).
_WHITESPACE = " \t\n\r\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
_CJK = ("\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002b73f"
        "\U0002b740-\U0002b81f\U0002b820-\U0002ceaf\U0002f800-\U0002fa1f")
# A letter or digit that is a word's character for both tokenizers (not CJK, which is split, nor "_").
_LETTER = f"[^\\W_{_CJK}]"


_CUT_AFTER = re.compile(f"[{_WHITESPACE}]")


def cut_allowed(text: str, p: int) -> bool:
    """Whether ``text`` may be cut before position p (0 < p < len(text))."""
    return _CUT_AFTER.match(text, p - 1) is not None and not unicodedata.combining(text[p])


def last_cut(text: str, lo: int = 1, hi: Optional[int] = None) -> int:
    """The last p in [lo, hi] (hi: len(text) - 1 at most) where ``text`` may be cut; -1 if none.

    Scans backwards in growing windows, so a text with a cut near ``hi`` costs little and one with
    none costs one pass.
    """
    end = len(text) - 1 if hi is None else min(hi, len(text) - 1)   # a cut before text[p] needs text[p]
    lo, window = max(lo, 1), 256
    while end >= lo:
        start = max(lo, end - window)
        found = -1
        for m in _CUT_AFTER.finditer(text, start - 1, end):   # the character before p, p in [start, end]
            if not unicodedata.combining(text[m.end()]):
                found = m.end()
        if found >= 0:
            return found
        end, window = start - 1, window * 2
    return -1


def text_chunks(text: str, chunk_chars: int = 1 << 16) -> List[str]:
    """``text`` in chunks of about ``chunk_chars`` characters, cut only where tokenization may be cut."""
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    bounds, pos, n = [0], 0, len(text)
    while n - pos > chunk_chars:
        cut = last_cut(text, pos + 1, pos + chunk_chars)
        if cut < 0:                                   # none in this window: the next one after it
            m = next((m for m in _CUT_AFTER.finditer(text, pos + chunk_chars)
                      if m.end() < n and cut_allowed(text, m.end())), None)
            if m is None:
                break
            cut = m.end()
        bounds.append(cut)
        pos = cut
    bounds.append(n)
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def collapse_long_words(text: str, max_word_chars: Optional[int]) -> str:
    """``text`` with every run of more than ``max_word_chars`` letters cut to ``max_word_chars + 1``.

    Such a run lies inside one word of more than ``max_word_chars`` characters, which WordPiece maps
    to one [UNK] whatever the rest of the word is: the ids do not change.
    """
    if max_word_chars is None:
        return text
    long_run = _long_run(max_word_chars)
    if long_run.search(text) is None:
        return text
    return long_run.sub(r"\1", text)


_LONG_RUNS: dict = {}


def _long_run(max_word_chars: int) -> "re.Pattern":
    if max_word_chars not in _LONG_RUNS:
        _LONG_RUNS[max_word_chars] = re.compile(f"({_LETTER}{{{max_word_chars + 1}}}){_LETTER}+")
    return _LONG_RUNS[max_word_chars]


def read_pieces(source, piece_chars: int, errors: str) -> Iterator[str]:
    """Text of a path, a binary or text file object, or an iterable of str/bytes pieces, in
    pieces of about ``piece_chars`` characters (UTF-8 with an optional BOM; the caller cuts)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield from read_pieces(f, piece_chars, errors)
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    fed = 0

    def decode(data: bytes, final: bool = False) -> str:
        nonlocal fed
        pending = len(decoder.getstate()[0])          # bytes of a character cut by the last block
        try:
            text = decoder.decode(data, final)
        except UnicodeDecodeError as e:
            at = fed - pending + e.start
            raise ValueError(f"not valid UTF-8 at byte {at} ({e.object[e.start:e.start + 1]!r}); re-encode it "
                             "or pass errors='replace'") from None
        fed += len(data)
        return text

    read = getattr(source, "read", None)
    if read is not None:
        blocks = iter(lambda: read(piece_chars), "" if isinstance(source, io.TextIOBase) else b"")
    else:
        blocks = iter(source)
    first = True
    for block in blocks:
        if isinstance(block, (bytes, bytearray, memoryview)):
            text = decode(bytes(block))
        elif isinstance(block, str):
            text = block
        else:
            raise TypeError(f"a text stream must give str or bytes pieces, got {type(block).__name__}")
        if first and text:
            text, first = (text[1:] if text[0] == "\ufeff" else text), False     # a leading BOM
        if text:
            yield text
    tail = decode(b"", final=True)
    if tail:
        yield tail


def _cut_texts(pieces: Iterable[str], piece_chars: int, max_word_chars: Optional[int]) -> Iterator[str]:
    """The concatenated pieces again, in texts of at least ``piece_chars`` characters (but the last)
    that end where tokenization may be cut. Each character is scanned and copied a bounded number of
    times; a stretch without any cut point that outgrows ``piece_chars`` has its long letter runs
    collapsed (``collapse_long_words``), so a text without whitespace is held in bounded memory."""
    held: List[str] = []           # text read but not handed out
    held_len, cut = 0, -1          # cut: the last position in the held text where it may be cut
    collapse_above = piece_chars   # collapse a held text without a cut point once it is this long
    for text in pieces:
        if held and cut_allowed(held[-1][-1] + text[0], 1):
            cut = held_len
        p = last_cut(text)
        if p >= 0:
            cut = held_len + p
        held.append(text)
        held_len += len(text)
        if held_len >= piece_chars and cut > 0:
            joined = "".join(held)
            yield joined[:cut]
            rest = joined[cut:]
            held, held_len, cut, collapse_above = ([rest] if rest else []), len(rest), -1, piece_chars
        elif cut < 0 and max_word_chars is not None and held_len > collapse_above:
            joined = collapse_long_words("".join(held), max_word_chars)
            held, held_len = [joined], len(joined)
            collapse_above = max(piece_chars, 2 * held_len)      # amortised: a text that does not shrink
    if held:
        joined = "".join(held)
        yield collapse_long_words(joined, max_word_chars) if cut < 0 else joined


def stream_chunks(source, chunk_chars: int, chunks_per_piece: int, errors: str = "strict",
                  max_word_chars: Optional[int] = None) -> Iterator[List[str]]:
    """Lists of up to ``chunks_per_piece`` text chunks, cut where tokenization may be cut, read
    incrementally from ``source`` (a ``str`` is a text in memory; anything else is read, see
    ``read_pieces``).

    Tokenizing the chunks one by one gives the ids of the whole text. Time is linear in the text; the
    text held waiting for a cut point is bounded for any text with whitespace or punctuation, and for
    one long word of letters (``max_word_chars``: the tokenizer's longest word, see ``_cut_texts``).
    """
    piece_chars = chunk_chars * chunks_per_piece
    pieces = [source] if isinstance(source, str) else read_pieces(source, piece_chars, errors)
    for text in _cut_texts(pieces, piece_chars, max_word_chars):
        chunks = text_chunks(text, chunk_chars)
        for i in range(0, len(chunks), chunks_per_piece):
            yield chunks[i:i + chunks_per_piece]
