"""tests/colab_like.py (the Colab-like notebook run): its pure parts, fast (no venv, no pip, no kernel), and
one slow test of the process-tree walk that ends a timed-out notebook."""

import pytest

from tests.colab_like import (
    STACKS,
    canonical_name,
    format_changes,
    format_table,
    last_error_line,
    resolve_notebooks,
    runtime_changes,
    setup_and_error,
)


def test_runtime_changes_sorts_added_changed_and_removed():
    before = {"torch": "2.14.1", "peft": "0.17.1", "six": "1.16.0"}
    after = {"torch": "2.14.1", "peft": "0.21.2", "gguf": "0.19.0", "faiss-cpu": "1.15.1"}
    assert runtime_changes(before, after) == {"added": {"faiss-cpu": "1.15.1", "gguf": "0.19.0"},
                                              "changed": {"peft": ("0.17.1", "0.21.2")},
                                              "removed": {"six": "1.16.0"}}
    assert runtime_changes(before, before) == {"added": {}, "changed": {}, "removed": {}}


def test_format_changes_names_the_first_added_and_every_change():
    changes = {"added": {f"p{i}": "1" for i in range(6)}, "changed": {"peft": ("0.17.1", "0.21.2")},
               "removed": {"six": "1.16.0"}}
    assert format_changes(changes) == "+6 (p0, p1, p2, p3, ...); peft 0.17.1->0.21.2; -six"
    assert format_changes({"added": {}, "changed": {}, "removed": {}}) == "nothing"


def test_setup_time_is_the_first_cell_and_the_first_error_wins():
    log = [{"cell": "# Setup", "seconds": 31.5, "error": None},
           {"cell": "x = 1/0", "seconds": 0.01, "error": "ZeroDivisionError: division by zero"},
           {"cell": "y", "seconds": 0.0, "error": "NameError: name 'y' is not defined"}]
    assert setup_and_error(log) == (31.5, "code cell 2 `x = 1/0`: ZeroDivisionError: division by zero")
    assert setup_and_error(log[:1]) == (31.5, None)
    assert setup_and_error([]) == (None, None)


def test_last_error_line_reads_nbconverts_stderr():
    stderr = ("[NbConvertApp] Converting notebook x.ipynb\nTraceback (most recent call last):\n"
              "  File ...\nnbclient.exceptions.DeadKernelError: Kernel died\n")
    assert last_error_line(stderr) == "DeadKernelError: Kernel died"
    assert last_error_line("TimeoutError: Cell execution timed out\nValueError: later one\n") == "ValueError: later one"
    assert last_error_line("[NbConvertApp] Writing 1234 bytes to x.ipynb\n") is None


def test_resolve_notebooks_by_number_or_name_in_the_given_order():
    available = ["09_rag.ipynb", "00_welcome.ipynb", "01_tokenisation.ipynb"]
    assert resolve_notebooks(["09", "00"], available) == ["09_rag.ipynb", "00_welcome.ipynb"]
    assert resolve_notebooks(["01_tokenisation.ipynb"], available) == ["01_tokenisation.ipynb"]
    assert resolve_notebooks([], available) == ["00_welcome.ipynb", "01_tokenisation.ipynb", "09_rag.ipynb"]
    with pytest.raises(ValueError, match="matches nothing"):
        resolve_notebooks(["99"], available)
    with pytest.raises(ValueError, match="matches"):
        resolve_notebooks(["0"], available)  # ambiguous: 00 and 01


def test_canonical_name_and_table():
    assert canonical_name("Sentence_Transformers") == "sentence-transformers"
    assert canonical_name("zope.interface") == "zope-interface"
    table = format_table([{"notebook": "00_welcome.ipynb", "rc": 1, "wall_s": 61.2, "cpu_s": 40.0, "setup_s": None,
                           "changes": "nothing", "error": "ValueError: a | b"}])
    assert table.splitlines()[2] == "| 00_welcome.ipynb | 1 | 61 | 40 | — | nothing | ValueError: a \\| b |"


def test_stacks_lack_what_colab_lacks_and_never_let_colab_py_touch_torch():
    from utils.colab import FLOORS, NEEDED, NEEDED_NO_DEPS, below_floor

    for name, stack in STACKS.items():
        pinned = dict(req.split("==") for req in stack["packages"] if "==" in req)
        names = {canonical_name(req.split("=")[0].split("<")[0]) for req in stack["packages"]}
        assert not names & {"faiss-cpu", "gguf", *map(canonical_name, NEEDED_NO_DEPS.values())}, name
        assert "torch" in pinned and "torch" not in FLOORS
        assert all(canonical_name(req.split("==")[0]) != "torch" for req in NEEDED.values())
        if name == "current":  # at or above every floor: colab.py must change nothing preinstalled
            assert below_floor(pinned) == []
        else:  # below the floors: colab.py's upgrade path is exercised
            assert below_floor(pinned)


@pytest.mark.slow
def test_descendants_finds_grandchildren():
    import subprocess
    import time

    from tests.colab_like import descendants

    shell = subprocess.Popen(["bash", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        for _ in range(50):  # the shell needs a moment to start its two children
            found = descendants(shell.pid)
            if len(found) == 2:
                break
            time.sleep(0.1)
        assert len(found) == 2 and shell.pid not in found
    finally:
        for pid in descendants(shell.pid):
            subprocess.run(["kill", str(pid)])
        shell.kill()
        shell.wait()
