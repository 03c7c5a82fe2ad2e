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
    try:
        import psutil

        return sum(_child_memory(c) for c in psutil.Process(pid).children(recursive=True))
    except Exception:
        return 0


def _rss(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:
        return 0


def _sample_together(interval: float = 0.2) -> None:
    """Background thread: the largest kernel + children memory seen at the same moment."""
    while True:
        name, pid = _running["name"], _running["pid"]
        record = _records.get(name) if name else None
        if record is not None and pid:
            record["together"] = max(record["together"], _rss(pid) + _children_rss(pid))
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
        children = _children_rss(pid)
        record["peak"] = max(record["peak"], peak_rss_bytes(pid))
        record["child_peak"] = max(record["child_peak"], children)
        record["together"] = max(record["together"], _rss(pid) + children)


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


def pytest_terminal_summary(terminalreporter):
    if not _records:
        return
    terminalreporter.section("notebook budget (2 cores: 5 min, 2 GiB each)")
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
                children = _children_rss(kernel.pid)
                record["peak"] = max(record["peak"], peak_rss_bytes(kernel.pid))
                record["child_peak"] = max(record["child_peak"], children)
                record["together"] = max(record["together"], _rss(kernel.pid) + children)
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
