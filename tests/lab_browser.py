"""A throwaway JupyterLab and a headless Chromium for browser tests (tests/test_lab_widgets.py).

`running_lab(root)` starts `jupyter lab` on 127.0.0.1 (a free port, a random token, no browser) with
its config, data, settings and workspace folders under `root`, so the user's own JupyterLab settings
are neither read nor changed; it is stopped (and its kernels with it) when the `with` block ends.
`notebook_from_cells(path, cells)` writes a small notebook from code-cell sources.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import nbformat

from utils.chat_ui import CHROMIUM  # the one place the browser's path is defined
from utils.server_process import free_port

INSTALL_HINT = "pip install playwright==1.65.2 jupyterlab==4.6.6 ipywidgets==8.1.9; apt-get install -y chromium"


def browser_missing(packages=("playwright", "jupyterlab", "ipywidgets"), hint: str = INSTALL_HINT) -> str | None:
    """None when these packages and Debian's chromium are all here, else what to install (a skip reason)."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if not os.path.exists(CHROMIUM):
        missing.append(CHROMIUM)
    return f"needs {', '.join(missing)}: {hint}" if missing else None


def notebook_from_cells(path: Path, cells: list[str]) -> Path:
    """Write a notebook of code cells (python3 kernel) to path. Example: notebook_from_cells(p, ["1 + 1"])."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, path)
    return path


class Lab:
    """A running JupyterLab: .url(path) gives a page address with the token, .api(method, path) calls its REST API."""

    def __init__(self, process: subprocess.Popen, port: int, token: str):
        self.process, self.port, self.token = process, port, token
        self.base = f"http://127.0.0.1:{port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}?token={self.token}&reset"  # reset: no saved workspace

    def api(self, method: str, path: str):
        import httpx

        with httpx.Client(trust_env=False, timeout=10) as client:
            return client.request(method, f"{self.base}/api/{path}", headers={"Authorization": f"token {self.token}"})

    def shutdown_kernels(self) -> None:
        for session in self.api("GET", "sessions").json():
            self.api("DELETE", f"sessions/{session['id']}")


@contextlib.contextmanager
def running_lab(root: Path, timeout: float = 120.0, settings: dict | None = None):
    """Start JupyterLab serving `root` (loopback, token, isolated config); yield a Lab; stop it after.

    settings: extra user settings, {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"}}."""
    home = root / ".lab-home"
    # no "get Jupyter news?" pop-up over the page (and no request for it)
    news = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True, exist_ok=True)
    news.write_text('{"fetchNews": "false", "checkForUpdates": false}')
    for plugin, values in (settings or {}).items():
        path = home / "settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {**os.environ, "JUPYTER_DATA_DIR": str(home / "data"),  # its own notebook-trust database too
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "IPYTHONDIR": str(home / "ipython"), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    port, token = free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",  # window.jupyterapp
               "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--ServerApp.terminals_enabled=False", "--allow-root"]  # CI containers run as root
    log = open(root / ".lab.log", "w")
    process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    lab = Lab(process, port, token)
    import httpx

    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("jupyter lab did not start:\n" + (root / ".lab.log").read_text()[-3000:])
            try:
                if lab.api("GET", "status").status_code == 200:
                    break
            except httpx.TransportError:  # not listening yet
                pass
            time.sleep(0.5)
        yield lab
    finally:
        with contextlib.suppress(Exception):
            lab.shutdown_kernels()
        process.terminate()  # JupyterLab ends its kernels on SIGTERM
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
