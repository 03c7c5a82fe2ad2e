"""utils.continuous_batching (and the server's batching="continuous"): the same tokens as one-at-a-time
decoding, requests joining and leaving a running batch, fewer forward passes, and a measured speed-up.

Fast tests use the stand-in Llama of tests/standin.py (2 layers, 32 wide, random weights): its greedy
tokens are arbitrary, so equal token lists mean equal computations. The slow test starts a real server
process with that model and drives it with utils.load_generator.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.standin import tiny_chat_model
from utils.continuous_batching import ContinuousBatcher, eos_token_ids, kv_cache_bytes, left_pad, start_engine
from utils.sampling import generate, stream_tokens

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    return tiny_chat_model()


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(2, 30))] for _ in range(n)]


def one_at_a_time(model, prompts, max_new_tokens, eos) -> list[list[int]]:
    """Lesson 06's KV-cached loop, one prompt after another: the reference."""
    replies = []
    for prompt, n in zip(prompts, max_new_tokens):
        out = generate(model, torch.tensor([prompt]), n, eos_token_id=sorted(eos) or None)[0, len(prompt):].tolist()
        end = next((i + 1 for i, t in enumerate(out) if t in eos), len(out))  # up to its eos, included
        replies.append(out[:end])
    return replies


def test_left_pad_pads_masks_and_caches_on_the_left():
    assert left_pad(torch.tensor([[1, 1]]), 4).tolist() == [[0, 0, 1, 1]]
    keys = torch.ones(2, 3, 5, 4)  # (B, H, L, D)
    padded = left_pad(keys, 7)
    assert padded.shape == (2, 3, 7, 4) and padded[:, :, :2].abs().sum() == 0 and padded[:, :, 2:].eq(1).all()


def test_kv_cache_bytes_arithmetic_and_bad_input():
    assert kv_cache_bytes(30, 3, 64, 1000) == 2 * 30 * 3 * 64 * 1000 * 4  # SmolLM2-135M, float32
    assert kv_cache_bytes(30, 3, 64, 1000, bytes_per_value=2) == 23_040_000
    with pytest.raises(ValueError, match="n_layers"):
        kv_cache_bytes(0, 3, 64, 10)
    with pytest.raises(TypeError, match="tokens"):
        kv_cache_bytes(30, 3, 64, 1.5)


def test_greedy_tokens_equal_one_at_a_time_while_requests_join_and_leave(tiny):
    model, tokenizer = tiny
    prompts = random_prompts(7)
    lengths = [3, 12, 1, 20, 7, 15, 9]  # different lengths: rows leave at different steps
    reference = one_at_a_time(model, prompts, lengths, eos=set())
    # an end-of-sequence id that the reference produces mid-reply: that row must stop right there
    eos = {reference[3][4]}
    reference = one_at_a_time(model, prompts, lengths, eos)
    engine = ContinuousBatcher(model, eos, max_batch_size=3)  # 7 requests, 3 slots: most wait, then join
    sequences = [engine.submit(p, n) for p, n in zip(prompts, lengths)]
    while engine.waiting or engine.running:
        engine.step()
    assert [s.tokens for s in sequences] == reference
    assert sequences[3].finish_reason == "stop" and sequences[3].tokens[-1] in eos
    assert sequences[2].finish_reason == "length" and len(sequences[2].tokens) == 1
    assert max(engine.batch_sizes) == 3  # the batch was full ...
    assert len(engine.batch_sizes) < sum(len(r) for r in reference) - len(prompts)  # ... so steps were shared
    assert engine.running == [] and engine.mask.shape == (0, 0)  # nothing left behind


def test_a_request_submitted_mid_run_joins_the_running_batch(tiny):
    model, _ = tiny
    prompts = random_prompts(3, seed=1)
    engine = ContinuousBatcher(model, set(), max_batch_size=4)
    first = engine.submit(prompts[0], 10)
    for _ in range(4):
        engine.step()
    late = [engine.submit(p, 6) for p in prompts[1:]]
    engine.step()
    assert len(engine.running) == 3  # the first one is still running, the late ones joined it
    while engine.running:
        engine.step()
    assert [s.tokens for s in [first, *late]] == one_at_a_time(model, prompts, [10, 6, 6], set())


def test_sampling_with_a_seeded_generator_draws_the_same_tokens(tiny):
    model, _ = tiny
    prompts = random_prompts(3, seed=2)
    expected = [torch.cat(list(stream_tokens(model, torch.tensor([p]), 8, temperature=0.9, top_p=0.95,
                                             generator=torch.Generator().manual_seed(i)))).tolist()
                for i, p in enumerate(prompts)]
    engine = ContinuousBatcher(model, set())
    sequences = [engine.submit(p, 8, temperature=0.9, top_p=0.95, generator=torch.Generator().manual_seed(i))
                 for i, p in enumerate(prompts)]
    while engine.running or engine.waiting:
        engine.step()
    assert [s.tokens for s in sequences] == expected


def test_batching_needs_fewer_forward_passes_and_less_cpu_time(tiny):
    model, _ = tiny
    prompts, n = random_prompts(8, seed=3), 24
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        torch.set_num_threads(1)
        start = time.process_time()
        reference = one_at_a_time(model, prompts, [n] * 8, set())
        alone_s, alone_calls = time.process_time() - start, len(calls)
        calls.clear()
        start = time.process_time()
        batched = ContinuousBatcher(model, set(), max_batch_size=8).generate(prompts, n)
        batched_s, batched_calls = time.process_time() - start, len(calls)
    finally:
        hook.remove()
    assert batched == reference
    assert alone_calls == 8 * n  # a prefill and n-1 decoding steps per request
    assert batched_calls == 8 + (n - 1)  # 8 prefills, then n-1 steps shared by all 8 rows
    assert alone_s > 1.5 * batched_s, (alone_s, batched_s)  # measured ~4.7x on 2 shared cores


def test_stream_from_threads_equals_one_at_a_time_and_cancel_frees_the_row(tiny):
    model, tokenizer = tiny
    prompts = random_prompts(4, seed=4)
    reference = one_at_a_time(model, prompts, [10] * 4, set())
    engine = start_engine(model, tokenizer, "continuous", max_batch_size=4)
    try:
        results = [None] * 4

        def read(i):
            results[i] = torch.cat(list(engine.stream(prompts[i], 10))).tolist()

        threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == reference
        stream = engine.stream(prompts[0], 400)  # long: would run ~400 steps if nobody stopped it
        next(stream)
        stream.close()  # the reader leaves: the engine drops the request
        deadline = time.monotonic() + 30
        while engine.running or engine.waiting:
            assert time.monotonic() < deadline, "a cancelled request kept running"
            time.sleep(0.01)
    finally:
        engine.stop()
    assert engine.thread is None
    assert start_engine(model, tokenizer, "one_at_a_time") is None


def test_submit_refuses_bad_input(tiny):
    model, _ = tiny
    engine = ContinuousBatcher(model, set())
    with pytest.raises(TypeError, match="prompt_ids"):
        engine.submit("hello", 4)
    with pytest.raises(TypeError, match="prompt_ids"):
        engine.submit([], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit([1, 2], 0)
    with pytest.raises(ValueError, match="context"):
        engine.submit([1, 2], 600)  # the stand-in has 512 positions
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([1, 2], 4, temperature=-1.0)
    with pytest.raises(ValueError, match="max_batch_size"):
        ContinuousBatcher(model, set(), max_batch_size=0)
    with pytest.raises(RuntimeError, match="start"):
        next(engine.stream([1, 2], 3))
    assert eos_token_ids(model, tiny[1]) == {tiny[1].eos_token_id}


def test_the_server_gives_the_same_replies_with_continuous_batching(tiny):
    import httpx

    from utils.load_generator import one_request
    from utils.serving import create_app

    prompts = ["What is a KV cache?", "Name a prime.", "Hi", "Why batch requests?", "Count to three."]

    async def ask_all(app) -> list[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            replies = await asyncio.gather(*(one_request(client, "/v1/chat/completions", p, 12) for p in prompts))
        return [r["text"] for r in replies]

    alone = asyncio.run(ask_all(create_app(*tiny)))
    app = create_app(*tiny, batching="continuous")
    try:
        batched = asyncio.run(ask_all(app))
        assert max(app.state.engine.batch_sizes) > 1  # the requests really shared steps
    finally:
        app.state.engine.stop()
    assert batched == alone and all(alone)
    with pytest.raises(ValueError, match="batching must be one of"):
        create_app(*tiny, batching="paged")


SERVE_TINY = """
import sys
import uvicorn
from tests.standin import tiny_chat_model
from utils.serving import create_app
uvicorn.run(create_app(*tiny_chat_model(), instance_id="tiny", batching=sys.argv[2]), host="127.0.0.1",
            port=int(sys.argv[1]), log_level="warning", proxy_headers=False)
"""


@pytest.mark.slow
def test_load_generator_against_real_server_processes():
    from utils.load_generator import measure_load
    from utils.server_process import free_port, read_health

    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(8)]
    results = {}
    for batching in ("one_at_a_time", "continuous"):
        port = free_port()
        process = subprocess.Popen([sys.executable, "-c", SERVE_TINY, str(port), batching], cwd=REPO,
                                   env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while (read_health(f"http://127.0.0.1:{port}") or {}).get("instance_id") != "tiny":
                assert process.poll() is None, process.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the tiny server did not start"
                time.sleep(0.2)
            results[batching] = measure_load(f"http://127.0.0.1:{port}/v1", prompts, concurrency=4, max_tokens=24)
        finally:
            process.terminate()
            process.wait(10)
    alone, batched = results["one_at_a_time"], results["continuous"]
    assert batched["texts"] == alone["texts"]
    assert alone["tokens"] == batched["tokens"] == 8 * 24
    for result in (alone, batched):
        assert 0 < result["ttft_p50_s"] <= result["ttft_p95_s"] <= result["latency_p95_s"]
    with pytest.raises(ValueError, match="loopback"):
        measure_load("http://10.1.2.3:8000/v1", prompts, 2)
