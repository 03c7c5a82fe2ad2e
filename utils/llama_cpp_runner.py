"""The course's GGUF file run by llama.cpp, the C/C++ engine under Ollama and LM Studio (lesson 11).

transformers de-quantises the packaged Q4_1 file once, to float32, and multiplies float32 matrices:
every new token reads ~538 MB of weights. llama.cpp keeps the 4-bit blocks and computes with them
directly (each block's 4-bit integers times 8-bit activations, then the block's scale and minimum):
the same weights (lesson 11 checks that the float32 ones ARE the decoded blocks), ~97 MB read per
token. Decoding one token at a time is bound by memory bandwidth, so the ratio of bytes predicts the
ratio of speeds (`weight_bytes_per_token`).

* `llama_cpp_status()`: is llama-cpp-python importable here, and if not, how to install it.
* `load_llama_cpp(n_threads)`: the packaged GGUF (its sha256 checked first) as a `llama_cpp.Llama`.
* `llama_cpp_greedy` / `torch_greedy`: greedy token ids from the same prompt ids, for each engine.
* `median_tokens_per_s(generate)`: a generation function timed the same way for both engines.
* `first_difference(a, b)`: where two token lists part ways.

llama-cpp-python ships as source on PyPI: `pip install` compiles llama.cpp (cmake and a C++
compiler needed; 6 to 15 CPU-minutes, seconds once pip has cached the wheel).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import torch

from utils.checks import check_int, check_positive_int
from utils.models import (
    CHAT_GGUF_FILE,
    CHAT_GGUF_SHA256,
    CHAT_PACKAGE,
    CHAT_PACKAGE_PIP,
    package_folder,
    verify_sha256,
)

LLAMA_CPP_PIP = "llama-cpp-python==0.3.36"  # the version the course tested
LLAMA_CPP_INSTALL = f'pip install "{LLAMA_CPP_PIP}"'
LLAMA_CPP_BUILD_TIME = "it compiles llama.cpp from source: 6 to 15 CPU-minutes, measured on 2-core machines"


def llama_cpp_status() -> str | None:
    """None when `llama_cpp` can be imported; otherwise a sentence saying how to install it.

    Example: on a machine without it -> "llama-cpp-python is not installed: pip install ..."
    """
    if importlib.util.find_spec("llama_cpp") is not None:
        return None
    return (f"llama-cpp-python is not installed: {LLAMA_CPP_INSTALL} ({LLAMA_CPP_BUILD_TIME}; "
            "pip caches the wheel, so a second install takes seconds)")


def packaged_gguf_path() -> Path:
    """The course's chat model file (SmolLM2-135M-Instruct, Q4_1), after checking its sha256."""
    path = package_folder(CHAT_PACKAGE, CHAT_PACKAGE_PIP) / CHAT_GGUF_FILE
    verify_sha256(path, CHAT_GGUF_SHA256)  # the C++ loader trusts the file: check it is the pinned one
    return path


def load_llama_cpp(n_threads: int = 1, n_ctx: int = 512):
    """The packaged GGUF loaded by llama.cpp, decoding with `n_threads` threads. Shown in lesson 11.

    n_ctx: the context (KV cache) size in tokens; 512 keeps the cache at ~12 MB for SmolLM2.
    The file is memory-mapped, not copied: it costs ~100 MB of page cache, shared with other readers.
    """
    n_threads = check_positive_int("n_threads", n_threads)
    n_ctx = check_int("n_ctx", n_ctx, low=16, high=8192, what=" (tokens; SmolLM2 was trained on 8192)")
    problem = llama_cpp_status()
    if problem:
        raise ImportError(problem)
    import llama_cpp

    path = packaged_gguf_path()
    # llama.cpp may copy the weights into "extra buffer types" laid out for special instructions (AMX
    # tiles on recent Xeons). Some virtual machines list AMX in /proc/cpuinfo without enabling it, and
    # the process then dies with SIGILL: use the plain layout (the file's blocks, AVX2/AVX-512 kernels).
    # llama-cpp-python has no argument for it, so its default model parameters are adjusted while loading.
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def plain_layout_params():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = plain_layout_params
    try:
        # n_batch: prompt tokens per forward pass; llama-cpp-python keeps an (n_batch, vocab) float32
        # logits buffer, 12 MB at 64 (100 MB at 512). verbose=False: no C-level log lines on stderr.
        return llama_cpp.Llama(model_path=str(path), n_threads=n_threads, n_threads_batch=n_threads,
                               n_ctx=n_ctx, n_batch=min(n_ctx, 64), seed=0, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_params


def _check_prompt(prompt_ids) -> list[int]:
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise TypeError(f"prompt_ids must be a non-empty list of token ids, got {type(prompt_ids).__name__}")
    for token in prompt_ids:
        check_int("a prompt token id", token, low=0)
    return list(prompt_ids)


def llama_cpp_greedy(llm, prompt_ids, max_new_tokens: int, eos_token_id: int) -> list[int]:
    """Greedy decoding with llama.cpp: up to `max_new_tokens` new ids, stopping before `eos_token_id`.

    The prompt is given as token ids (the course tokenizer's), so both engines read the same input.
    Example: llama_cpp_greedy(llm, [1, 9690, 198], 8, eos_token_id=2) -> [504, 3459, ...] (8 ids or fewer)
    """
    prompt_ids = _check_prompt(prompt_ids)
    max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
    llm.reset()  # forget the previous call's KV cache, so every call processes the whole prompt
    new = []
    for token in llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True):  # temp 0: argmax
        if token == eos_token_id:
            break
        new.append(int(token))
        if len(new) == max_new_tokens:
            break
    return new


@torch.no_grad()
def torch_greedy(model, prompt_ids, max_new_tokens: int, eos_token_id: int) -> list[int]:
    """Greedy decoding with transformers' generate (KV cache): the same contract as `llama_cpp_greedy`."""
    prompt_ids = _check_prompt(prompt_ids)
    max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
    ids = torch.tensor([prompt_ids])  # (1, T)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    new = out[0, len(prompt_ids):].tolist()
    return new[:new.index(eos_token_id)] if eos_token_id in new else new


def median_tokens_per_s(generate, repeats: int = 5) -> tuple[float, list[float], list[int]]:
    """(median tokens/s, every run's tokens/s, the ids of the last run) of `generate()`, which returns
    the new token ids of one generation. One untimed warm-up call first (caches, thread pools).

    Each run's time covers the whole call, prompt included, as a user waits for it.
    Example: median_tokens_per_s(lambda: torch_greedy(model, ids, 64, eos)) -> (17.9, [17.5, ...], [...])
    """
    repeats = check_positive_int("repeats", repeats)
    generate()
    speeds, ids = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ids = generate()
        speeds.append(len(ids) / (time.perf_counter() - start))
    return statistics.median(speeds), speeds, ids


def weight_bytes_per_token(summary: dict) -> dict[str, int]:
    """Bytes of weights one decoding step reads, as stored in the file and as float32.

    Every matrix is read once per token; the embedding table too, because SmolLM2's output layer
    is the same table (tied), so the whole file's tensors count. summary: `gguf_tensor_summary(...)`.
    Example: {"types": {"Q4_1": {"weights": 64, "bytes": 40}}} -> {"file": 40, "float32": 256}
    """
    if not isinstance(summary, dict) or not isinstance(summary.get("types"), dict) or not summary["types"]:
        raise TypeError("summary must be the dict gguf_tensor_summary() returns (with a non-empty 'types')")
    stored = sum(int(row["bytes"]) for row in summary["types"].values())
    weights = sum(int(row["weights"]) for row in summary["types"].values())
    return {"file": stored, "float32": 4 * weights}


def first_difference(a, b) -> int | None:
    """The first position where two token lists differ (a shorter list differs where it ends), or None.

    Example: first_difference([1, 2, 3], [1, 2, 4]) -> 2;  first_difference([1, 2], [1, 2]) -> None
    """
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
