"""Per-notebook budget: wall time and peak RAM of each notebook's kernel, against 5 min / 2 GiB.

Two ways to use it:

* as a pytest plugin (pyproject's addopts load it with `-p tests.budget`): while nbval runs the
  notebooks, it times each notebook from its first cell to its last and reads the kernel's peak
  resident memory (Linux `VmHWM`) and, sampled five times a second, the memory of the kernel (RSS) and
  any child processes it started (such as the lesson-11 server; PSS, so pages the children share with
  each other count once) together, then prints a table at
  the end of the run. A notebook is within budget when neither the kernel's peak nor the sampled
  kernel + children total exceeds 2 GiB. Timings are reported, never
  asserted: a slow machine must not fail the course.
* as a script: `python tests/budget.py [notebooks/05_*.ipynb ...]` runs nbval on those notebooks
  (default: all) and prints the same table, also written to budget.md when --out is given.
  With `--store` it instead executes each notebook in place (`jupyter nbconvert --execute --inplace`,
  one at a time), so the stored outputs and the budget table come from the same run: that is how the
  course's stored outputs are made.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BUDGET_SECONDS = 5 * 60
BUDGET_BYTES = 2 * 2**30

_records: dict[str, dict] = {}
_running = {"name": None, "pid": None}  # the notebook whose kernel the sampler watches
_sampler: threading.Thread | None = None


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size of a live process (VmHWM on Linux; current RSS elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:
        return 0


def _child_memory(child) -> int:
    """A child's proportional set size (PSS: each page it shares with k processes counts 1/k), so that a
    browser's dozen processes sharing one binary count it once, as the machine does; RSS where PSS is
    not available (not Linux)."""
    try:
        return child.memory_full_info().pss
    except Exception:
        return child.memory_info().rss


def _children_rss(pid: int) -> int:
    """Memory of every live descendant of `pid`; one that exits while being measured counts 0 (it must
    not zero the others)."""
    try:
        import psutil

        children = psutil.Process(pid).children(recursive=True)
    except Exception:
        return 0
    total = 0
    for child in children:
        try:
            total += _child_memory(child)
        except Exception:  # it exited between the listing and the reading
            pass
    return total


def _rss(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:
        return 0


def _measure(record: dict, pid: int) -> None:
    """Raise the record's peaks to what the kernel `pid` and its children use now (the kernel's peak is
    its VmHWM, so a peak between two readings still counts; the children's only when seen)."""
    children = _children_rss(pid)
    record["peak"] = max(record["peak"], peak_rss_bytes(pid))
    record["child_peak"] = max(record["child_peak"], children)
    record["together"] = max(record["together"], _rss(pid) + children)


def _sample_together(interval: float = 0.2) -> None:
    """Background thread: the largest kernel + children memory seen at the same moment."""
    while True:
        name, pid = _running["name"], _running["pid"]
        record = _records.get(name) if name else None
        if record is not None and pid:  # children that live within one cell are seen only here
            _measure(record, pid)
        time.sleep(interval)


def _kernel_pid(item) -> int | None:
    kernel = getattr(item.parent, "kernel", None)
    try:
        return kernel.km.provisioner.process.pid
    except AttributeError:
        return None


def pytest_runtest_setup(item):
    global _sampler
    name = getattr(item.parent, "name", None)
    if type(item).__name__ == "IPyNbCell" and name not in _records:
        _records[name] = {"start": time.perf_counter(), "end": None, "peak": 0, "child_peak": 0,
                          "together": 0, "failed": False}
        if _sampler is None:
            _sampler = threading.Thread(target=_sample_together, daemon=True)
            _sampler.start()


def pytest_runtest_makereport(item, call):
    if type(item).__name__ != "IPyNbCell" or call.when != "call":
        return
    record = _records.get(item.parent.name)
    if record is None:
        return
    record["end"] = time.perf_counter()
    record["failed"] |= call.excinfo is not None
    pid = _kernel_pid(item)
    if pid:
        _running.update(name=item.parent.name, pid=pid)
        _measure(record, pid)


def stored_run_seconds(notebook: str | os.PathLike) -> float:
    """Seconds the notebook's stored run took: the sum of the per-cell times nbconvert records in each
    code cell's metadata (0.0 when it has none). Used to start the longest notebooks first.

    >>> stored_run_seconds("notebooks/05_pretraining.ipynb") > 60
    True
    """
    import json
    from datetime import datetime

    try:
        cells = json.loads(Path(notebook).read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError):
        return 0.0
    total = 0.0
    for cell in cells:
        times = cell.get("metadata", {}).get("execution", {}) if isinstance(cell, dict) else {}
        try:
            start = datetime.fromisoformat(times["iopub.execute_input"].replace("Z", "+00:00"))
            end = datetime.fromisoformat(times["shell.execute_reply"].replace("Z", "+00:00"))
        except (KeyError, TypeError, AttributeError, ValueError):
            continue
        total += max(0.0, (end - start).total_seconds())
    return total


def _in_xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_collection_modifyitems(session, config, items):
    """Under pytest-xdist (`make test` runs the tests and the notebooks two at a time, whole files per
    worker), start with the notebooks, longest first as timed in their stored run, then the unit-test
    files: a long notebook started last would leave one worker running it alone at the end.
    Serial runs keep pytest's order. Every worker sorts the same way, as xdist requires."""
    if not _in_xdist_worker(config):
        return
    seconds: dict[str, float] = {}

    def key(item):
        path = str(item.path)
        if not path.endswith(".ipynb"):
            return (1, 0.0)
        if path not in seconds:
            seconds[path] = stored_run_seconds(path)
        return (0, -seconds[path])

    items.sort(key=key)  # stable: cells keep their order within a notebook


def pytest_sessionfinish(session):
    """An xdist worker sends its notebooks' records to the controller, which prints the table."""
    if _in_xdist_worker(session.config) and _records:
        session.config.workeroutput["budget_records"] = {
            name: {**r, "start": 0.0, "end": (r["end"] or r["start"]) - r["start"]} for name, r in _records.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _records.update(getattr(node, "workeroutput", {}).get("budget_records", {}))


def format_table(records: dict[str, dict]) -> str:
    lines = ["| notebook | wall time | peak RAM (kernel) | peak RAM (kernel + children, together) "
             "| within 5 min / 2 GiB |",
             "|---|---:|---:|---:|---|"]
    for name, r in sorted(records.items()):
        seconds = (r["end"] or r["start"]) - r["start"]
        ok = seconds <= BUDGET_SECONDS and max(r["peak"], r["together"]) <= BUDGET_BYTES
        status = ("yes" if ok else "NO") + (" (a cell failed)" if r["failed"] else "")
        together = f"{r['together'] / 2**30:.2f} GiB" if r["child_peak"] else "no children"
        lines.append(f"| {Path(name).name} | {seconds:.0f} s | {r['peak'] / 2**30:.2f} GiB | "
                     f"{together} | {status} |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, config):
    if not _records:
        return
    terminalreporter.section("notebook budget (2 cores: 5 min, 2 GiB each)")
    workers = getattr(config.option, "numprocesses", None)
    if workers:
        from utils.env import num_threads

        terminalreporter.write_line(
            f"(measured while {workers} test processes ran at once, {num_threads()} PyTorch thread(s) per kernel: "
            "each notebook's kernel peak is its own, the wall times include the sharing. "
            "`make budget` runs them one at a time with 2 threads, as a learner does.)")
    terminalreporter.write_line(format_table(_records))
    out = os.environ.get("LLM_COURSE_BUDGET_OUT")
    if out:
        Path(out).write_text(format_table(_records) + "\n")


def _kernel_of(pid: int):
    """The ipykernel process started by nbconvert (a child of `pid`), or None."""
    import psutil

    try:
        for child in psutil.Process(pid).children():
            if "ipykernel" in " ".join(child.cmdline()):
                return child
    except psutil.Error:
        pass
    return None


def store_outputs(notebooks: list[str]) -> dict[str, dict]:
    """Execute each notebook in place, one at a time, measuring wall time and the kernel's memory."""
    records = {}
    for notebook in notebooks:
        record = {"start": time.perf_counter(), "end": None, "peak": 0, "child_peak": 0,
                  "together": 0, "failed": False}
        process = subprocess.Popen([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook",
                                    "--execute", "--inplace", "--ExecutePreprocessor.timeout=1200",
                                    notebook])
        while process.poll() is None:
            kernel = _kernel_of(process.pid)
            if kernel is not None:
                _measure(record, kernel.pid)
            time.sleep(0.2)
        record["end"] = time.perf_counter()
        record["failed"] = process.returncode != 0
        records[notebook] = record
        print(format_table({notebook: record}).splitlines()[-1], flush=True)
    return records


def main(argv: list[str]) -> int:
    store = "--store" in argv
    if store:
        argv.remove("--store")
    out = None
    if "--out" in argv:
        i = argv.index("--out")
        out = argv[i + 1]
        del argv[i:i + 2]
    notebooks = argv or sorted(str(p) for p in Path("notebooks").glob("[0-9][0-9]_*.ipynb"))
    if store:
        records = store_outputs(notebooks)
        print(format_table(records))
        if out:
            Path(out).write_text(format_table(records) + "\n")
        return int(any(r["failed"] for r in records.values()))
    env = dict(os.environ)
    if out:
        env["LLM_COURSE_BUDGET_OUT"] = out
    return subprocess.call([sys.executable, "-m", "pytest", *notebooks], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
