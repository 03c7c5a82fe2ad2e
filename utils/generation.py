"""Many replies at once from a Hugging Face chat model: the course's one batched generator.

Shown in lesson 07 (and used by 08, 09, 12 and later lessons for every measurement).

Generating for a data set one prompt at a time wastes the machine: each step of each prompt is a
matrix-vector product. `generate_batch` runs `batch_size` prompts through every step together:

* **Left padding.** Prompts have different lengths; padding them on the *left* puts every prompt's last
  token in the same column, so each step reads every row's next-token logits from position -1. The
  attention mask hides the pads and the position ids skip them, so a padded row computes exactly what
  it would compute alone.
* **A KV cache.** After the prompt, each step feeds one new token per row; keys and values of earlier
  tokens are reused (lesson 06).
* **A shared prefix, computed once.** Few-shot prompts share hundreds of tokens (system prompt +
  examples). `SharedPrefix` runs them once and gives every batch a copy of their KV cache.

Each step picks a token per row greedily (temperature 0) or by sampling (lesson 06's
`sample_next_token`, reproducible with `seed`), optionally under a grammar (lesson 07's constrained
decoding: `utils.constrained`). A row stops at the end-of-sequence token or at a `stop` string.
"""

from __future__ import annotations

import copy

import torch

from utils.checks import check_int, check_positive_int, check_text
from utils.sampling import check_sampling_args, sample_next_token


def render_prompts(tokenizer, prompts) -> list[str]:
    """Prompt texts: a str is taken as already-rendered text, a list of chat messages is rendered with the
    model's chat template (generation prompt added). Example: [[{"role": "user", "content": "Hi"}]] ->
    ["<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"] (SmolLM2's template adds a system turn)."""
    if isinstance(prompts, (str, dict)) or not isinstance(prompts, (list, tuple)):
        raise TypeError("prompts must be a list (of prompt strings or of chat-message lists), "
                        f"got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts must be a non-empty list")
    texts = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            texts.append(check_text(f"prompts[{i}]", prompt))
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            for m in prompt:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError(f"prompts[{i}]: each message needs a 'role' and a 'content' string, got {m!r}")
            texts.append(tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True))
        else:
            raise TypeError(f"prompts[{i}] must be a prompt string or a non-empty list of message dicts, "
                            f"got {prompt!r}"[:300])
    return texts


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts. A rendered chat prompt already holds its special tokens: add none."""
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos (checked with `is not None`: id 0 is valid)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
    return pad


def shared_prefix_length(token_lists: list[list[int]]) -> int:
    """Length of the prefix common to all lists, leaving each at least one token of its own.

    Example: [[1, 2, 3], [1, 2, 4, 5]] -> 2;  [[1, 2], [1, 2]] -> 1.
    """
    n = min(len(t) for t in token_lists) - 1
    first = token_lists[0]
    for k in range(n):
        if any(t[k] != first[k] for t in token_lists):
            return k
    return max(n, 0)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


class SharedPrefix:
    """Runs the prefix all prompts share once; then runs left-padded suffixes on a copy of its KV cache."""

    def __init__(self, model, token_lists: list[list[int]]):
        self.model, self.device = model, model_device(model)
        self.length = shared_prefix_length(token_lists)
        self.cache = None
        if self.length:
            ids = torch.tensor([token_lists[0][: self.length]], device=self.device)  # (1, P)
            with torch.no_grad():
                self.cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values

    def run(self, suffixes: list[list[int]], pad_id: int, logits_to_keep: int = 1):
        """Forward [prefix][pads][suffix_i] for a batch; returns (output, attention_mask, last positions)."""
        b, p, width = len(suffixes), self.length, max(len(s) for s in suffixes)
        ids = torch.full((b, width), pad_id, dtype=torch.long)           # (b, W)
        mask = torch.zeros((b, p + width), dtype=torch.long)             # (b, P + W)
        mask[:, :p] = 1
        for i, s in enumerate(suffixes):  # left padding: every suffix ends at the last position
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, p + width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]  # (b, W): pads do not advance the position
        cache = None
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)  # the prefix cache is reused by every batch
            cache.batch_repeat_interleave(b)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=cache,
                         use_cache=True, logits_to_keep=logits_to_keep)
        return out, mask.to(self.device), positions[:, -1:].to(self.device)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts, max_new_tokens: int = 32, *, temperature: float = 0.0,
                   top_p: float | None = None, seed: int | None = None, batch_size: int = 16,
                   grammar=None, stop: str | None = None) -> list[str]:
    """Replies to many prompts, `batch_size` at a time, in the order of `prompts`.

    prompts: rendered prompt strings, or lists of chat messages (rendered with the chat template).
    temperature=0 is greedy; otherwise sampling (with top_p), reproducible for a given `seed`.
    grammar: a `utils.constrained.Grammar`: each step may only pick the tokens it allows.
    stop: a row also stops once its reply contains this string (the reply is cut before it).
    Example: generate_batch(model, tok, [[{"role": "user", "content": "Capital of France?"}]])
             -> ["The capital of France is Paris."]
    """
    texts = render_prompts(tokenizer, prompts)
    max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
    batch_size = check_positive_int("batch_size", batch_size)
    check_sampling_args(temperature, None, top_p)
    if stop is not None:
        check_text("stop", stop)
    generator = None
    if temperature > 0:
        generator = torch.Generator().manual_seed(check_int("seed", 0 if seed is None else seed, low=0))
    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    prompt_ids = encode_prompts(tokenizer, texts)
    prefix = SharedPrefix(model, prompt_ids)
    replies = []
    for start in range(0, len(texts), batch_size):
        rows = [p[prefix.length:] for p in prompt_ids[start:start + batch_size]]
        b = len(rows)
        out, mask, position = prefix.run(rows, pad)
        states = [grammar.start() for _ in range(b)] if grammar is not None else None
        done = torch.zeros(b, dtype=torch.bool)
        generated = [[] for _ in range(b)]
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float().cpu()  # (b, vocab): each row's next-token logits
            if grammar is not None:
                for i in range(b):
                    if not done[i]:
                        logits[i][~grammar.allowed(states[i])] = float("-inf")
            next_ids = sample_next_token(logits, temperature, top_p=top_p, generator=generator)  # (b,)
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
            next_ids[done] = pad  # finished rows keep running (batched), their tokens are ignored
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


def chat(model, tokenizer, user_message: str, system: str | None = None, max_new_tokens: int = 64) -> str:
    """One greedy chat turn: the reply text. Shown in lesson 00.

    Example: chat(model, tok, "What is the capital of France?") -> "The capital of France is Paris."
    """
    check_text("user_message", user_message)
    messages = ([{"role": "system", "content": check_text("system", system)}] if system is not None else [])
    return generate_batch(model, tokenizer, [messages + [{"role": "user", "content": user_message}]],
                          max_new_tokens)[0]
