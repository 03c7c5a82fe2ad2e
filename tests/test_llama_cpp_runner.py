"""utils.llama_cpp_runner: the packaged GGUF under llama.cpp, timed and compared with PyTorch (lesson 11).

The fast tests use fakes and the tiny stand-in model; the slow one runs the real file with llama.cpp
(skipped, with the install command, where llama-cpp-python is not installed).
"""

import importlib.util

import pytest
import torch

from tests.standin import tiny_chat_model
from utils import llama_cpp_runner
from utils.llama_cpp_runner import (
    LLAMA_CPP_PIP,
    first_difference,
    llama_cpp_greedy,
    llama_cpp_status,
    load_llama_cpp,
    median_tokens_per_s,
    torch_greedy,
    weight_bytes_per_token,
)


class FakeLlama:
    """Yields a fixed token stream from generate(), like llama_cpp.Llama.generate, and counts resets."""

    def __init__(self, stream):
        self.stream, self.resets, self.prompts = stream, 0, []

    def reset(self):
        self.resets += 1

    def generate(self, tokens, temp, repeat_penalty, reset):
        assert temp == 0.0 and repeat_penalty == 1.0  # greedy, unpenalised
        self.prompts.append(list(tokens))
        yield from self.stream


def test_llama_cpp_greedy_stops_at_eos_and_at_the_limit():
    llm = FakeLlama([5, 6, 7, 2, 8, 9])
    assert llama_cpp_greedy(llm, [1, 3], 10, eos_token_id=2) == [5, 6, 7]  # eos ends it, not included
    assert llama_cpp_greedy(llm, [1, 3], 2, eos_token_id=2) == [5, 6]
    assert llm.resets == 2 and llm.prompts == [[1, 3], [1, 3]]  # every call starts from an empty cache


def test_greedy_refuses_bad_input():
    llm = FakeLlama([5])
    with pytest.raises(TypeError, match="prompt_ids"):
        llama_cpp_greedy(llm, "hello", 4, eos_token_id=2)
    with pytest.raises(TypeError, match="prompt_ids"):
        llama_cpp_greedy(llm, [], 4, eos_token_id=2)
    with pytest.raises(ValueError, match="prompt token"):
        llama_cpp_greedy(llm, [1, -3], 4, eos_token_id=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        llama_cpp_greedy(llm, [1], 0, eos_token_id=2)


def test_torch_greedy_is_the_argmax_loop():
    model, tok = tiny_chat_model()
    prompt = tok("hello there", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    got = torch_greedy(model, prompt, 6, eos_token_id=eos)
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(6):  # no cache, whole sequence each step: the definition of greedy decoding
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            expected.append(nxt)
            ids.append(nxt)
    assert got == expected and 0 < len(got) <= 6


def test_median_tokens_per_s_runs_warmup_then_repeats():
    calls = []

    def generate():
        calls.append(1)
        return [7] * 4

    median, speeds, ids = median_tokens_per_s(generate, repeats=5)
    assert len(calls) == 6 and len(speeds) == 5 and ids == [7] * 4  # one warm-up + five timed
    assert all(s > 0 for s in speeds) and median == sorted(speeds)[2]
    with pytest.raises(ValueError, match="repeats"):
        median_tokens_per_s(generate, repeats=0)


def test_weight_bytes_per_token_counts_every_tensor():
    summary = {"types": {"Q4_1": {"tensors": 2, "weights": 64, "bytes": 40},
                         "F32": {"tensors": 1, "weights": 8, "bytes": 32}}}
    assert weight_bytes_per_token(summary) == {"file": 72, "float32": 288}
    with pytest.raises(TypeError, match="gguf_tensor_summary"):
        weight_bytes_per_token({"types": {}})


def test_weight_bytes_per_token_of_the_packaged_file():
    from utils.local_inference import gguf_tensor_summary

    summary = gguf_tensor_summary(llama_cpp_runner.packaged_gguf_path())
    got = weight_bytes_per_token(summary)
    # Q4_1 matrices + the Q8_0 embedding (tied output layer) + float32 norms, as lesson 11 prints them
    assert got == {"file": 66_355_200 + 30_081_024 + 140_544, "float32": 4 * 134_515_008}
    assert 5.5 < got["float32"] / got["file"] < 5.6


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 4]) == 2
    assert first_difference([1, 2], [1, 2]) is None
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([], []) is None


def test_status_names_the_pinned_install_when_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    message = llama_cpp_status()
    assert LLAMA_CPP_PIP in message and "minutes" in message
    with pytest.raises(ImportError, match="pip install"):
        load_llama_cpp(1)


def test_load_refuses_bad_settings():
    with pytest.raises(ValueError, match="n_threads"):
        load_llama_cpp(0)
    with pytest.raises(TypeError, match="n_threads"):
        load_llama_cpp(1.5)
    with pytest.raises(ValueError, match="n_ctx"):
        load_llama_cpp(1, n_ctx=10**6)


@pytest.mark.slow
def test_llama_cpp_and_pytorch_agree_on_the_packaged_model():
    if llama_cpp_status():
        pytest.skip(llama_cpp_status())
    from utils.models import load_chat_model

    model, tok = load_chat_model()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    llm = load_llama_cpp(n_threads=1)
    theirs = llama_cpp_greedy(llm, prompt, 12, tok.eos_token_id)
    llm.close()
    ours = torch_greedy(model, prompt, 12, tok.eos_token_id)
    assert len(theirs) > 0
    # The same weights, other arithmetic (8-bit activations, another summation order): the texts may part
    # where PyTorch's top candidates nearly tie, but llama.cpp's token there must be one of them.
    differ = first_difference(ours, theirs)
    if differ is not None and differ < len(theirs):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ours[:differ]])).logits[0, -1]
        assert theirs[differ] in logits.topk(3).indices.tolist()
