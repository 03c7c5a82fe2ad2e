"""Run the notebooks as Colab would: Colab's own Python and packages, then the setup cell's Colab branch.

On Colab the kernel has `google.colab` imported before any cell runs, so every notebook's setup cell
clones the course into /content/llm-course (skipped if that folder exists), runs utils/colab.py in a
subprocess (it installs what is missing or below its FLOORS, never torch) and moves into
/content/llm-course/notebooks. This script reproduces exactly that, offline:

1. a venv made with the given interpreter, holding a Colab-like stack (STACKS below: Colab's own
   torch, transformers, ipywidgets 7.7 ...; no faiss, no gguf, no course data packages);
2. a stand-in `google.colab` package in that venv, imported by an IPython startup file at kernel start;
3. /content/llm-course made by `git clone` of the repository under test (its committed HEAD, as
   GitHub would serve it; uncommitted changes are not seen);
4. each notebook copied to /content and run by the venv's `jupyter nbconvert --execute`, one at a
   time, each in a fresh "runtime": the venv is put back to the bare stack (what colab.py installed
   is uninstalled), /content/llm-course is cloned again and the model cache starts empty;
5. a table: rc, wall and CPU seconds, the setup cell's seconds (clone + colab.py), what colab.py
   installed or changed, the first error; executed notebooks and results.json go to --out;
6. /content is removed afterwards unless --keep.

    python tests/colab_like.py 00 02 09                  # "current" stack, Python 3.13
    python tests/colab_like.py --one-runtime 02 04 06    # one runtime for all: colab.py installs once
    python tests/colab_like.py --stack older --python /usr/bin/python3.12 04
    python tests/colab_like.py --list-stacks

The first run builds the venv (PyPI's torch is a CUDA build of several GB; later runs reuse the venv).
Needs git and network access to PyPI (colab.py installs from it, as on Colab).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONTENT = Path("/content")  # Colab's working folder; the setup cell's paths are absolute

# Colab-like stacks: the interpreter and what Colab has preinstalled that the course could touch.
# Deliberately absent (Colab lacks them): faiss-cpu, gguf and the course's data packages.
# pandas and python-dateutil at Colab's versions: unpinned, pip picks python-dateutil 4, which lm-eval's
# pytablewriter (typepy: python-dateutil<3) rejects, and the install backtracks into building old pandas.
_COMMON = ["numpy", "pandas==2.2.3", "python-dateutil==2.9.0.post0", "scipy", "scikit-learn", "matplotlib",
           "ipywidgets==7.7.1", "ipykernel<7", "jupyter-client", "nbconvert", "nbformat", "tqdm", "requests", "httpx",
           "gradio", "openai", "regex", "psutil", "jsonschema", "pydantic", "safetensors", "tokenizers"]
STACKS = {
    # today's Colab as far as the course is concerned: at or above every floor in utils/colab.py
    "current": {"python": "3.13", "packages": ["torch==2.14.1", "transformers==5.24.0", "accelerate==1.15.0",
                                               "peft==0.21.2", "sentence-transformers==6.2.0", *_COMMON]},
    # an older Colab image: below the floors, so colab.py must upgrade transformers & co.
    "older": {"python": "3.12", "packages": ["torch==2.9.1", "transformers==4.57.1", "accelerate==1.10.1",
                                             "peft==0.17.1", "sentence-transformers==5.1.2", *_COMMON]},
}

# Imported by the kernel before the first cell (IPYTHONDIR's startup folder). It also logs each cell's
# seconds and error to $COLAB_LIKE_CELL_LOG, so a failed notebook still tells where and why.
STARTUP_FILE = '''\
import google.colab  # noqa: F401  Colab's kernel has imported it before any cell runs


def _colab_like_log_cells():
    import json, os, time

    log, started = os.environ.get("COLAB_LIKE_CELL_LOG"), {}
    if not log:
        return

    def before(info):
        started["t"], started["cell"] = time.perf_counter(), info.raw_cell.strip().split("\\n")[0][:80]

    def after(result):
        error = result.error_in_exec or result.error_before_exec
        with open(log, "a") as f:
            f.write(json.dumps({"cell": started.get("cell", ""), "seconds": time.perf_counter() - started["t"],
                                "error": None if error is None else f"{type(error).__name__}: {error}"}) + "\\n")

    get_ipython().events.register("pre_run_cell", before)
    get_ipython().events.register("post_run_cell", after)


_colab_like_log_cells()
del _colab_like_log_cells
'''


def canonical_name(name: str) -> str:
    """A distribution name as pip compares them. Example: "Sentence_Transformers" -> "sentence-transformers" """
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, dict]:
    """What happened to the installed packages between two snapshots ({name: version}).

    Example: ({"torch": "2.14.1", "peft": "0.17.1"}, {"torch": "2.14.1", "peft": "0.21.2", "gguf": "0.19.0"})
             -> {"added": {"gguf": "0.19.0"}, "changed": {"peft": ("0.17.1", "0.21.2")}, "removed": {}}
    """
    return {"added": {name: after[name] for name in sorted(after.keys() - before.keys())},
            "changed": {name: (before[name], after[name]) for name in sorted(before.keys() & after.keys())
                        if before[name] != after[name]},
            "removed": {name: before[name] for name in sorted(before.keys() - after.keys())}}


def setup_and_error(cell_log: list[dict]) -> tuple[float | None, str | None]:
    """The setup cell's seconds (the first cell run) and the first error, from the kernel's cell log.

    Example: [{"cell": "# Setup", "seconds": 31.5, "error": None}, {"cell": "x = 1/0", "seconds": 0.0,
              "error": "ZeroDivisionError: division by zero"}] -> (31.5, "cell 2 `x = 1/0`: ZeroDivisionError: ...")
    """
    setup_seconds = cell_log[0]["seconds"] if cell_log else None
    for number, entry in enumerate(cell_log, start=1):
        if entry["error"]:
            return setup_seconds, f"code cell {number} `{entry['cell']}`: {entry['error']}"
    return setup_seconds, None


def last_error_line(stderr: str) -> str | None:
    """The last `SomeError: message` line of nbconvert's stderr (a timeout or a dead kernel leave no cell log).

    Example: "...\\nnbclient.exceptions.DeadKernelError: Kernel died\\n" -> "DeadKernelError: Kernel died"
    """
    found = None
    for line in stderr.splitlines():
        match = re.match(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit|Interrupt)): (.*)$", line.strip())
        if match:
            found = f"{match.group(1)}: {match.group(2)}"
    return found


def resolve_notebooks(requested: list[str], available: list[str]) -> list[str]:
    """Notebook file names from numbers or names, in the order given (all when none is given).

    Example: (["09", "00"], ["00_welcome.ipynb", "09_rag.ipynb"]) -> ["09_rag.ipynb", "00_welcome.ipynb"]
    """
    if not requested:
        return sorted(available)
    chosen = []
    for item in requested:
        matches = [name for name in available if name == item or name.startswith(item.split(".ipynb")[0])]
        if len(matches) != 1:
            raise ValueError(f"notebook {item!r} matches {matches or 'nothing'}; "
                             f"give a number or a name from: {', '.join(sorted(available))}")
        chosen.append(matches[0])
    return chosen


def format_changes(changes: dict[str, dict]) -> str:
    """One short line. Example: {"added": {"gguf": "0.19.0"}, "changed": {"peft": ("0.17.1", "0.21.2")},
    "removed": {}} -> "+1 (gguf); peft 0.17.1->0.21.2" """
    parts = []
    if changes["added"]:
        names = list(changes["added"])
        parts.append(f"+{len(names)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    parts += [f"{name} {old}->{new}" for name, (old, new) in changes["changed"].items()]
    parts += [f"-{name}" for name in changes["removed"]]
    return "; ".join(parts) or "nothing"


def format_table(rows: list[dict]) -> str:
    """A markdown table of the per-notebook results (keys: notebook, rc, wall_s, cpu_s, setup_s, changes, error)."""
    lines = ["| notebook | rc | wall s | CPU s | setup cell s | colab.py installed / changed | first error |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        setup = "—" if row["setup_s"] is None else f"{row['setup_s']:.0f}"
        error = (row["error"] or "").replace("|", "\\|").replace("\n", " ")[:200]
        lines.append(f"| {row['notebook']} | {row['rc']} | {row['wall_s']:.0f} | {row['cpu_s']:.0f} | {setup} "
                     f"| {row['changes']} | {error} |")
    return "\n".join(lines)


# --- the parts that touch the machine ---------------------------------------------------------------

def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(str(part) for part in command), flush=True)
    return subprocess.run([str(part) for part in command], check=True, **kwargs)


def find_python(version: str) -> str:
    """An interpreter for `version` ("3.13") that runs: under pyenv, else python3.13 on PATH (pyenv's shim
    for a version that is not selected exists but fails, hence the check)."""
    candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python")))
    candidates += [found for found in [shutil.which(f"python{version}")] if found]
    for candidate in candidates:
        if subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    raise SystemExit(f"no working Python {version} found: pass --python PATH")


def installed(venv: Path) -> dict[str, str]:
    listing = subprocess.run([venv / "bin/python", "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                             check=True, capture_output=True, text=True).stdout
    return {canonical_name(item["name"]): item["version"] for item in json.loads(listing)}


def make_venv(venv: Path, python: str, stack: str) -> dict[str, str]:
    """Create (or reuse) the venv with the stack and the stand-in google.colab; return its bare snapshot."""
    marker = venv / "colab_like.json"
    wanted = {"stack": stack, "packages": STACKS[stack]["packages"]}
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if {"stack": recorded["stack"], "packages": recorded["packages"]} != wanted:
            raise SystemExit(f"{venv} holds stack {recorded['stack']!r} with other packages: delete it or pass --venv")
        print(f"reusing {venv} ({recorded['python']})")
        return recorded["snapshot"]
    started = time.time()
    run([python, "-m", "venv", venv])
    run([venv / "bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check", *wanted["packages"]])
    purelib = Path(subprocess.run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    # google is a namespace package (protobuf lives there too): add google/colab only, no google/__init__.py
    (purelib / "google" / "colab").mkdir(parents=True, exist_ok=True)
    (purelib / "google" / "colab" / "__init__.py").write_text('"""Stand-in for Colab\'s module: its presence '
                                                             'is all the course checks."""\n')
    version = subprocess.run([venv / "bin/python", "--version"], check=True, capture_output=True, text=True).stdout
    snapshot = installed(venv)
    marker.write_text(json.dumps({**wanted, "python": version.strip(), "snapshot": snapshot,
                                  "install_s": round(time.time() - started)}, indent=1))
    print(f"stack {stack!r} installed in {time.time() - started:.0f} s")
    return snapshot


def restore_runtime(venv: Path, snapshot: dict[str, str]) -> None:
    """Put the venv back to the bare stack: a new Colab runtime starts without what colab.py installed."""
    changes = runtime_changes(snapshot, installed(venv))
    if changes["added"]:
        run([venv / "bin/python", "-m", "pip", "uninstall", "-q", "-y", *changes["added"]], stdout=subprocess.DEVNULL)
    back = {**changes["removed"], **{name: old for name, (old, _) in changes["changed"].items()}}
    if back:
        run([venv / "bin/python", "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
             *[f"{name}=={version}" for name, version in back.items()]])


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Linux /proc), children first."""
    parent_of = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()  # after "(command name)"
        except OSError:
            continue
        parent_of[int(stat.split("/")[2])] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kernel_env(venv: Path, ipython_dir: Path, cell_log: Path) -> dict[str, str]:
    """The kernel's environment: the venv first on PATH, nothing from this machine's Python setup."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTHON", "VIRTUAL_ENV", "LLM_COURSE", "HF_", "TRANSFORMERS_", "JUPYTER", "IPYTHON",
                                  "PIP_FIND_LINKS", "PIP_INDEX", "PIP_EXTRA_INDEX"))}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", VIRTUAL_ENV=str(venv),
               IPYTHONDIR=str(ipython_dir), COLAB_LIKE_CELL_LOG=str(cell_log), OMP_NUM_THREADS="2",
               LLM_COURSE_CACHE=str(CONTENT / ".cache" / "llm-course"),  # a new runtime: no converted model yet
               HF_HOME=str(CONTENT / ".cache" / "huggingface"),
               # skip the user's pip.conf (this machine's local wheel folders); a global /etc/xdg/pip still applies
               PIP_CONFIG_FILE=os.devnull)
    return env


def run_notebook(name: str, venv: Path, snapshot: dict[str, str], env: dict[str, str], cell_log: Path,
                 out: Path, timeout: int, fresh: bool = True) -> dict:
    """One notebook, by default in a fresh runtime (venv restored, course cloned again, empty model cache)."""
    if fresh:
        restore_runtime(venv, snapshot)
        for path in (CONTENT / "llm-course", CONTENT / ".cache"):
            shutil.rmtree(path, ignore_errors=True)
    if not (CONTENT / "llm-course").exists():
        run(["git", "clone", "-q", "--depth=1", f"file://{REPO}", CONTENT / "llm-course"])
    shutil.copy(CONTENT / "llm-course" / "notebooks" / name, CONTENT / name)  # what Colab opens from GitHub
    cell_log.unlink(missing_ok=True)
    command = [venv / "bin/jupyter", "nbconvert", "--to", "notebook", "--execute", f"--output-dir={out}",
               f"--ExecutePreprocessor.timeout={timeout}", CONTENT / name]
    print(f"=== {name}", flush=True)
    cpu_before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    process = subprocess.Popen([str(part) for part in command], cwd=CONTENT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stderr = process.communicate(timeout=timeout * 2)[1]
        rc = process.returncode
    except subprocess.TimeoutExpired:  # end nbconvert, the kernel (its own session) and what the kernel started
        for pid in [*descendants(process.pid), process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stderr, rc = process.communicate()[1], "timeout"
    wall, cpu_after = time.time() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    (out / f"{name}.stderr.txt").write_text(stderr)
    cell_entries = [json.loads(line) for line in cell_log.read_text().splitlines()] if cell_log.exists() else []
    setup_s, error = setup_and_error(cell_entries)
    if rc != 0 and error is None:
        error = last_error_line(stderr) or f"nbconvert exit {rc} (see {name}.stderr.txt)"
    changes = runtime_changes(snapshot, installed(venv))
    row = {"notebook": name, "rc": rc, "wall_s": wall,
           "cpu_s": (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime),
           "max_rss_one_process_mib": cpu_after.ru_maxrss / 1024,  # the largest single process so far, not a sum
           "setup_s": setup_s, "changes": format_changes(changes), "changes_detail": changes, "error": error}
    print(f"--- {name}: rc={rc} wall={wall:.0f}s cpu={row['cpu_s']:.0f}s setup={setup_s} error={error}", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", help="numbers or names (default: all), run in this order")
    parser.add_argument("--stack", default="current", choices=sorted(STACKS))
    parser.add_argument("--python", help="the interpreter for the venv (default: the stack's version)")
    parser.add_argument("--venv", type=Path, help="where the venv lives (default: /tmp/colab_like/STACK)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/colab_like/out"), help="executed notebooks + results")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell (nbconvert's timeout)")
    parser.add_argument("--one-runtime", action="store_true",
                        help="run all notebooks in one runtime: colab.py installs and the model converts once "
                             "(faster; the default gives each notebook a fresh runtime, as a learner gets)")
    parser.add_argument("--keep", action="store_true", help="leave /content in place afterwards")
    parser.add_argument("--list-stacks", action="store_true")
    args = parser.parse_args(argv)
    if args.list_stacks:
        for name, stack in STACKS.items():
            print(f"{name}: Python {stack['python']}: {' '.join(stack['packages'])}")
        return
    try:
        names = resolve_notebooks(args.notebooks, [path.name for path in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")])
    except ValueError as error:
        parser.error(str(error))
    if CONTENT.exists() and any(CONTENT.iterdir()) and not (CONTENT / ".colab_like").exists():
        raise SystemExit(f"{CONTENT} exists and was not made by this script: move it away first")
    venv = args.venv or Path("/tmp/colab_like") / args.stack
    snapshot = make_venv(venv, args.python or find_python(STACKS[args.stack]["python"]), args.stack)
    CONTENT.mkdir(exist_ok=True)
    (CONTENT / ".colab_like").touch()
    args.out.mkdir(parents=True, exist_ok=True)
    ipython_dir = Path(tempfile.mkdtemp(prefix="colab_like_ipython_"))
    (ipython_dir / "profile_default" / "startup").mkdir(parents=True)
    (ipython_dir / "profile_default" / "startup" / "00_google_colab.py").write_text(STARTUP_FILE)
    cell_log = ipython_dir / "cells.jsonl"
    env = kernel_env(venv, ipython_dir, cell_log)
    stack_versions = {name: snapshot.get(name) for name in ("torch", "transformers", "sentence-transformers",
                                                             "peft", "accelerate", "ipywidgets", "numpy")}
    print("stack:", args.stack, json.loads((venv / "colab_like.json").read_text())["python"], stack_versions)
    rows = []
    try:
        for name in names:
            fresh = not args.one_runtime or not rows
            rows.append(run_notebook(name, venv, snapshot, env, cell_log, args.out, args.timeout, fresh))
            (args.out / "results.json").write_text(json.dumps({"stack": args.stack, "versions": stack_versions,
                                                               "rows": rows}, indent=1, default=str))
    finally:
        shutil.rmtree(ipython_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(CONTENT, ignore_errors=True)
    table = format_table(rows)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    sys.exit(0 if all(row["rc"] == 0 for row in rows) else 1)


if __name__ == "__main__":
    main()
