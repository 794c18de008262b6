"""Token ids of a long text in bounded memory: read it in chunks, encode it in pieces, keep only the ids.

Encoding a whole text at once makes the tokenizer build an ``Encoding`` with ids, tokens, offsets and
masks for every token, plus per-byte alignments of its normalized string: about 300 bytes per token
(3.9 GB for a 20 MB one-line file and a small BPE). Here the text is encoded in pieces of about
``piece_chars`` characters and only the ids are kept (4 bytes per token).

Where a piece may end. A cut lies just before a ``" "`` or ``"\\n"`` that stands between two
non-whitespace characters (``str.isspace``). For a ``tokenizers.Tokenizer`` whose pre-tokenizer is
byte-level with the GPT-2 split pattern (ours, GPT-NeoX-20B's) ::

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

encoding the pieces one by one gives exactly the ids of the whole text, because

- a pre-token ends at the cut: whitespace enters a pre-token only as its first character (`` ?``) or
  in a run of whitespace (``\\s+``), and the character before the cut is not whitespace (every code
  point that ``str.isspace`` rejects is ``\\S`` to the pattern: checked over all of Unicode);
- the pattern has no look-behind, so the pre-tokens from the cut on depend only on the text from the
  cut on; and no pre-token before the cut looks past it (letter, number and symbol runs stop at the
  whitespace either way, and the ``(?!\\S)`` look-ahead after a run of whitespace before the cut sees a
  non-whitespace character inside the piece);
- no prefix space is added (``add_prefix_space`` would put one before a piece that starts with ``"\\n"``);
- BPE merges stay inside a pre-token;
- NFC (GPT-NeoX's normalizer) never composes across ``" "`` or ``"\\n"`` (both are starters that no
  canonical composition takes in), and maps no non-whitespace character to whitespace;
- no added token can span the cut or reach over it (checked in :func:`can_cut`).

A stretch of text without a cut point (one huge word, a line of CJK text without spaces) stays in one
piece, so memory then grows with the longest such stretch; for any other tokenizer (another
pre-tokenizer or normalizer, a prefix space, truncation or padding, an added token that could cross a
cut) the text is joined and encoded whole, exactly but in memory proportional to its length.
"""

from __future__ import annotations

import codecs
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

PIECE_CHARS = 1 << 14  # characters per piece (and bytes per read): a few MB of Encoding at a time
_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")  # re's \s is str.isspace for str patterns
_CUT_IN_TOKEN = re.compile(r"\S[ \n]")  # an added token holding this could span a cut


@dataclass
class EncodedText:
    ids: np.ndarray  # uint32, the ids of encoding the whole text (no special tokens added)
    bytes: int  # UTF-8 bytes of the text
    first_token_bytes: int  # UTF-8 bytes of the text up to the end of the first token (its offsets)


def read_text_chunks(path: Path, chunk_bytes: int = PIECE_CHARS) -> Iterator[str]:
    """The UTF-8 text of ``path`` in consecutive chunks, newlines translated as ``Path.read_text`` does
    (``\\r\\n`` and ``\\r`` become ``\\n``); raises ``ValueError`` naming the offset of the first invalid byte."""
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
    offset = 0  # bytes read before ``data``
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_bytes)
            held = len(decoder.getstate()[0])  # bytes of an incomplete character left from the last read
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text (invalid byte at offset {offset - held + e.start})") \
                    from None
            offset += len(data)
            if text:
                yield text
            if not data:
                return


def can_cut(tokenizer) -> bool:
    """Whether pieces cut as in the module docstring encode to exactly the ids of the whole text under
    ``tokenizer`` (a ``tokenizers.Tokenizer``)."""
    from tokenizers import normalizers, pre_tokenizers

    pre = tokenizer.pre_tokenizer
    if not (isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex and not pre.add_prefix_space):
        return False
    if not (tokenizer.normalizer is None or isinstance(tokenizer.normalizer, normalizers.NFC)):
        return False
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        return False
    return not any(t.lstrip or t.rstrip or _CUT_IN_TOKEN.search(t.content)
                   for t in tokenizer.get_added_tokens_decoder().values())


def split_pieces(chunks: Iterable[str], piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Consecutive pieces of the text ``chunks`` make up, each cut at the first cut point (module docstring)
    at or after ``piece_chars`` characters; a piece grows until one comes or the text ends."""
    if piece_chars < 1:
        raise ValueError(f"piece_chars must be >= 1, got {piece_chars}")
    buf, pos = "", piece_chars  # no cut point in buf[piece_chars:pos]
    for chunk in chunks:
        buf += chunk
        while (m := _CUT.search(buf, pos)) is not None:
            yield buf[: m.start()]
            buf, pos = buf[m.start():], piece_chars
        pos = max(piece_chars, len(buf) - 1)  # the last character needs the next one to be a cut point
    if buf:
        yield buf


def encode_text(tokenizer, chunks: str | Iterable[str], piece_chars: int = PIECE_CHARS) -> EncodedText:
    """The ids and byte counts of the text ``chunks`` make up (a string is one chunk), encoded in pieces
    when :func:`can_cut` allows, else whole."""
    if isinstance(chunks, str):
        chunks = [chunks]
    pieces = split_pieces(chunks, piece_chars) if can_cut(tokenizer) else ["".join(chunks)]
    ids: list[np.ndarray] = []
    nbytes, first = 0, None
    for piece in pieces:
        enc = tokenizer.encode(piece, add_special_tokens=False)
        if first is None and enc.ids:
            first = nbytes + len(piece[: enc.offsets[0][1]].encode("utf-8"))
        ids.append(np.array(enc.ids, dtype=np.uint32))
        nbytes += len(piece.encode("utf-8"))
    return EncodedText(np.concatenate(ids) if ids else np.zeros(0, np.uint32), nbytes, first or 0)
