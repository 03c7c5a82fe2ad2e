import random

import numpy as np
import pytest
import torch

from utils.env import (
    available_cpus,
    cgroup_cpu_limit,
    environment_report,
    num_threads,
    seed_everything,
    setup_notebook,
    where_am_i,
)


def test_seed_everything_repeats_python_numpy_and_torch():
    seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(123)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])
    seed_everything(124)
    assert random.random() != first[0]


def test_thread_count_is_fixed():
    seed_everything(0, threads=1)
    assert torch.get_num_threads() == 1
    seed_everything(0)
    assert torch.get_num_threads() == num_threads()


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), ("0", TypeError), (True, TypeError)])
def test_bad_seed_is_refused(bad, error):
    with pytest.raises(error, match="seed must be an int"):
        seed_everything(bad)


@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "100000 100000\n"}, 1.0),                # cgroup v2, Binder-like: one CPU
    ({"cpu.max": "150000 100000"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),                  # no limit
    ({"cpu.max": "lots of cpus"}, None),                   # malformed: ignored
    ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2.0),   # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),      # v1: no limit
    ({"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "0"}, None),
    ({}, None),                                            # no cgroup files at all
])
def test_cgroup_cpu_limit(tmp_path, files, limit):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit


def test_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    import utils.env as env

    monkeypatch.delenv("LLM_COURSE_THREADS", raising=False)
    monkeypatch.setattr(env.os, "sched_getaffinity", lambda pid: {3}, raising=False)  # taskset -c 3
    monkeypatch.setattr(env, "cgroup_cpu_limit", lambda: None)
    assert available_cpus() == 1 and num_threads() == 1
    monkeypatch.setattr(env.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert num_threads() == 2  # the course's reference: 2 threads
    monkeypatch.setattr(env, "cgroup_cpu_limit", lambda: 1.0)  # 16 CPUs visible, a quota of one (Binder)
    assert available_cpus() == 1 and num_threads() == 1
    monkeypatch.setattr(env, "cgroup_cpu_limit", lambda: 0.5)
    assert available_cpus() == 1
    monkeypatch.setenv("LLM_COURSE_THREADS", "4")
    assert num_threads() == 4  # the explicit setting wins


def test_bad_thread_env_is_refused(monkeypatch):
    monkeypatch.setenv("LLM_COURSE_THREADS", "two")
    with pytest.raises(ValueError, match="LLM_COURSE_THREADS"):
        num_threads()


def test_setup_notebook_goes_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("LLM_COURSE_ONLINE", raising=False)
    setup_notebook()
    import os
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_environment_report_names_the_essentials():
    report = environment_report()
    for key in ("python", "torch", "transformers", "model cache", "running on", "gpu"):
        assert key in report and report[key]
    assert where_am_i() in ("local", "binder", "colab")


def test_set_course_repo_points_every_link_at_a_fork(tmp_path):
    import shutil

    from utils.env import COURSE_REPO, REPO_ROOT, set_course_repo

    for part in ("notebooks", "utils"):
        (tmp_path / part).mkdir()
    for nb in sorted((REPO_ROOT / "notebooks").glob("0[0-1]_*.ipynb")):
        shutil.copy(nb, tmp_path / "notebooks" / nb.name)
    shutil.copy(REPO_ROOT / "README.md", tmp_path / "README.md")
    shutil.copy(REPO_ROOT / "utils" / "env.py", tmp_path / "utils" / "env.py")
    assert set_course_repo("someone/my-course", root=tmp_path) == 4
    for path in [*tmp_path.glob("notebooks/*.ipynb"), tmp_path / "README.md", tmp_path / "utils" / "env.py"]:
        text = path.read_text(encoding="utf-8")
        assert COURSE_REPO not in text and "someone/my-course" in text, path
    with pytest.raises(ValueError, match="owner/name"):
        set_course_repo("not a repo", root=tmp_path)
