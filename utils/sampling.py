"""Turning next-token logits into text: sampling rules and a generate() loop with a KV cache (lesson 06).

* `next_token_probs(logits, temperature, top_k, top_p)`: the distribution the next token is drawn
  from, after temperature scaling, top-k and top-p (nucleus) filtering. temperature=0 means
  greedy: all probability on the most likely token.
* `sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None)`: one
  token id per row, (B, vocab) -> (B,).
* `apply_repetition_penalty(logits, token_ids, penalty)`: make tokens already in the text less
  likely (the CTRL paper's rule, as transformers applies it).
* `generate(model, input_ids, max_new_tokens, ...)`: the decoding loop, with or without a KV cache,
  for the course's own models (`utils.gpt`, `forward(ids, kv_cache=)`) and for transformers
  causal LMs (`past_key_values`). With the cache each step feeds only the newest token; without
  it each step re-reads the whole text. Both give the same tokens.
* `stream_tokens(...)`: the same loop as a Python generator, one token per step (for streaming).

Bad arguments (a negative temperature, top_p outside (0, 1], top_k < 1, ...) raise ValueError
saying what is allowed.
"""

from __future__ import annotations

import math

import torch

from utils.checks import check_int

# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape (batch, vocab), got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (batch, vocab), got {tuple(logits.shape)} "
                         "(take the last position: logits[:, -1, :])")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")


def check_sampling_args(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0) -> None:
    """Raise ValueError/TypeError unless every sampling setting is in its allowed range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number >= 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy, 1 = the model's own distribution, "
                         f">1 flatter), got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be None (no limit) or an int >= 1 (keep the k most likely "
                             f"tokens), got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise TypeError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (the probability mass to keep; 1 keeps all), "
                             f"got {top_p}")
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)):
        raise TypeError(f"repetition_penalty must be a number > 0, got {repetition_penalty!r}")
    if not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off, >1 discourages repeats), "
                         f"got {repetition_penalty}")


# --------------------------------------------------------------------------------------------
# From logits to a token
# --------------------------------------------------------------------------------------------

def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. (B, V) -> (B, V).

    top-k keeps the k largest logits (ties with the k-th are kept too). top-p keeps the smallest
    set of most likely tokens whose probabilities add up to at least top_p; the most likely token
    is always kept, so a tiny top_p is greedy.

    Shown in lesson 06.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p                 # the nucleus is already full without it
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """The distribution sample_next_token draws from: (B, V) logits -> (B, V) probabilities.

    temperature divides the logits before the softmax: < 1 sharpens the distribution, > 1
    flattens it; 0 is the limit, all mass on the argmax (greedy).
    """
    check_logits(logits)
    check_sampling_args(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # Subtract the max first, in float64: dividing by a tiny temperature (1e-40) then gives -inf for
    # every other token and 0 for the best one (greedy in the limit), never inf - inf = NaN.
    logits = logits.double()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    return torch.softmax(filter_logits(logits, top_k, top_p), dim=-1).float()


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One next-token id per row: (B, V) logits -> (B,) LongTensor.

    temperature=0 is greedy (argmax, no randomness). Otherwise a draw from next_token_probs;
    pass a seeded torch.Generator to make the draw reproducible.

    Shown in lesson 06.
    """
    check_logits(logits)
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    probs = next_token_probs(logits, temperature, top_k, top_p)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, token_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token that already occurs in token_ids (B, T): logits (B, V) -> (B, V).

    A positive logit is divided by the penalty, a negative one multiplied, so that either way the
    token becomes less likely for penalty > 1 (how often it occurred does not matter).

    Shown in lesson 06.
    """
    check_sampling_args(repetition_penalty=penalty)
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, -1, token_ids)  # (B, T): the logits of tokens already in the text
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, token_ids, seen)


# --------------------------------------------------------------------------------------------
# The decoding loop
# --------------------------------------------------------------------------------------------

def is_hf_model(model) -> bool:
    """A transformers model (uses past_key_values) rather than a utils.gpt one (uses kv_cache)."""
    return hasattr(model, "prepare_inputs_for_generation") and hasattr(model, "generation_config")


def max_positions(model) -> int:
    """The longest sequence the model was built (or trained) for."""
    config = getattr(model, "config", None)
    for name in ("block_size", "max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise TypeError(f"cannot tell the context length of {type(model).__name__}: its config has no "
                    "block_size or max_position_embeddings")


class NextTokenLogits:
    """Callable: all token ids so far (B, T) -> logits of the next token (B, V).

    With use_cache it feeds the model only the tokens it has not seen yet and keeps their keys and
    values; without it, it re-reads the whole sequence every time.

    Shown in lesson 06.
    """

    def __init__(self, model, use_cache: bool, window: int):
        self.model, self.use_cache, self.window = model, use_cache, window
        self.hf = is_hf_model(model)
        self.cache, self.cached = None, 0  # the cache and how many tokens it holds

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.hf:  # transformers: past_key_values in, the updated cache out; only the last logits
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=self.use_cache,
                             logits_to_keep=1)
            if self.use_cache:
                self.cache = out.past_key_values
            return out.logits[:, -1, :]
        if self.use_cache and self.cache is None:
            from utils.attention import KVCache

            self.cache = KVCache(self.model.config.n_layer)
        return self.model(ids, kv_cache=self.cache)[:, -1, :]  # the cache is updated in place

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.window:  # sliding window: keep the last `window` tokens
            ids = ids[:, -self.window:]
            # Their positions have all shifted by one, so every cached key and value is stale: start
            # over (a cache that could shift is what "rolling" caches of RoPE models do).
            self.cache, self.cached = None, 0
        if not self.use_cache:
            return self._forward(ids)
        logits = self._forward(ids[:, self.cached:])  # (B, T_new) -> (B, V)
        self.cached = ids.shape[1]
        return logits


@torch.inference_mode()
def stream_tokens(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                  use_cache: bool = True, generator: torch.Generator | None = None,
                  repetition_penalty: float = 1.0, sliding_window: bool = False, pad_token_id=None):
    """generate() as a Python generator: yields the next token ids (B,) one step at a time.

    Shown in lesson 06.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, time) tensor of token ids")
    check_int("max_new_tokens", max_new_tokens, low=0)
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    window = max_positions(model)
    total = input_ids.shape[1] + max_new_tokens - 1  # the last token is produced, never fed back
    if total > window and not sliding_window:
        raise ValueError(
            f"the prompt ({input_ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) needs "
            f"{total} positions, but the model has {window} (its context window). Shorten the "
            f"prompt or max_new_tokens, or pass sliding_window=True to feed only the last {window} "
            "tokens (the model then forgets the beginning).")
    stop = set() if eos_token_id is None else (
        {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id})
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (min(stop) if stop else 0)

    next_logits = NextTokenLogits(model, use_cache, window)
    ids = input_ids
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = next_logits(ids).float()  # (B, V)
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, ids, repetition_penalty)
        token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        if stop:
            token = torch.where(finished, torch.full_like(token, pad), token)  # done rows get padding
            finished |= torch.isin(token, stop_ids)
        ids = torch.cat([ids, token[:, None]], dim=1)
        yield token
        if stop and bool(finished.all()):
            return


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
             use_cache: bool = True, generator: torch.Generator | None = None,
             repetition_penalty: float = 1.0, sliding_window: bool = False, pad_token_id=None) -> torch.Tensor:
    """Continue input_ids by up to max_new_tokens tokens: (B, T) -> (B, T + n) LongTensor.

    temperature=0 is greedy; otherwise each token is drawn with sample_next_token (pass a seeded
    generator for a reproducible draw). eos_token_id (an id or a list of ids) stops a row once it
    produces one; later positions of that row get pad_token_id, and the loop ends when every row
    has stopped. use_cache=False re-reads the whole sequence each step (slower, same tokens).
    sliding_window=True allows texts longer than the model's context by feeding only the last
    max_positions(model) tokens. A 1-D input gives a 1-D output.
    """
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        return generate(model, input_ids[None], max_new_tokens, temperature, top_k, top_p, eos_token_id,
                        use_cache, generator, repetition_penalty, sliding_window, pad_token_id)[0]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long:
        raise TypeError("input_ids must be a torch.LongTensor of token ids, shape (batch, time) or (time,)")
    tokens = list(stream_tokens(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                use_cache, generator, repetition_penalty, sliding_window, pad_token_id))
    if not tokens:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
