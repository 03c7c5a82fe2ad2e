"""Showing tokens to people (lesson 01): each token's bytes, readable, coloured.

    pieces = token_pieces(tokenizer, "Hello world")   # [b"Hello", b" world"], ours or a HF tokenizer
    [readable(p) for p in pieces]                     # ["Hello", " world"]
    HTML(tokens_html(pieces))                         # coloured spans in a notebook
"""

from __future__ import annotations

import html

from .tokenization import BPETokenizer, _check_text


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (how HF shows byte-level tokens: " " -> "Ġ").

    Printable Latin-1 bytes stand for themselves; the others (space, control bytes, ...) are
    shifted to code points 256+, so each of the 256 bytes gets one visible character.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def token_pieces(tokenizer, text: str) -> list[bytes]:
    """The bytes of each token of `text`, for our BPETokenizer or a HF (byte-level) tokenizer."""
    if isinstance(tokenizer, BPETokenizer):
        return [tokenizer.vocab.get(i) or tokenizer.decode_bytes([i])
                for i in tokenizer.encode(text, allowed_special="all")]
    _check_text(text)
    ids = tokenizer.encode(text, add_special_tokens=False)
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    pieces = []
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if all(c in to_byte for c in token):  # a byte-level token, shown in GPT-2's alphabet
            pieces.append(bytes(to_byte[c] for c in token))
        else:  # a special or added token
            pieces.append(tokenizer.decode([token_id]).encode("utf-8"))
    return pieces


def readable(piece: bytes) -> str:
    """A token's bytes as text; bytes that are only part of a character are shown as \\xNN."""
    return piece.decode("utf-8", errors="backslashreplace")


_COLOURS = ("#fde2a5", "#b9e4c9", "#c7d7f5", "#f7c6c7", "#e0cdf5", "#c9eef2")


def tokens_html(pieces: list[bytes]) -> str:
    """HTML that colours each token; spaces show as '·' and newlines as '↵' so you can see them."""
    spans = []
    for k, piece in enumerate(pieces):
        text = html.escape(readable(piece)).replace(" ", "·").replace("\n", "↵<br>")
        spans.append(f'<span style="background:{_COLOURS[k % len(_COLOURS)]};color:#000;'
                     f'padding:1px 0;font-family:monospace">{text}</span>')
    return f'<div style="line-height:1.9">{"".join(spans)}</div>'
