"""Constrained decoding: an output format the model cannot break. Shown in lesson 07.

A `Grammar` is a sequence of segments (`Literal` text, a `Choice` of strings, an `Integer`, a JSON
`String`). At every step it tells the decoder which tokens may come next; the decoder sets the logits
of all others to -inf (`utils.generation.generate_batch(..., grammar=...)`), so whatever the model
prefers, the output stays inside the format. Valid by construction is not the same as right: lesson 07
measures both.

* `label_grammar(tokenizer, labels)`: exactly one of a few labels.
* `json_grammar(tokenizer, fields)`: a flat JSON object with the given keys, in order.
* `SchemaGrammar(tokenizer, nfa, fragment)`: the same interface for any language given as a character
  automaton (lesson 16 compiles JSON Schemas into one: utils.json_schema_grammar); `TokenTrie` walks
  the vocabulary to turn an automaton state into a token mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Literal:
    text: str  # must appear exactly


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]  # exactly one of these strings


@dataclass(frozen=True)
class Integer:
    max_digits: int = 6  # a JSON integer: digits, no leading zero


@dataclass(frozen=True)
class String:
    max_chars: int = 40  # the inside of a JSON string: no quote, backslash or control character


class Grammar:
    """An output format as a sequence of segments; tells the decoder which tokens are allowed next.

    The state of one sequence is (segment index, text produced inside that segment). At every step
    `allowed(state)` is a boolean mask over the vocabulary; the decoder sets the logits of all
    other tokens to -inf, so whatever the model prefers, the output stays inside the format.
    After the last segment only the end-of-sequence token is allowed.
    """

    def __init__(self, tokenizer, segments):
        self.segments = list(segments)
        if not self.segments:
            raise ValueError("a grammar needs at least one segment")
        for seg in self.segments:
            if not isinstance(seg, (Literal, Choice, Integer, String)):
                raise TypeError(f"segments must be Literal, Choice, Integer or String, got {seg!r}")
            if isinstance(seg, Choice):
                if not seg.options or not all(isinstance(o, str) and o for o in seg.options):
                    raise ValueError("a Choice needs at least one non-empty string option")
                clash = [(a, b) for a in seg.options for b in seg.options if a != b and b.startswith(a)]
                if clash:
                    raise ValueError(f"Choice options must not be prefixes of each other: {clash[0]}")
        self.eos = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)
        # The text of every token on its own (byte-level BPE pieces of a character decode to U+FFFD).
        self.texts = tokenizer.batch_decode([[i] for i in range(self.vocab_size)])
        special = set(tokenizer.all_special_ids)
        self.by_text: dict[str, list[int]] = {}
        for i, t in enumerate(self.texts):
            if t and i not in special:
                self.by_text.setdefault(t, []).append(i)
        self.digit_mask = self._mask(lambda t: t.isascii() and t.isdigit(), special)
        self.lengths = torch.tensor([len(t) for t in self.texts])
        self.no_leading_zero = torch.tensor([not t.startswith("0") or t == "0" for t in self.texts])
        # Inside a JSON string: printable ASCII except quote and backslash, exactly the characters
        # json.dumps writes unescaped (it escapes control characters, DEL and non-ASCII).
        self.string_mask = self._mask(
            lambda t: t != "" and '"' not in t and "\\" not in t and all(" " <= ch <= "~" for ch in t), special)

    def _mask(self, keep, special) -> torch.Tensor:
        return torch.tensor([keep(t) and i not in special for i, t in enumerate(self.texts)])

    def _prefix_tokens(self, text: str) -> list[int]:
        """Tokens whose text is a non-empty prefix of `text`."""
        return [i for k in range(1, len(text) + 1) for i in self.by_text.get(text[:k], [])]

    def start(self):
        return (0, "")

    def done(self, state) -> bool:
        return state[0] >= len(self.segments)

    def allowed(self, state) -> torch.Tensor:
        index, partial = state
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        if index >= len(self.segments):
            mask[self.eos] = True
            return mask
        seg = self.segments[index]
        if isinstance(seg, Literal):
            mask[self._prefix_tokens(seg.text[len(partial):])] = True
        elif isinstance(seg, Choice):
            for option in seg.options:
                if option.startswith(partial) and option != partial:
                    mask[self._prefix_tokens(option[len(partial):])] = True
        else:  # Integer or String: free text of one kind, ended by the start of the next segment
            if isinstance(seg, Integer):
                room = seg.max_digits - len(partial)
                if partial != "0" and room > 0:
                    mask |= self.digit_mask & (self.lengths <= room)
                    if partial == "":  # no leading zero ("07" is not JSON)
                        mask &= self.no_leading_zero
                can_end = partial != ""
            else:
                if len(partial) < seg.max_chars:
                    mask |= self.string_mask
                can_end = True
            if can_end:
                mask |= self._next_start_mask(index)
        return mask

    def _next_start_mask(self, index) -> torch.Tensor:
        """Tokens that begin the segment after `index` (it must be a Literal or the end)."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        if index + 1 >= len(self.segments):
            mask[self.eos] = True
        else:
            nxt = self.segments[index + 1]
            if not isinstance(nxt, Literal):
                raise ValueError("an Integer or String segment must be followed by a Literal or the end")
            mask[self._prefix_tokens(nxt.text)] = True
        return mask

    def advance(self, state, token_id: int):
        """The state after emitting `token_id` (which `allowed(state)` permitted)."""
        index, partial = state
        if index >= len(self.segments):
            return state
        seg, text = self.segments[index], self.texts[token_id]
        if isinstance(seg, (Integer, String)):
            ok = self.string_mask[token_id] if isinstance(seg, String) else self.digit_mask[token_id]
            if ok:
                return (index, partial + text)
            if token_id == self.eos:
                return (len(self.segments), "")
            index, partial, seg = index + 1, "", self.segments[index + 1]  # the token starts the next literal
        partial += text
        target = seg.text if isinstance(seg, Literal) else partial
        if isinstance(seg, Choice):
            complete = partial in seg.options and not any(o != partial and o.startswith(partial)
                                                          for o in seg.options)
        else:
            complete = partial == target
        return (index + 1, "") if complete else (index, partial)


def label_grammar(tokenizer, labels) -> Grammar:
    """The output must be exactly one of `labels`, then end-of-sequence."""
    if isinstance(labels, str) or not labels:
        raise ValueError("labels must be a non-empty list of strings")
    return Grammar(tokenizer, [Choice(tuple(labels))])


def json_grammar(tokenizer, fields: dict) -> Grammar:
    """A flat JSON object with these keys in this order, written like json.dumps writes it.

    fields: name -> int (an integer), str (a string), or a list of allowed values (str or None),
    e.g. {"item": str, "quantity": int, "size": ["small", "medium", "large", None]}.
    """
    if not isinstance(fields, dict) or not fields:
        raise ValueError("fields must be a non-empty dict: name -> int, str or a list of values")
    segments, sep = [], "{"
    for name, kind in fields.items():
        key = sep + json.dumps(name) + ": "
        if kind is int:
            segments += [Literal(key), Integer()]
        elif kind is str:
            segments += [Literal(key + '"'), String(), Literal('"')]
        elif isinstance(kind, (list, tuple)) and kind:
            segments += [Literal(key), Choice(tuple(json.dumps(v) for v in kind))]
        else:
            raise ValueError(f"field {name!r}: kind must be int, str or a non-empty list of values, "
                             f"got {kind!r}")
        sep = ", "
    segments.append(Literal("}"))
    # merge neighbouring literals ('"' + ', "next": ') so that a string can end with one token
    merged = []
    for seg in segments:
        if merged and isinstance(seg, Literal) and isinstance(merged[-1], Literal):
            merged[-1] = Literal(merged[-1].text + seg.text)
        else:
            merged.append(seg)
    return Grammar(tokenizer, merged)


# ----------------------------------------------------------------------------------------------
# Grammars given as a character automaton (lesson 16: utils.json_schema_grammar builds the automaton)


class TokenTrie:
    """The vocabulary as a trie of token texts: node = [token ids ending here, {char: child node}]."""

    def __init__(self, tokenizer):
        self.texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        special = set(tokenizer.all_special_ids)
        self.root: list = [[], {}]
        for i, text in enumerate(self.texts):
            if not text or i in special:
                continue
            node = self.root
            for ch in text:
                node = node[1].setdefault(ch, [[], {}])
            node[0].append(i)

    def readable(self, nfa, state: int) -> tuple[list[int], list[int]]:
        """Ids of the tokens whose whole text the automaton can read from `state`, and of those among
        them that stay inside a string value at every character (they make a string longer)."""
        found, looping, todo = [], [], [(self.root, state, True)]
        while todo:
            node, at, loops = todo.pop()
            for ch, child in node[1].items():
                nxt = nfa.step(at, ch)
                if nxt >= 0:
                    found.extend(child[0])
                    inside = loops and nfa.in_string(nxt)
                    if inside:
                        looping.extend(child[0])
                    if child[1]:
                        todo.append((child, nxt, inside))
        return found, looping


_TRIES: dict[int, tuple[object, TokenTrie]] = {}  # id(tokenizer) -> (tokenizer, its trie): built once


def token_trie(tokenizer) -> TokenTrie:
    if id(tokenizer) not in _TRIES or _TRIES[id(tokenizer)][0] is not tokenizer:
        _TRIES[id(tokenizer)] = (tokenizer, TokenTrie(tokenizer))
    return _TRIES[id(tokenizer)][1]


DONE = (-2, 0)  # the state after the end-of-sequence token


class SchemaGrammar:
    """Which tokens may come next, for the texts an NFA accepts (lesson 07's grammar interface).

    A state is (automaton state id, characters written so far in the current string value), or DONE
    after end-of-sequence. Masks are cached per automaton state, so after the first visit of a state a
    step costs a dict lookup; the string length bound is two tensor operations on top.
    """

    def __init__(self, tokenizer, nfa, fragment: tuple[int, int], max_string_chars: int = 200):
        nfa.finish(fragment)
        self.nfa, self.trie = nfa, token_trie(tokenizer)
        self.eos, self.vocab_size = tokenizer.eos_token_id, len(tokenizer)
        self.max_string_chars = max_string_chars
        self.lengths = torch.tensor([len(t) for t in self.trie.texts])  # (vocab,) characters per token
        self.first = (nfa.state_of([fragment[0]]), 0)
        self.masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # state -> (allowed, stays in string)

    def start(self):
        return self.first

    def masks_of(self, at: int) -> tuple[torch.Tensor, torch.Tensor]:
        if at not in self.masks:
            allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
            looping = torch.zeros(self.vocab_size, dtype=torch.bool)
            if at >= 0:
                found, loops = self.trie.readable(self.nfa, at)
                allowed[found] = True
                looping[loops] = self.nfa.in_string(at)
            if at == DONE[0] or self.nfa.accepts(at):
                allowed[self.eos] = True
            self.masks[at] = (allowed, looping)
        return self.masks[at]

    def allowed(self, state) -> torch.Tensor:
        """Boolean mask (vocab,) of the tokens allowed after `state`."""
        at, written = state
        allowed, looping = self.masks_of(at)
        if written == 0 or not looping.any():
            return allowed
        # inside a string: a token that stays inside must fit in what is left of max_string_chars
        return allowed & ~(looping & (self.lengths > self.max_string_chars - written))

    def advance(self, state, token_id: int):
        """The state after `token_id`; ValueError if the grammar does not allow it."""
        at, written = state
        if state == DONE or token_id == self.eos:
            if state == DONE or self.nfa.accepts(at):
                return DONE
        else:
            for ch in self.trie.texts[token_id]:
                nxt = self.nfa.step(at, ch)
                if nxt < 0:
                    break
                written = written + 1 if self.nfa.in_string(at) and self.nfa.in_string(nxt) else 0
                at = nxt
            else:
                return (at, written)
        raise ValueError(f"token {token_id} ({self.trie.texts[token_id]!r}) is not allowed here by the grammar")

    def done(self, state) -> bool:
        return state == DONE

    def accepts_text(self, text: str) -> bool:
        """Whether `text` is a complete output of this grammar. Example: '{"a": 1}' -> True."""
        return self.nfa.accepts(self.nfa.read(self.first[0], text))
