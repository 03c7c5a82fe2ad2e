"""Continuous batching: requests join and leave one running batch at every decoding step (lesson 17).

Lesson 11's server decodes one request at a time: a step of a 135M-parameter model reads all of its
weights from memory to produce ONE token, and the next request waits. A batch of B sequences reads
the same weights once per step and produces B tokens, so on a memory-bound machine a step of 8 costs
far less than 8 steps of 1. Static batching (`utils.generation.generate_batch`) starts a batch and
waits until its longest reply is done; requests that arrive meanwhile wait, and rows that finished
early keep computing padding. Continuous batching (Orca, 2022; vLLM, TGI, llama.cpp's server) makes
the decision at EVERY step:

    step():  1. admit  waiting requests (up to max_batch_size): run each prompt once ("prefill"),
                        which gives its KV cache and its first token, and add it to the batch
             2. decode  one token for every running sequence, in ONE batched forward pass
             3. retire  sequences that produced end-of-sequence or reached max_new_tokens: their
                        rows leave the batch, and a waiting request can take the place at once

The batch's KV cache is padded: each layer holds keys and values of shape (B, H, L, D), every
sequence's cache is right-aligned (left padding) and an attention mask (B, L) marks the padding,
which attention ignores. Each sequence keeps its own positions (the number of its real tokens), so
padding changes nothing it computes: greedy outputs are those of one-at-a-time decoding.
vLLM stores the cache in fixed-size pages instead ("PagedAttention"), so no memory is spent on padding
and a sequence never needs its cache copied; the scheduling idea is the same.

    engine = ContinuousBatcher(model, eos_token_ids={tokenizer.eos_token_id})
    replies = engine.generate([prompt_ids_1, prompt_ids_2, ...], max_new_tokens=32)  # lists of ids

In a server, `engine.start()` runs the steps in a background thread and each request reads its
tokens with `engine.stream(...)` (utils.serving's `batching="continuous"`). Shown in lesson 17.
"""

from __future__ import annotations

import collections
import queue
import threading
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from utils.checks import check_int, check_positive_int
from utils.sampling import check_sampling_args, max_positions, sample_next_token

BATCHING_MODES = ("one_at_a_time", "continuous")  # how utils.serving decodes concurrent requests


class Sequence:
    """One request inside the engine: its prompt and settings, the tokens produced so far, timings.

    finish_reason: None while running, then "stop" (an end-of-sequence token, kept as the last
    token) or "length" (max_new_tokens reached). outbox: each new token id, then None at the end
    (or the exception that stopped the engine).
    """

    def __init__(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float | None = None, generator: torch.Generator | None = None):
        self.prompt_ids, self.max_new_tokens = prompt_ids, max_new_tokens
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.cancelled = False  # set by a reader that went away: the engine drops the sequence
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None


def left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros added on the LEFT of dim -2 (keys/values (B, H, L, D)) or dim -1 (a mask (B, L)) up to `width`.

    Example: left_pad(torch.tensor([[1, 1]]), 4) -> tensor([[0, 0, 1, 1]])
    """
    if x.dim() == 2:
        return F.pad(x, (width - x.shape[-1], 0))
    return F.pad(x, (0, 0, width - x.shape[-2], 0))


class ContinuousBatcher:
    """A scheduler that decodes every running sequence in one batched step and admits new requests
    between steps. model: a transformers causal LM (the course's SmolLM2 or the test stand-in).

    max_batch_size: sequences decoded together; more requests wait in a queue (first come, first served).
    """

    def __init__(self, model, eos_token_ids, max_batch_size: int = 16):
        self.model = model
        self.eos = {int(t) for t in eos_token_ids}
        self.max_batch_size = check_positive_int("max_batch_size", max_batch_size)
        self.context = max_positions(model)
        self.waiting: collections.deque[Sequence] = collections.deque()  # guarded by self.wakeup
        self.running: list[Sequence] = []  # rows of the batch, in order; only step() touches it
        self.keys: list[torch.Tensor] = []  # per layer (B, H, L, D), left-padded
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # (B, L): 1 = a real token, 0 = padding
        self.batch_sizes: list[int] = []  # the batch size of every decoding step (what was shared)
        self.wakeup = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False

    # ------------------------------------------------------------------------------------------
    # Requests in

    def submit(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
               top_p: float | None = None, generator: torch.Generator | None = None) -> Sequence:
        """Queue a request; it joins the batch at the next step. Returns its Sequence."""
        if not isinstance(prompt_ids, list) or not prompt_ids or not all(isinstance(t, int) for t in prompt_ids):
            raise TypeError("prompt_ids must be a non-empty list of int token ids")
        check_positive_int("max_new_tokens", max_new_tokens)
        check_sampling_args(temperature, None, top_p)
        if len(prompt_ids) + max_new_tokens - 1 > self.context:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({max_new_tokens}) "
                             f"does not fit the model's context of {self.context} tokens")
        sequence = Sequence(prompt_ids, max_new_tokens, temperature, top_p, generator)
        with self.wakeup:
            self.waiting.append(sequence)
            self.wakeup.notify()
        return sequence

    # ------------------------------------------------------------------------------------------
    # One step of the engine

    @torch.inference_mode()
    def step(self) -> int:
        """Admit waiting requests, decode one token for every running sequence, retire finished
        ones. Returns how many tokens this step produced."""
        produced = 0
        while len(self.running) < self.max_batch_size:  # 1. admit
            with self.wakeup:
                sequence = self.waiting.popleft() if self.waiting else None
            if sequence is None:
                break
            if sequence.cancelled:
                continue
            logits, layers = self.prefill(sequence.prompt_ids)
            produced += self.emit(sequence, logits)
            if sequence.finish_reason is None:
                self.join(sequence, layers)
        self.retire()
        if not self.running:
            return produced
        last = torch.tensor([[s.tokens[-1]] for s in self.running])  # (B, 1): each row's newest token
        logits = self.decode(last)  # 2. decode: (B, vocab)
        self.batch_sizes.append(len(self.running))
        for row, sequence in enumerate(self.running):
            produced += self.emit(sequence, logits[row:row + 1])
        self.retire()  # 3. retire
        return produced

    def prefill(self, prompt_ids: list[int]):
        """Run one prompt alone: (next-token logits (1, vocab), its cache as [(keys, values)] per layer)."""
        out = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]  # (1, H, T, D) each
        return out.logits[:, -1].float(), layers

    def join(self, sequence: Sequence, layers) -> None:
        """Add a prefilled sequence as the last row of the batch, padding the shorter side on the left."""
        length = layers[0][0].shape[2]
        width = max(length, self.mask.shape[1])
        if not self.running:
            self.keys, self.values = [k for k, _ in layers], [v for _, v in layers]
            self.mask = torch.ones((1, length), dtype=torch.long)
        else:
            self.keys = [torch.cat([left_pad(K, width), left_pad(k, width)]) for K, (k, _) in zip(self.keys, layers)]
            self.values = [torch.cat([left_pad(V, width), left_pad(v, width)])
                           for V, (_, v) in zip(self.values, layers)]
            self.mask = torch.cat([left_pad(self.mask, width), left_pad(torch.ones((1, length), dtype=torch.long), width)])
        self.running.append(sequence)

    def decode(self, last: torch.Tensor) -> torch.Tensor:
        """One batched forward pass over each row's newest token: (B, 1) -> logits (B, vocab)."""
        mask = torch.cat([self.mask, torch.ones((len(self.running), 1), dtype=torch.long)], dim=1)  # (B, L+1)
        positions = self.mask.sum(dim=1, keepdim=True)  # (B, 1): a row's real tokens = the new one's position
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k, v, i)
        out = self.model(input_ids=last, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True)
        self.keys = [layer.keys for layer in out.past_key_values.layers]  # (B, H, L+1, D)
        self.values = [layer.values for layer in out.past_key_values.layers]
        self.mask = mask
        return out.logits[:, -1].float()

    def emit(self, sequence: Sequence, logits: torch.Tensor) -> int:
        """Pick the sequence's next token from its logits (1, vocab), hand it out, and finish the
        sequence if it is done. Returns 1 (the token produced)."""
        token = int(sample_next_token(logits, sequence.temperature, top_p=sequence.top_p,
                                      generator=sequence.generator)[0])
        sequence.tokens.append(token)
        if sequence.first_token_at is None:
            sequence.first_token_at = time.perf_counter()
        sequence.outbox.put(token)
        if token in self.eos:
            self.finish(sequence, "stop")
        elif len(sequence.tokens) >= sequence.max_new_tokens:
            self.finish(sequence, "length")
        return 1

    @staticmethod
    def finish(sequence: Sequence, reason: str) -> None:
        sequence.finish_reason, sequence.finished_at = reason, time.perf_counter()
        sequence.outbox.put(None)

    def retire(self) -> None:
        """Drop finished (or cancelled) rows, then cache columns that are padding in every row left."""
        keep = [row for row, s in enumerate(self.running) if s.finish_reason is None and not s.cancelled]
        if len(keep) == len(self.running):
            return
        index = torch.tensor(keep, dtype=torch.long)
        self.running = [self.running[row] for row in keep]
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.mask = self.mask.index_select(0, index)
        if keep:
            start = int((self.mask.sum(dim=0) > 0).nonzero()[0])  # the first column some row still uses
            self.keys = [k[:, :, start:] for k in self.keys]
            self.values = [v[:, :, start:] for v in self.values]
            self.mask = self.mask[:, start:]
        else:
            self.keys, self.values, self.mask = [], [], torch.zeros((0, 0), dtype=torch.long)

    # ------------------------------------------------------------------------------------------
    # Driving it: in this thread (generate) or in a background thread (start / stream / stop)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy replies (token ids, an end-of-sequence token included) to all prompts, run to the end
        in this thread. Example: engine.generate([[1, 2, 3], [4, 5]], 8) -> [[...], [...]]"""
        if self.thread is not None:
            raise RuntimeError("the engine runs in its background thread: use stream(), or stop() it first")
        sequences = [self.submit(list(p), max_new_tokens) for p in prompts]
        while self.waiting or self.running:
            self.step()
        return [s.tokens for s in sequences]

    def start(self) -> ContinuousBatcher:
        """Run steps in a daemon thread whenever there is work. Returns self."""
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self.loop, daemon=True, name="continuous-batcher")
            self.thread.start()
        return self

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def loop(self) -> None:
        while True:
            with self.wakeup:
                while not (self.stopping or self.waiting or self.running):
                    self.wakeup.wait()
                if self.stopping:
                    return
            try:
                self.step()
            except Exception as err:  # tell every reader, and start again with an empty batch
                with self.wakeup:
                    failed, self.waiting = [*self.running, *self.waiting], collections.deque()
                for sequence in failed:
                    sequence.outbox.put(err)
                self.running, self.keys, self.values = [], [], []
                self.mask = torch.zeros((0, 0), dtype=torch.long)

    def stream(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
               top_p: float | None = None, generator: torch.Generator | None = None):
        """Yield the request's tokens as (1,) tensors, as they are produced (like
        utils.sampling.stream_tokens with a batch of one). Needs start(). Closing the iterator
        early cancels the request."""
        if self.thread is None:
            raise RuntimeError("call start() first: stream() waits for tokens from the background thread")
        sequence = self.submit(prompt_ids, max_new_tokens, temperature, top_p, generator)
        try:
            while True:
                item = sequence.outbox.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise RuntimeError("the batching engine failed") from item
                yield torch.tensor([item])
        finally:
            sequence.cancelled = True  # no effect once finished; otherwise the engine drops it


def eos_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a reply: the tokenizer's eos and the model's generation_config eos (one or a list)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, (list, tuple)) else [eos])
    return {int(t) for t in ids if t is not None}


def start_engine(model, tokenizer, batching: str, max_batch_size: int = 16) -> ContinuousBatcher | None:
    """A started engine for batching="continuous", None for "one_at_a_time" (what utils.serving calls)."""
    if batching == "one_at_a_time":
        return None
    return ContinuousBatcher(model, eos_token_ids(model, tokenizer), max_batch_size).start()


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, bytes_per_value: int = 4) -> int:
    """Bytes of keys + values for `tokens` positions of one model. Example: (30, 3, 64, 1000) -> 46_080_000
    (SmolLM2-135M, 1000 tokens, float32)."""
    for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                        ("bytes_per_value", bytes_per_value)):
        check_positive_int(name, value)
    check_int("tokens", tokens, low=0)
    return 2 * n_layers * n_kv_heads * head_dim * tokens * bytes_per_value
