"""A bounded asyncio load generator for an OpenAI-style chat server on this machine (lesson 17).

A server's speed is two numbers that pull against each other: throughput (tokens per second over all
requests) and latency (how long ONE user waits). `measure_load` sends every prompt as a streamed chat
completion with at most `concurrency` requests in flight (an asyncio semaphore: the "bounded" part, so
the client never opens more connections than a real fleet of users would), and measures per request

    time to first token (TTFT)  from sending the request to the first piece of content
    total latency               from sending the request to the end of its stream
    completion tokens           from the stream's final usage chunk

    result = measure_load(server.base_url, prompts, concurrency=4, max_tokens=16)
    result["tokens_per_s"], result["ttft_p50_s"], result["latency_p95_s"]

Loopback only: the URL must name 127.0.0.1, ::1 or localhost. Shown in lesson 17.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from urllib.parse import urlsplit

import numpy as np

from utils.checks import check_positive_int, check_text_list
from utils.server_process import check_loopback

MODEL_ID = "SmolLM2-135M-Instruct"  # the model name the course server answers to (utils.serving.MODEL_ID)


async def one_request(client, url: str, prompt: str, max_tokens: int, model: str = MODEL_ID) -> dict:
    """Send one streamed, greedy chat completion; {"ttft_s", "latency_s", "tokens", "text"}."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    ttft, tokens, pieces = None, 0, []
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(f"the server failed mid-stream: {event['error']}")
            for choice in event.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - sent
                    pieces.append(piece)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - sent
    return {"ttft_s": latency if ttft is None else ttft, "latency_s": latency, "tokens": tokens,
            "text": "".join(pieces)}


async def run_load(base_url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """All prompts, at most `concurrency` at a time (coroutine; measure_load runs it for you)."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    url = base_url.rstrip("/") + "/chat/completions"
    limits = httpx.Limits(max_connections=concurrency)
    # trust_env=False: straight to loopback, never through a proxy; no read timeout for slow servers
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=httpx.Timeout(600.0)) as client:

        async def bounded(prompt: str) -> dict:
            async with gate:
                return await one_request(client, url, prompt, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - start
    return summarize(results, wall, concurrency)


def summarize(results: list[dict], wall_s: float, concurrency: int) -> dict:
    """Throughput and the p50/p95 of TTFT and latency over the requests' results."""
    ttft = [r["ttft_s"] for r in results]
    latency = [r["latency_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": wall_s,
            "tokens_per_s": tokens / wall_s,
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95)),
            "latency_p50_s": float(np.percentile(latency, 50)), "latency_p95_s": float(np.percentile(latency, 95)),
            "texts": [r["text"] for r in results]}


def measure_load(base_url: str, prompts: list[str], concurrency: int, max_tokens: int = 16) -> dict:
    """Run run_load to the end and return its summary (works inside Jupyter, whose event loop is busy:
    the load runs in an event loop of its own, in a helper thread). Shown in lesson 17.

    Example: measure_load("http://127.0.0.1:8000/v1", ["Hi"] * 8, concurrency=4)["tokens_per_s"] -> 41.3
    """
    host = urlsplit(base_url).hostname
    check_loopback(host if host is not None else "")
    check_text_list("prompts", prompts)
    check_positive_int("concurrency", concurrency)
    check_positive_int("max_tokens", max_tokens)
    outcome: dict = {}

    def worker():
        try:
            outcome["result"] = asyncio.run(run_load(base_url, prompts, concurrency, max_tokens))
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=worker, name="load-generator")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
