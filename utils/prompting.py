"""Prompting, measured: chat prompts, cheap batched evaluation, constrained decoding, and honest statistics.

Lesson 07 uses these to compare prompting techniques on labelled data, and lesson 08 to evaluate a
fine-tuned model the same way.

* `chat_prompt` renders messages with the model's own chat template: the exact text the model sees.
* `score_choices` / `classify` score a fixed set of answers by log-likelihood: one batched forward
  pass instead of generating text, and the answer is always one of the labels.
* `generate_batch` is greedy decoding for many prompts at once (left padding, a KV cache, and the
  prompt prefix they all share computed only once), optionally under a `Grammar`: constrained
  decoding masks the logits of every token that would break the output format.
* `extract_json` / `check_shape` validate structured output; `accuracy_ci` (Wilson interval) and
  `mcnemar_p` say how much a difference measured on a few dozen examples can be trusted.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import re
from dataclasses import dataclass

import torch

# ------------------------------------------------------------------------------------------------
# What the model really sees


def chat_prompt(tokenizer, user: str, system: str | None = None, examples=()) -> str:
    """The prompt text for one user turn, rendered by the model's chat template.

    examples: (user, assistant) pairs shown as earlier turns of the conversation (few-shot).
    system=None lets the template insert its default system prompt (SmolLM2's does).
    """
    if not isinstance(user, str) or not user.strip():
        raise ValueError("user must be a non-empty string")
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in examples:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def show_tokens(tokenizer, text: str) -> list[tuple[int, str]]:
    """(token id, token text) for every token of `text`, as the model receives it."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [(i, tokenizer.decode([i])) for i in ids]


# ------------------------------------------------------------------------------------------------
# Batched forward passes that share the prompt prefix


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    return prompts


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _shared_prefix(token_lists: list[list[int]]) -> int:
    """Length of the token prefix common to all lists, leaving every list at least one token."""
    n = min(len(t) for t in token_lists) - 1
    first = token_lists[0]
    for k in range(n):
        if any(t[k] != first[k] for t in token_lists):
            return k
    return max(n, 0)


def _device(model) -> torch.device:
    return next(model.parameters()).device


class _PrefixRunner:
    """Runs the shared prefix once; then runs left-padded suffixes on top of a copy of its KV cache.

    Few-shot prompts share hundreds of tokens (system prompt + examples): computing them once for
    the whole data set instead of once per example is what makes few-shot evaluation cheap.
    """

    def __init__(self, model, token_lists: list[list[int]]):
        self.model, self.device = model, _device(model)
        self.prefix_len = _shared_prefix(token_lists)
        self.cache = None
        if self.prefix_len:
            ids = torch.tensor([token_lists[0][: self.prefix_len]], device=self.device)
            with torch.no_grad():
                self.cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values

    def run(self, suffixes: list[list[int]], pad_id: int, logits_to_keep: int = 1):
        """Forward [prefix][pads][suffix_i] for a batch; returns (output, attention_mask, positions)."""
        b, p, width = len(suffixes), self.prefix_len, max(len(s) for s in suffixes)
        ids = torch.full((b, width), pad_id, dtype=torch.long)
        mask = torch.zeros((b, p + width), dtype=torch.long)
        mask[:, :p] = 1
        for i, s in enumerate(suffixes):  # left padding: every suffix ends at the last position
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, p + width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]  # pads do not advance the position
        cache = None
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)  # the prefix cache is reused by every batch
            cache.batch_repeat_interleave(b)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=cache,
                         use_cache=True, logits_to_keep=logits_to_keep)
        return out, mask.to(self.device), positions[:, -1:].to(self.device)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # Rendered chat prompts already contain their special tokens: add none.
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


@torch.no_grad()
def score_choices(model, tokenizer, prompts, choices, batch_size: int = 16) -> torch.Tensor:
    """Log-likelihood of each choice after each prompt: a (len(prompts), len(choices)) tensor.

    score[i, j] = sum over the tokens of choices[j] of log p(token | prompts[i], earlier tokens).
    Nothing is generated, so the answer is always one of the choices, and all prompts go through
    the model in a few batched forward passes (the shared prompt prefix once).
    """
    prompts = _check_prompts(prompts)
    _check_batch_size(batch_size)
    if isinstance(choices, str) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("choices must be a list of at least two non-empty strings")
    prompt_ids = _encode(tokenizer, prompts)
    choice_ids = _encode(tokenizer, list(choices))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = torch.empty(len(prompts), len(choices))
    runner = _PrefixRunner(model, prompt_ids)
    for start in range(0, len(prompts), batch_size):
        chunk = [p[runner.prefix_len:] for p in prompt_ids[start:start + batch_size]]
        b = len(chunk)
        out, mask, position = runner.run(chunk, pad)  # each prompt runs once, whatever the choices
        first = out.logits[:, -1].float().log_softmax(-1).cpu()  # (b, vocab): the choice's first token
        for j, c in enumerate(choice_ids):
            total = first[:, c[0]].clone()  # (b,)
            if len(c) > 1:  # later tokens: feed the choice on a copy of the prompts' KV cache
                rest = torch.tensor(c[1:])
                ids = torch.tensor([c[:-1]]).expand(b, -1)  # (b, n-1)
                ext = torch.cat([mask, torch.ones((b, len(c) - 1), dtype=mask.dtype, device=mask.device)], 1)
                pos = position + torch.arange(1, len(c), device=position.device)  # (b, n-1)
                more = model(input_ids=ids.to(mask.device), attention_mask=ext, position_ids=pos,
                             past_key_values=copy.deepcopy(out.past_key_values), use_cache=True)
                logp = more.logits.float().log_softmax(-1).cpu()  # (b, n-1, vocab)
                total += logp[:, torch.arange(len(c) - 1), rest].sum(-1)
            scores[start:start + b, j] = total
    return scores


def classify(model, tokenizer, prompts, labels, batch_size: int = 16) -> list[str]:
    """The most likely label for each prompt (argmax of `score_choices`)."""
    best = score_choices(model, tokenizer, prompts, labels, batch_size).argmax(-1)
    return [labels[i] for i in best.tolist()]


# ------------------------------------------------------------------------------------------------
# Constrained decoding: a tiny grammar of output segments


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
        self.string_mask = self._mask(
            lambda t: t != "" and "\ufffd" not in t and '"' not in t and "\\" not in t
            and all(ord(ch) >= 32 for ch in t), special)

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


# ------------------------------------------------------------------------------------------------
# Batched greedy generation


@torch.no_grad()
def generate_batch(model, tokenizer, prompts, max_new_tokens: int = 32, batch_size: int = 16,
                   grammar: Grammar | None = None, stop: str | None = None) -> list[str]:
    """Greedy replies to many prompts, `batch_size` at a time; returns the reply texts.

    Left padding lets prompts of different lengths share one forward pass per step; the KV cache
    makes each step cost one token per sequence; the prefix all prompts share runs once.
    grammar: constrain every step to the tokens the grammar allows (see `Grammar`).
    stop: a sequence also stops once its reply contains this string (e.g. "\\n").
    """
    prompts = _check_prompts(prompts)
    _check_batch_size(batch_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompt_ids = _encode(tokenizer, prompts)
    runner = _PrefixRunner(model, prompt_ids)
    replies = []
    for start in range(0, len(prompts), batch_size):
        chunk = [p[runner.prefix_len:] for p in prompt_ids[start:start + batch_size]]
        b = len(chunk)
        out, mask, position = runner.run(chunk, pad)
        states = [grammar.start() for _ in range(b)] if grammar else None
        done = torch.zeros(b, dtype=torch.bool)
        generated = [[] for _ in range(b)]
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float().cpu()  # (b, vocab)
            if grammar is not None:
                for i in range(b):
                    if not done[i]:
                        logits[i][~grammar.allowed(states[i])] = float("-inf")
            next_ids = logits.argmax(-1)  # (b,)
            for i in range(b):
                if done[i]:
                    continue
                token = int(next_ids[i])
                if grammar is not None:
                    states[i] = grammar.advance(states[i], token)
                if token == eos:
                    done[i] = True
                    continue
                generated[i].append(token)
                if stop is not None and stop in tokenizer.decode(generated[i]):
                    done[i] = True
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            next_ids[done] = pad
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=mask.device)], dim=1)
            position = position + 1
            out = model(input_ids=next_ids[:, None].to(mask.device), attention_mask=mask,
                        position_ids=position, past_key_values=out.past_key_values, use_cache=True)
        for tokens in generated:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if stop is not None and stop in text:
                text = text[: text.index(stop)]
            replies.append(text.strip())
    return replies


# ------------------------------------------------------------------------------------------------
# Reading answers


def extract_json(text: str):
    """The first JSON object in `text` (a reply may wrap it in prose or ``` fences), or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text[match.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def check_shape(obj, fields: dict) -> list[str]:
    """What is wrong with `obj` for the shape `fields` (as in `json_grammar`); [] when it fits."""
    if not isinstance(obj, dict):
        return [f"not a JSON object: {obj!r}"]
    problems = [f"missing key {k!r}" for k in fields if k not in obj]
    problems += [f"unexpected key {k!r}" for k in obj if k not in fields]
    for name, kind in fields.items():
        if name not in obj:
            continue
        value = obj[name]
        if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
            problems.append(f"{name} should be an integer, got {value!r}")
        elif kind is str and not isinstance(value, str):
            problems.append(f"{name} should be a string, got {value!r}")
        elif isinstance(kind, (list, tuple)) and value not in kind:
            problems.append(f"{name} should be one of {list(kind)}, got {value!r}")
    return problems


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def find_numbers(text: str) -> list[float]:
    """All numbers in `text`, in order ("1,200" counts as 1200)."""
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text) if m.replace(",", "").strip("-")]


# ------------------------------------------------------------------------------------------------
# How much to trust an accuracy measured on n examples


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% for z=1.96).

    Unlike p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is sensible at k=0 or k=n.
    """
    for name, value in (("k", k), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int (a count), got {type(value).__name__} {value!r}")
    if n <= 0:
        raise ValueError(f"n must be a positive int (the number of examples), got {n!r}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be an int between 0 and n={n}, got {k!r}")
    if z <= 0:
        raise ValueError(f"z must be positive, got {z!r}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends, no rounding residue
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Accuracy:
    k: int  # correct
    n: int  # examples
    low: float  # Wilson 95% interval
    high: float

    @property
    def value(self) -> float:
        return self.k / self.n

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}] (n={self.n})"


def accuracy_ci(correct) -> Accuracy:
    """Accuracy of a list of booleans with its Wilson 95% interval."""
    correct = [bool(c) for c in correct]
    k, n = sum(correct), len(correct)
    if n == 0:
        raise ValueError("accuracy of an empty list is undefined: pass at least one result")
    low, high = wilson_interval(k, n)
    return Accuracy(k, n, low, high)


def mcnemar_p(correct_a, correct_b) -> float:
    """Exact two-sided McNemar test: are two techniques, run on the same examples, really different?

    Only the examples where exactly one of them is right carry information; under "no difference"
    each such example is a coin flip.
    """
    a, b = list(map(bool, correct_a)), list(map(bool, correct_b))
    if len(a) != len(b) or not a:
        raise ValueError("correct_a and correct_b must be non-empty and of the same length")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
