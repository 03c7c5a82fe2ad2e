"""tests/budget.py: the table flags a notebook that is too slow or uses too much memory."""

import json

import pytest

from tests.budget import BUDGET_BYTES, BUDGET_SECONDS, format_table


def test_budget_table_flags_time_and_memory():
    fine = {"start": 0.0, "end": 100.0, "peak": 2**30, "child_peak": 0, "together": 2**30, "failed": False}
    slow = dict(fine, end=BUDGET_SECONDS + 1.0)
    big_kernel = dict(fine, peak=BUDGET_BYTES + 1)
    big_together = dict(fine, child_peak=2**29, together=BUDGET_BYTES + 1)  # kernel + server at once
    failed = dict(fine, failed=True)
    rows = format_table({"a.ipynb": fine, "b.ipynb": slow, "c.ipynb": big_kernel,
                         "d.ipynb": big_together, "e.ipynb": failed}).splitlines()[2:]
    assert rows[0] == "| a.ipynb | 100 s | 1.00 GiB | no children | yes |"
    assert [r.split("|")[-2].strip() for r in rows[1:]] == ["NO", "NO", "NO", "yes (a cell failed)"]
    assert "2.00 GiB" in rows[3]


@pytest.mark.slow
def test_store_mode_executes_in_place_and_flags_a_failing_notebook(tmp_path):
    from tests.budget import store_outputs

    def notebook(path, source):
        cells = [{"cell_type": "code", "execution_count": None, "id": "c0", "metadata": {},
                  "outputs": [], "source": source}]
        path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {
            "name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}))
        return str(path)

    good = notebook(tmp_path / "good.ipynb", "print(6 * 7)")
    bad = notebook(tmp_path / "bad.ipynb", "raise ValueError('boom')")
    records = store_outputs([good, bad])
    assert not records[good]["failed"] and records[bad]["failed"]
    assert records[good]["peak"] > 0  # the kernel's memory was sampled
    stored = json.loads((tmp_path / "good.ipynb").read_text())["cells"][0]["outputs"]
    assert stored[0]["text"] == ["42\n"] or stored[0]["text"] == "42\n"


def test_children_are_counted_once_by_proportional_memory():
    import os
    import subprocess
    import sys
    import time

    import psutil

    from tests.budget import _children_rss

    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        together = _children_rss(os.getpid())
        rss_sum = sum(c.memory_info().rss for c in psutil.Process().children(recursive=True))
        assert 0 < together <= rss_sum  # PSS shares the interpreter's pages between the two children
    finally:
        for child in children:
            child.kill()
            child.wait()
