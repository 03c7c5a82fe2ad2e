"""Chunking (lesson 09): cut documents into pieces small enough to embed, big enough to answer from.

An embedding model reads a few hundred words at most, and a prompt has room for a few passages, so
a retriever stores chunks, not whole documents. Three strategies, from blind to structure-aware:

    fixed        chunk_text        windows of at most chunk_size characters, sharing ~overlap
                                   characters with the previous one, cut at whitespace
    paragraphs   pack_paragraphs   whole paragraphs packed greedily up to chunk_size
    sections     chunk_sections    paragraphs packed inside the document's own sections (never
                                   across two), each chunk starting with its heading path

Sizes are in characters (not tokens): simple to reason about, and for English prose MiniLM's
256-word-piece limit is roughly 1,000 characters.
"""

from __future__ import annotations

import re

from .checks import check_choice, check_int, check_positive_int, check_text

CHUNKINGS = ("fixed", "paragraphs", "sections")


def check_chunk_sizes(chunk_size, overlap) -> None:
    """chunk_size an int >= 1 and 0 <= overlap < chunk_size (characters), else TypeError/ValueError.

    Shown in lesson 09. Example: check_chunk_sizes(100, 20) passes; check_chunk_sizes(100, 100) -> ValueError.
    """
    check_positive_int("chunk_size", chunk_size, what=" (characters)")
    check_int("overlap", overlap, low=0, what=" (characters)")
    if overlap >= chunk_size:
        raise ValueError(f"overlap must be smaller than chunk_size (0 <= overlap < {chunk_size}), "
                         f"got overlap={overlap}: each chunk must move the window forward")


def chunk_spans(text: str, chunk_size: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) character spans of chunk_text: at most chunk_size long, about `overlap` shared.

    Cuts fall on whitespace when there is some in the second half of the window, so words are
    not split; a word longer than the window is cut where it must be. Shown in lesson 09.
    """
    check_text("text", text, allow_empty=True)
    check_chunk_sizes(chunk_size, overlap)
    n = len(text)
    start = len(text) - len(text.lstrip())  # skip leading whitespace
    spans = []
    while start < n:
        end = min(start + chunk_size, n)
        if end < n and not text[end].isspace():  # the window ends inside a word: back off to a space
            cut = max(text.rfind(" ", start + chunk_size // 2, end), text.rfind("\n", start + chunk_size // 2, end))
            if cut > start:
                end = cut
        stripped_end = len(text[:end].rstrip())  # no trailing whitespace in the chunk
        spans.append((start, max(stripped_end, start + 1)))
        if end >= n or not text[end:].strip():
            break
        nxt = max(end - overlap, start + 1)  # step back `overlap` characters...
        if overlap and not text[nxt - 1].isspace():  # ...then back to the start of that word
            space = max(text.rfind(" ", start + 1, nxt), text.rfind("\n", start + 1, nxt))
            nxt = space + 1 if space != -1 else nxt
        while nxt < n and text[nxt].isspace():
            nxt += 1
        start = nxt
    return spans


def chunk_text(text: str, chunk_size: int, overlap: int) -> list[str]:
    """Fixed-size chunking: windows of at most `chunk_size` characters sharing ~`overlap` characters.

    Shown in lesson 09. Example:
    >>> chunk_text("one two three four five six", chunk_size=10, overlap=4)
    ['one two', 'two three', 'three four', 'four five', 'five six']
    """
    return [text[s:e] for s, e in chunk_spans(text, chunk_size, overlap)]


_RST_UNDERLINE = re.compile(r"^([*=\-~^#])\1{2,}\s*$")  # ***** / ===== / ----- under a title
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*$")


def split_sections(text: str) -> list[tuple[str, str]]:
    """[(heading, body)] at the document's own headings: Markdown `# Title` lines or
    reStructuredText titles (a line underlined with *** / === / ---). Text before the first
    heading gets the heading ''. Shown in lesson 09.

    Example: split_sections("intro\\n# Leave\\n27 days") -> [('', 'intro'), ('Leave', '27 days')]
    """
    check_text("text", text, allow_empty=True)
    lines = text.splitlines()
    sections, heading, body = [], "", []
    i = 0
    while i < len(lines):
        line = lines[i]
        md = _MD_HEADING.match(line)
        rst = (i + 1 < len(lines) and line.strip() and _RST_UNDERLINE.match(lines[i + 1])
               and len(lines[i + 1].strip()) >= len(line.strip()) - 2)  # an underline as long as its title
        if md or rst:
            if "\n".join(body).strip():
                sections.append((heading, "\n".join(body).strip("\n")))
            heading, body = (md.group(2) if md else line.strip()), []
            i += 1 if md else 2
            continue
        body.append(line)
        i += 1
    if "\n".join(body).strip():
        sections.append((heading, "\n".join(body).strip("\n")))
    return sections


def pack_paragraphs(text: str, chunk_size: int, overlap: int = 0) -> list[str]:
    """Paragraph chunking: whole paragraphs (split at blank lines) packed greedily into chunks of
    at most `chunk_size` characters; a paragraph longer than that is cut with chunk_text.

    Shown in lesson 09. Example: pack_paragraphs("a b\\n\\nc d\\n\\ne f", 8) -> ['a b\\n\\nc d', 'e f']
    """
    check_text("text", text, allow_empty=True)
    check_chunk_sizes(chunk_size, overlap)
    chunks, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if len(para) > chunk_size:  # too long on its own: flush, then cut it into windows
            if current:
                chunks.append(current)
                current = ""
            chunks.extend(chunk_text(para, chunk_size, overlap))
        elif len(current) + 2 + len(para) <= chunk_size:  # + 2 for the blank line between them
            current = f"{current}\n\n{para}" if current else para
        else:
            chunks.append(current)
            current = para
    if current:
        chunks.append(current)
    return chunks


def chunk_sections(text: str, chunk_size: int, overlap: int = 0, title: str = "") -> list[str]:
    """Structure-aware chunking: paragraphs packed within each section (never across two), each
    chunk starting with its heading path, e.g. 'try > "finally" clause', so that a chunk from
    the middle of a long section still says what it is about. Shown in lesson 09."""
    check_chunk_sizes(chunk_size, overlap)
    chunks = []
    sections = split_sections(text)
    doc_heading = sections[0][0] if sections else ""  # a document that opens with a title: keep it
    for heading, body in sections:
        path = " > ".join(dict.fromkeys(p for p in (title, doc_heading, heading) if p))  # no repeats
        prefix = f"{path}\n" if path else ""
        room = max(chunk_size - len(prefix), chunk_size // 2, 1)  # the heading counts, up to half the size
        chunks.extend(prefix + c for c in pack_paragraphs(body, room, min(overlap, room - 1)))
    return chunks


def chunk_document(text: str, chunking: str, chunk_size: int, overlap: int = 0, title: str = "") -> list[str]:
    """One document -> chunks with the named strategy: 'fixed', 'paragraphs' or 'sections'.

    Shown in lesson 09. Example: chunk_document("a b c", "fixed", 3) -> ['a b', 'c']
    """
    check_choice("chunking", chunking, CHUNKINGS)
    if chunking == "fixed":
        return chunk_text(text, chunk_size, overlap)
    if chunking == "paragraphs":
        return pack_paragraphs(text, chunk_size, overlap)
    return chunk_sections(text, chunk_size, overlap, title=title)
