"""pytest setup shared by every test file.

Tests that load the real models (SmolLM2, MiniLM), train for more than a few seconds or start processes are
marked `@pytest.mark.slow`; `pytest -n 2 --dist loadfile -m "not slow" tests` (`make test-fast`) runs the rest
(the logic) in about a minute on 2 cores. The README's test command runs everything, notebooks included.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Fast tests use tiny models, for which one thread is quicker than two (no OpenMP hand-offs) and
    immune to a busy machine; slow tests keep the course's thread count (utils.env.num_threads)."""
    if request.node.get_closest_marker("slow") is not None or "nbval" in type(request.node).__module__:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
