"""tests/budget.py: the table flags a notebook that is too slow or uses too much memory."""

import json
import os

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


def _timed_notebook(path, sources, seconds_per_cell=0.0):
    """A notebook whose code cells carry nbconvert's timing metadata (each cell took seconds_per_cell)."""
    cells = []
    for i, source in enumerate(sources):
        end = f"2026-01-01T00:00:{seconds_per_cell:06.3f}Z"
        cells.append({"cell_type": "code", "execution_count": None, "id": f"c{i}", "outputs": [], "source": source,
                      "metadata": {"execution": {"iopub.execute_input": "2026-01-01T00:00:00.000Z",
                                                 "shell.execute_reply": end}}})
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_stored_run_seconds_sums_the_cells_and_tolerates_missing_or_broken_metadata(tmp_path):
    from tests.budget import stored_run_seconds

    assert stored_run_seconds(_timed_notebook(tmp_path / "a.ipynb", ["1", "2", "3"], 2.5)) == pytest.approx(7.5)
    assert stored_run_seconds(_timed_notebook(tmp_path / "b.ipynb", ["1"])) == 0.0
    (tmp_path / "c.ipynb").write_text("not json")
    assert stored_run_seconds(tmp_path / "c.ipynb") == 0.0
    assert stored_run_seconds(tmp_path / "missing.ipynb") == 0.0
    broken = {"cells": [{"cell_type": "code", "metadata": {"execution": {"iopub.execute_input": 5}}}, "text"]}
    (tmp_path / "d.ipynb").write_text(json.dumps(broken))
    assert stored_run_seconds(tmp_path / "d.ipynb") == 0.0


@pytest.mark.slow
def test_under_xdist_the_longest_notebook_starts_first_and_the_controller_prints_every_row(tmp_path):
    """`make test` runs the notebooks two at a time: the workers' records reach the controller's table,
    a child process a notebook keeps alive is counted, and the notebooks whose stored runs were longest
    start first, one per worker (a long notebook started last would run alone at the end)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    log = tmp_path / "order.log"
    stamp = f"open({str(log)!r}, 'a').write(__import__('pathlib').Path.cwd().name + ' ' + NAME + '\\n')"
    child = ("import subprocess, sys, time\n"
             "p = subprocess.Popen([sys.executable, '-c', 'x = bytearray(200 * 2**20); import time; time.sleep(30)'])\n"
             "time.sleep(1.5)")
    for name, seconds in (("short", 1.0), ("long", 9.0), ("middle", 5.0)):
        _timed_notebook(tmp_path / f"{name}.ipynb", [f"NAME = {name!r}\n{stamp}", child, "p.kill(); p.wait()"],
                        seconds)
    out = tmp_path / "budget.md"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadfile", "-p", "tests.budget", "--nbval-lax",
         "-p", "no:cacheprovider", "-q", "short.ipynb", "long.ipynb", "middle.ipynb"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo), "LLM_COURSE_BUDGET_OUT": str(out)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "9 passed" in result.stdout
    assert "2 test processes ran at once" in result.stdout
    started = [line.split()[1] for line in log.read_text().splitlines()]
    assert sorted(started[:2]) == ["long", "middle"] and started[2] == "short", started  # one per worker first
    rows = out.read_text().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["long.ipynb", "middle.ipynb", "short.ipynb"]
    for row in rows:  # the 200 MB child was alive at the end of the second cell
        together = float(row.split("|")[4].split()[0])
        assert together >= 0.2, row
