"""utils.tiny_gpt: lesson 05's model for later lessons: saved with a checksum, loaded from the course cache,
trained again (here: a stand-in for the 2-minute run) when the cache holds no intact copy."""

from __future__ import annotations

import pytest
import torch

from utils import tiny_gpt
from utils.gpt import GPT, GPTConfig
from utils.tiny_gpt import TINY_MODEL_SHAPE, build_tiny_gpt, load_pretrained, save_pretrained
from utils.training import CharTokenizer, History

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 4


def tiny_model(vocab_size, dropout=0.0):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32,
                         dropout=dropout, bias=False))


@pytest.fixture(scope="module")
def data():
    tok = CharTokenizer.from_text(TEXT)
    ids = torch.tensor(tok.encode(TEXT))
    return tok, ids, ids


def test_build_tiny_gpt_is_seeded_and_has_lesson_05s_shape():
    a, b = build_tiny_gpt(65), build_tiny_gpt(65)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(build_tiny_gpt(65, seed=1).lm_head.weight, a.lm_head.weight)
    assert (a.config.n_layer, a.config.n_embd, a.config.block_size) == (TINY_MODEL_SHAPE["n_layer"],
                                                                          TINY_MODEL_SHAPE["n_embd"], 64)


def test_save_and_load_pretrained_round_trip(data, tmp_path):
    tok, train_ids, _ = data
    model = tiny_model(tok.vocab_size, dropout=0.0).eval()
    save_pretrained(tmp_path / "m", model, tok, {"note": "test"})
    loaded, tok2, info = load_pretrained(tmp_path / "m")
    x = train_ids[:16][None]
    assert torch.equal(model(x), loaded(x)) and tok2.chars == tok.chars and info == {"note": "test"}


def test_pretrained_tiny_gpt_loads_from_the_course_cache(data, tmp_path, monkeypatch):
    tok, train_ids, _ = data
    monkeypatch.setenv("LLM_COURSE_CACHE", str(tmp_path))
    model = tiny_model(tok.vocab_size, dropout=0.0).eval()
    save_pretrained(tiny_gpt.tiny_gpt_dir(), model, tok)
    assert tiny_gpt.tiny_gpt_dir().parent == tmp_path

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model must be loaded, not trained")
    monkeypatch.setattr(tiny_gpt, "train_tiny_gpt", no_training)
    loaded, tok2 = tiny_gpt.pretrained_tiny_gpt()
    x = train_ids[:16][None]
    assert torch.equal(loaded(x), model(x)) and tok2.chars == tok.chars


def test_a_changed_saved_model_is_refused_and_retrained(data, tmp_path, monkeypatch):
    from utils.models import ModelIntegrityError

    tok, _, _ = data
    monkeypatch.setenv("LLM_COURSE_CACHE", str(tmp_path))
    folder = save_pretrained(tiny_gpt.tiny_gpt_dir(), tiny_model(tok.vocab_size, dropout=0.0), tok)
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte in the last weight
    weights.write_bytes(bytes(raw))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_pretrained(folder)

    retrained = []

    def fake_training(progress=True):
        retrained.append(True)
        model = tiny_model(tok.vocab_size, dropout=0.0)
        return model, tok, History()
    monkeypatch.setattr(tiny_gpt, "train_tiny_gpt", fake_training)
    monkeypatch.setattr(tiny_gpt, "tiny_gpt_info", lambda history: {})
    tiny_gpt.pretrained_tiny_gpt()
    assert retrained == [True]
    load_pretrained(folder)  # the new save is consistent again
