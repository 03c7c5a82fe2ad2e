"""Where am I running, and how do I make every run the same?

Every notebook calls `setup_notebook()` once. It

* seeds Python, NumPy and PyTorch (`seed_everything`) and fixes PyTorch's thread count, so that a
  re-run prints the same numbers (reductions split over a different number of threads can round
  differently);
* keeps the course offline by default (`HF_HUB_OFFLINE=1`) unless you opt in with
  `LLM_COURSE_ONLINE=1`;
* quiets library progress bars and warnings that would otherwise clutter every stored output
  (`quiet_libraries`). Progress bars of *your own* loops still show (utils.notebook_outputs.ProgressBar).

`environment_report()` is the readable check lesson 00 prints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import re
import sys
import warnings
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. With spinning (the default), torch on a busy
# 2-core machine (a shared CI runner, a laptop running a browser) was measured up to ~90x slower.
# Must be set before torch starts its thread pool, so at import time: the setup cell imports us first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from utils.checks import check_int

REPO_ROOT = Path(__file__).resolve().parent.parent
COURSE_REPO = "open-llm-course/llm-course"  # GitHub owner/name: badges and the Colab clone use it
DEFAULT_THREADS = 2  # the course's reference machine is a 2-core laptop; Binder has 1 CPU


def where_am_i() -> str:
    """'colab', 'binder' or 'local'."""
    if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG"):
        return "colab"
    if os.environ.get("BINDER_SERVICE_HOST") or os.environ.get("BINDER_REPO_URL"):
        return "binder"
    return "local"


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's container in CPUs (e.g. 1.0 on Binder), or None if unlimited or
    unknown. Reads cgroup v2's cpu.max ("100000 100000") or v1's cpu.cfs_quota_us / cpu.cfs_period_us;
    anything unreadable or malformed counts as no limit. Example: cgroup_cpu_limit() -> 1.0"""
    root = Path(root)

    def read(path: Path) -> str | None:
        try:
            return path.read_text()[:100].strip()  # a few bytes at most: never size anything by the file
        except OSError:
            return None

    v2 = read(root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
    else:
        quota, period = read(root / "cpu" / "cpu.cfs_quota_us"), read(root / "cpu" / "cpu.cfs_period_us")
    quota, period = (quota or "").strip(), (period or "").strip()
    if not (quota and period and quota.isdigit() and period.isdigit() and int(period) > 0):
        return None  # "max", "-1" (v1's "no limit"), missing or malformed
    return int(quota) / int(period)


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity (taskset, a scheduler), capped by the container's CPU
    quota. os.cpu_count() counts the whole machine: on Binder it sees many CPUs and may use one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit - 1e-9)))  # a quota of 1.5 CPUs: 2 threads at most
    return max(1, cpus)


def num_threads() -> int:
    """The thread count the course uses: LLM_COURSE_THREADS if set, else min(2, the CPUs available).
    More threads than CPUs makes every parallel step wait for a thread that is not running."""
    value = os.environ.get("LLM_COURSE_THREADS")
    if value is not None:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"LLM_COURSE_THREADS must be a positive integer, got {value!r}")
        return int(value)
    return min(DEFAULT_THREADS, available_cpus())


def seed_everything(seed: int = 0, threads: int | None = None) -> None:
    """Seed python, numpy and torch, and fix torch's thread count.

    >>> seed_everything(0); a = np.random.rand(); seed_everything(0); a == np.random.rand()
    True
    """
    check_int("seed", seed, low=0)
    import torch

    random.seed(seed)
    np.random.seed(seed)
    _ = torch.manual_seed(seed)  # returns a Generator whose repr is a memory address: don't print it
    threads = num_threads() if threads is None else threads
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    torch.set_num_threads(threads)


def quiet_libraries() -> None:
    """Silence hub/transformers/datasets progress bars and their chatty warnings (not your own loops' bars)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # lm-eval's datasets (lesson 15)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    except (ImportError, AttributeError):
        pass
    for name in ("sentence_transformers", "httpx", "chromadb", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def go_offline_unless_asked() -> None:
    """Offline is the course default: no hub calls unless LLM_COURSE_ONLINE=1."""
    if os.environ.get("LLM_COURSE_ONLINE") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def setup_notebook(seed: int = 0, threads: int | None = None) -> None:
    """The one call at the top of every notebook: offline, quiet, seeded, fixed threads."""
    go_offline_unless_asked()
    quiet_libraries()
    seed_everything(seed, threads)


def environment_report() -> dict[str, str]:
    """Versions, hardware and where things live, as a dict of readable strings."""
    import torch

    from . import models  # late import: models imports transformers

    report = {
        "running on": where_am_i(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)",
        "model cache": str(models.cache_dir()),
        "offline (HF_HUB_OFFLINE)": os.environ.get("HF_HUB_OFFLINE", "0"),
    }
    try:
        import psutil

        report["RAM total"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
        report["RAM available"] = f"{psutil.virtual_memory().available / 2**30:.1f} GiB"
    except ImportError:
        pass
    for package in ("transformers", "tokenizers", "sentence_transformers", "faiss", "peft", "gguf",
                    "ipywidgets", "matplotlib"):
        try:
            module = __import__(package)
            report[package] = getattr(module, "__version__", "installed")
        except ImportError:
            report[package] = "MISSING"
    return report


def set_course_repo(new_repo: str, root: str | os.PathLike = REPO_ROOT) -> int:
    """Point every badge, the Colab clone URL and COURSE_REPO at a fork; returns the files changed.

    The repo's address is written in three kinds of places (the notebooks' badges and setup cells,
    README's lesson table, COURSE_REPO here), and tests/test_notebooks.py checks they agree, so a
    fork changes them all at once:  python -m utils.env --set-repo YOUR-NAME/llm-course
    """
    if not isinstance(new_repo, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}", new_repo):
        raise ValueError(f"new_repo must look like 'owner/name' (a GitHub repository), got {new_repo!r}")
    root = Path(root)
    changed = 0
    files = [*sorted((root / "notebooks").glob("*.ipynb")), root / "README.md", root / "utils" / "env.py"]
    for path in files:
        text = path.read_text(encoding="utf-8")
        new = text.replace(f"github.com/{COURSE_REPO}", f"github.com/{new_repo}")  # clone URL, links
        new = new.replace(f"github/{COURSE_REPO}/", f"github/{new_repo}/")  # Colab badge
        new = new.replace(f"gh/{COURSE_REPO}/", f"gh/{new_repo}/")  # Binder badge
        new = new.replace(f'COURSE_REPO = "{COURSE_REPO}"', f'COURSE_REPO = "{new_repo}"')
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed += 1
    return changed


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The course's environment; --set-repo points it at a fork.")
    parser.add_argument("--set-repo", metavar="OWNER/NAME", help="rewrite badges and the Colab clone URL")
    args = parser.parse_args()
    if args.set_repo:
        print(f"{set_course_repo(args.set_repo)} files now point at {args.set_repo}")
    else:
        print(json.dumps(environment_report(), indent=2))
