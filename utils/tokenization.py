"""Byte-level BPE from scratch: the tokenizer family of GPT-2, GPT-4, Llama 3 and SmolLM2 (lesson 01).

A tokenizer turns text into the integer ids a model reads, and back. Byte-level BPE works on the
UTF-8 bytes of the text, so it has no "unknown" token: the first 256 ids are the 256 possible
bytes, and every string, in any script, round-trips exactly. Training learns *merges*: again and
again, the most frequent adjacent pair of ids in the corpus becomes a new id.

    tok = BPETokenizer()
    tok.train(text, vocab_size=1024)       # 768 merges on top of the 256 bytes
    ids = tok.encode("Hello world")        # -> list[int]
    tok.decode(ids) == "Hello world"       # always, for every str without lone surrogates
    tok.save("tok.json"); BPETokenizer.load("tok.json")

Two ideas keep it fast enough to train on megabytes in pure Python:

* A regex first splits the text into chunks (words with their leading space, runs of digits,
  punctuation, whitespace) and merges never cross a chunk boundary. The corpus then becomes a
  table of *unique* chunks with their frequencies: "the" appears thousands of times but is
  processed once.
* Pair counts are computed once. After each merge only the chunks that contain the merged pair
  are rewritten (an index maps each pair to those chunks), and their pair counts are updated by
  difference. A heap with lazy deletion finds the most frequent pair without scanning all pairs.
  (The naive version recounts every pair of the whole text for every merge: minbpe's
  BasicTokenizer, fine for teaching, too slow beyond a few kilobytes.)

Special tokens (like "<|endoftext|>") are strings that map to one reserved id and are never
produced by BPE; `encode` only emits them when you allow it (`allowed_special=`), so that user
text that happens to contain "<|endoftext|>" cannot smuggle in a control token.

Files are JSON (`save`/`load`), never pickle, and `load` treats them as untrusted: the file size,
the number of merges, every token's length (computed from the merges by arithmetic, before any
token is built: 40 merges that each double a token would otherwise ask for 2**40 bytes) and the
special tokens are bounded, and the split pattern must be GPT-2's or GPT-4's unless the caller
opts in to another one (which must still cut a probe text without losing any of it).
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter, defaultdict

import regex  # the `regex` module (a transformers dependency): \p{L} classes, possessive quantifiers

# How GPT-2 and GPT-4 (cl100k_base) cut text into chunks before BPE. GPT-4's version also splits
# case-insensitive contractions, caps digit runs at 3, and keeps newlines apart from other spaces.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""
                      r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")

KNOWN_SPLIT_PATTERNS = (GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN)
# Any other split pattern must cut this text into pieces that join back to it exactly: letters, digits,
# spaces, tabs, punctuation, \n and \r\n, accents, CJK, an emoji, and a long run of one letter then a
# non-letter (the input that sends badly written patterns backtracking), within the time limit.
PATTERN_PROBE = ("Hello World 42! It's 3.14 o'clock,  isn't it?\n\tnaïve café — 東京 🙂 x² = 7;\r\n"
                 + "a" * 40 + "!" + " " * 5 + "end")
PATTERN_PROBE_TIMEOUT_S = 1.0   # a sane pattern cuts the probe in microseconds

# Bounds on tokenizer files, also kept by train and register_special_tokens so that every tokenizer
# this code makes loads back. (GPT-4's cl100k_base has ~100k merges.)
MAX_MERGES, MAX_TOKEN_BYTES = 100_000, 256         # MAX_TOKEN_BYTES: of one token, merged or special
MAX_SPECIAL_TOKENS, MAX_SPECIAL_ID = 1_000, 2**31 - 1  # ids must fit an int32 tensor
MAX_PATTERN_CHARS, MAX_FILE_BYTES = 1_000, 8_000_000   # 100,000 merges take ~1.6 MB of JSON

FORMAT_NAME = "llm-course byte-level BPE"
FORMAT_VERSION = 1
_CACHE_LIMIT = 200_000  # encoded chunks kept in memory; cleared when full


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids` (left to right) by `new_id`.

    Shown in lesson 01.
    """
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _check_text(text, what: str = "text") -> bytes:
    """The UTF-8 bytes of `text`, or a TypeError/ValueError that says what is allowed."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} contains a lone surrogate {text[err.start]!r} at index {err.start}: that is not "
            "a Unicode character and has no UTF-8 bytes. Fix the text that produced it (for "
            "example decode files with errors='replace').") from None


def compile_split_pattern(pattern: str):
    """The compiled split regex, or a ValueError if the pattern would lose text.

    GPT-2's and GPT-4's patterns are accepted as they are. Any other pattern must cut
    PATTERN_PROBE, within PATTERN_PROBE_TIMEOUT_S, into plain-string pieces that join back to it
    exactly; BPE on the pieces is lossless, so that is decode(encode(probe)) == probe.
    Example: compile_split_pattern(r"[a-z]+") -> ValueError (the probe comes back as "elloorld...").
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a regex str, got {type(pattern).__name__}")
    if not 1 <= len(pattern) <= MAX_PATTERN_CHARS:
        raise ValueError(f"pattern must be 1 to {MAX_PATTERN_CHARS} characters long, got {len(pattern)}")
    try:
        compiled = regex.compile(pattern)
    except regex.error as err:
        raise ValueError(f"pattern is not a valid regex: {err}") from None
    if pattern in KNOWN_SPLIT_PATTERNS:
        return compiled
    try:
        pieces = compiled.findall(PATTERN_PROBE, timeout=PATTERN_PROBE_TIMEOUT_S)
    except TimeoutError:
        raise ValueError(f"pattern took over {PATTERN_PROBE_TIMEOUT_S} s to split a "
                         f"{len(PATTERN_PROBE)}-character probe text (catastrophic backtracking?); "
                         "use GPT2_SPLIT_PATTERN or GPT4_SPLIT_PATTERN") from None
    if not all(isinstance(piece, str) for piece in pieces):
        raise ValueError("pattern has capture groups, so findall returns tuples, not pieces of text: "
                         "write groups as (?:...)")
    if "".join(pieces) != PATTERN_PROBE:
        raise ValueError(f"pattern loses text: the probe {PATTERN_PROBE[:40]!r}... comes back as "
                         f"{''.join(pieces)[:40]!r}...; a split pattern must cover every character")
    return compiled


class BPETokenizer:
    """Byte-level BPE tokenizer: 256 byte ids, then one id per learned merge, then special tokens."""

    def __init__(self, pattern: str = GPT4_SPLIT_PATTERN):
        self._split = compile_split_pattern(pattern)  # refuses a pattern that would lose text
        self.pattern = pattern
        self.merges: dict[tuple[int, int], int] = {}        # (id, id) -> new id, in training order
        self.vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}  # id -> its bytes
        self.special_tokens: dict[str, int] = {}             # "<|endoftext|>" -> id
        self._cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------------------------- training
    def train(self, text: str, vocab_size: int, verbose: bool = False) -> BPETokenizer:
        """Learn vocab_size - 256 merges from `text` (fewer if the text runs out of pairs)."""
        _check_text(text, "the training text")
        if not text:
            raise ValueError("cannot train on an empty corpus: pass a non-empty training text")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 256:
            raise ValueError(f"vocab_size must be an int >= 256 (the 256 byte tokens come first), "
                             f"got {vocab_size!r}")
        if vocab_size > 256 + MAX_MERGES:
            raise ValueError(f"vocab_size must be at most {256 + MAX_MERGES} (256 bytes + {MAX_MERGES} "
                             f"merges), got {vocab_size}")
        clash = sorted(i for i in self.special_tokens.values() if i < vocab_size)
        if clash:
            raise ValueError(f"special token ids {clash} would collide with the trained ids "
                             f"0..{vocab_size - 1}: register special tokens with ids >= vocab_size")

        # 1. The corpus as unique chunks with their counts; each chunk as a list of byte ids.
        chunk_counts = Counter(self._split.findall(text))
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        freqs = list(chunk_counts.values())

        # 2. Count every adjacent pair once, weighted by chunk frequency, and index where it occurs.
        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> indices of chunks
        for i, (word, freq) in enumerate(zip(words, freqs)):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += freq
                where[pair].add(i)
        # A max-heap (negated counts) of (count, pair). Entries go stale when counts change; a
        # popped entry is used only if it still matches the live count ("lazy deletion"). Ties go
        # to the smaller pair of ids, so training is deterministic.
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        merges: dict[tuple[int, int], int] = {}
        vocab = {i: bytes([i]) for i in range(256)}
        for new_id in range(256, vocab_size):
            # 3. The most frequent pair still present (that does not make a token over MAX_TOKEN_BYTES).
            while heap:
                neg_count, pair = heapq.heappop(heap)
                if (pair_counts.get(pair) == -neg_count
                        and len(vocab[pair[0]]) + len(vocab[pair[1]]) <= MAX_TOKEN_BYTES):
                    break
            else:
                if verbose:
                    print(f"no pairs left to merge: stopping at vocab size {new_id}")
                break
            merges[pair] = new_id
            vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
            if verbose:
                print(f"merge {new_id - 255}/{vocab_size - 256}: {pair} -> {new_id} "
                      f"{vocab[new_id]!r} ({-neg_count} occurrences)")

            # 4. Rewrite only the chunks that contain the pair; update pair counts by difference.
            delta: dict[tuple[int, int], int] = defaultdict(int)
            for i in where.pop(pair):
                word, freq = words[i], freqs[i]
                new_word = merge_pair(word, pair, new_id)
                if len(new_word) == len(word):  # stale index entry: the pair left this chunk
                    continue
                for p in zip(word, word[1:]):
                    delta[p] -= freq
                for p in zip(new_word, new_word[1:]):
                    delta[p] += freq
                    where[p].add(i)
                words[i] = new_word
            for p, change in delta.items():
                if change:
                    count = pair_counts[p] + change
                    if count > 0:
                        pair_counts[p] = count
                        heapq.heappush(heap, (-count, p))
                    else:
                        del pair_counts[p]
        self.merges, self.vocab = merges, vocab
        self._cache = {}
        return self

    # ----------------------------------------------------------------------------- special tokens
    def register_special_tokens(self, special_tokens: dict[str, int]) -> None:
        """Add special tokens, e.g. {"<|endoftext|>": 1024}; ids must not be used by the vocabulary."""
        if not isinstance(special_tokens, dict):
            raise TypeError(f"special_tokens must be a dict {{str: int}}, got "
                            f"{type(special_tokens).__name__}")
        if len(set(self.special_tokens) | set(special_tokens)) > MAX_SPECIAL_TOKENS:
            raise ValueError(f"at most {MAX_SPECIAL_TOKENS} special tokens are allowed")
        taken = {i: s for s, i in self.special_tokens.items()}
        for token, token_id in special_tokens.items():
            if not isinstance(token, str) or not token:
                raise ValueError(f"a special token must be a non-empty str, got {token!r}"[:200])
            if len(token.encode("utf-8", errors="replace")) > MAX_TOKEN_BYTES:
                raise ValueError(f"a special token must be at most {MAX_TOKEN_BYTES} bytes, got "
                                 f"{token[:20]!r}... ({len(token)} characters)")
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise ValueError(f"special token id must be a non-negative int, got {token_id!r}")
            if token_id > MAX_SPECIAL_ID:
                raise ValueError(f"special token id must be at most {MAX_SPECIAL_ID} (an int32), "
                                 f"got {token_id}")
            if token_id in self.vocab:
                raise ValueError(f"id {token_id} for {token!r} is already a BPE token (ids "
                                 f"0..{len(self.vocab) - 1}): use an id >= {len(self.vocab)}")
            if taken.get(token_id, token) != token:
                raise ValueError(f"id {token_id} is already the special token {taken[token_id]!r}")
            taken[token_id] = token
        self.special_tokens.update(special_tokens)

    @property
    def vocab_size(self) -> int:
        """BPE tokens plus special tokens."""
        return len(self.vocab) + len(self.special_tokens)

    # ----------------------------------------------------------------------------------- encoding
    def _encode_chunk(self, chunk: str) -> list[int]:
        # Each pass scans the whole chunk, so the cost grows with len(chunk) x merges applied: nothing
        # for words, but a 30,000-letter run without spaces or punctuation takes seconds.
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            # Apply the earliest-learned merge present (lowest new id), as training did.
            pair = min(zip(ids, ids[1:]), key=lambda p: self.merges.get(p, float("inf")))
            if pair not in self.merges:
                break
            ids = merge_pair(ids, pair, self.merges[pair])
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text with BPE only: special-token strings are treated as plain text."""
        _check_text(text)
        chunks = self._split.findall(text)
        if self.pattern not in KNOWN_SPLIT_PATTERNS and sum(map(len, chunks)) != len(text):
            # the pieces do not tile the text: a custom pattern skipped some of it (the known ones can't)
            raise ValueError("the split pattern skipped characters of this text, so decode(encode(text)) "
                             "would not give it back; use GPT2_SPLIT_PATTERN or GPT4_SPLIT_PATTERN")
        ids: list[int] = []
        for chunk in chunks:
            ids.extend(self._encode_chunk(chunk))
        return ids

    def encode(self, text: str, allowed_special="none_raise") -> list[int]:
        """Text -> ids.

        allowed_special: "none_raise" (default: raise if text contains a special-token string),
        "none" (treat them as plain text), "all", or a set of the special tokens to allow.
        """
        _check_text(text)
        if allowed_special == "all":
            special = dict(self.special_tokens)
        elif allowed_special == "none":
            special = {}
        elif allowed_special == "none_raise":
            special = {}
            found = [s for s in self.special_tokens if s in text]
            if found:
                raise ValueError(f"text contains the special token(s) {found}; pass "
                                 "allowed_special='all' (or a set of them) to encode them as special "
                                 "ids, or 'none' to encode them as plain text")
        elif isinstance(allowed_special, (set, frozenset, list, tuple)):
            unknown = [s for s in allowed_special if s not in self.special_tokens]
            if unknown:
                raise ValueError(f"allowed_special names unknown special tokens {unknown}; "
                                 f"registered: {sorted(self.special_tokens)}")
            special = {s: self.special_tokens[s] for s in allowed_special}
        else:
            raise ValueError(f"allowed_special must be 'all', 'none', 'none_raise' or a set of special "
                             f"tokens, got {allowed_special!r}")
        if not special:
            return self.encode_ordinary(text)
        # Cut the text at the special tokens (longest first), keeping them as separate parts.
        alternatives = "|".join(regex.escape(s) for s in sorted(special, key=len, reverse=True))
        ids: list[int] = []
        for part in regex.split(f"({alternatives})", text):
            if part in special:
                ids.append(special[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    # ----------------------------------------------------------------------------------- decoding
    def decode_bytes(self, ids) -> bytes:
        """ids -> the exact bytes they stand for (a single token may be part of a character)."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"ids must be a sequence of ints, got {type(ids).__name__}")
        if hasattr(ids, "tolist"):  # a torch tensor or numpy array
            ids = ids.tolist()
        special_bytes = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        pieces = []
        for token_id in ids:
            if not isinstance(token_id, int) or isinstance(token_id, bool):
                raise TypeError(f"token ids must be ints, got {token_id!r}")
            piece = self.vocab.get(token_id)
            if piece is None:
                piece = special_bytes.get(token_id)
            if piece is None:
                specials = f" and special ids {sorted(special_bytes)}" if special_bytes else ""
                raise ValueError(f"token id {token_id} is not in the vocabulary (ids 0.."
                                 f"{len(self.vocab) - 1}{specials})")
            pieces.append(piece)
        return b"".join(pieces)

    def decode(self, ids) -> str:
        """ids -> text. Bytes that do not form valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --------------------------------------------------------------------------------- save/load
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON: the split pattern, merges in order, special tokens."""
        state = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "pattern": self.pattern,
                 "merges": [list(pair) for pair in self.merges],  # merge k creates id 256 + k
                 "special_tokens": self.special_tokens}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(state, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike, allow_custom_pattern: bool = False) -> BPETokenizer:
        """Read a file written by `save`, checking it before anything is built from it.

        A file is untrusted input: its size, merge count, token lengths and special tokens are
        bounded (MAX_FILE_BYTES, MAX_MERGES, MAX_TOKEN_BYTES, MAX_SPECIAL_TOKENS), and its split
        pattern must be GPT-2's or GPT-4's. allow_custom_pattern=True accepts another pattern if
        it splits PATTERN_PROBE losslessly within a time limit: only for files you trust, since
        a regex can still be slow on other text.
        """
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{path} is {size:,} bytes; a tokenizer file is at most {MAX_FILE_BYTES:,}")
        with open(path, encoding="utf-8") as f:
            try:
                state = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
                raise ValueError(f"{path} is not a JSON tokenizer file: {str(err)[:200]}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a {FORMAT_NAME!r} file")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {state.get('version')!r}; this code "
                             f"reads version {FORMAT_VERSION}")
        state.setdefault("special_tokens", {})
        for key, kind in (("pattern", str), ("merges", list), ("special_tokens", dict)):
            if not isinstance(state.get(key), kind):
                raise ValueError(f"{path}: {key!r} must be a {kind.__name__}, got "
                                 f"{type(state.get(key)).__name__}" + (" (missing)" if key not in state else ""))
        pattern, merges = state["pattern"], state["merges"]
        if pattern not in KNOWN_SPLIT_PATTERNS and not allow_custom_pattern:
            raise ValueError(f"{path} uses a split pattern that is neither GPT2_SPLIT_PATTERN nor "
                             f"GPT4_SPLIT_PATTERN: {pattern[:80]!r}. A pattern can lose text or take "
                             "exponential time; pass allow_custom_pattern=True if you trust this file.")
        if len(merges) > MAX_MERGES:
            raise ValueError(f"{path} has {len(merges):,} merges; at most {MAX_MERGES:,} are allowed")
        # Every token's length, by arithmetic, before any token is built.
        lengths = [1] * 256  # token id -> its length in bytes
        seen = set()
        for k, pair in enumerate(merges):
            new_id = 256 + k
            if (not isinstance(pair, list) or len(pair) != 2
                    or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < new_id
                               for i in pair)):
                raise ValueError(f"{path}: merge {k} must be two ids of earlier tokens (< {new_id}), "
                                 f"got {pair!r}"[:300])
            if tuple(pair) in seen:
                raise ValueError(f"{path}: merge {k} repeats the earlier merge {pair}")
            seen.add(tuple(pair))
            lengths.append(lengths[pair[0]] + lengths[pair[1]])
            if lengths[-1] > MAX_TOKEN_BYTES:
                raise ValueError(f"{path}: merge {k} makes a token of {lengths[-1]:,} bytes; tokens "
                                 f"are at most {MAX_TOKEN_BYTES} bytes")
        tok = cls(pattern=pattern)  # compiles the pattern (and checks a custom one on the probe)
        for k, pair in enumerate(merges):
            tok.merges[tuple(pair)] = 256 + k
            tok.vocab[256 + k] = tok.vocab[pair[0]] + tok.vocab[pair[1]]
        tok.register_special_tokens(state["special_tokens"])
        return tok

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={len(self.special_tokens)})")
