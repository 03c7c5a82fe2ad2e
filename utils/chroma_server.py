"""Chroma as a server (lesson 17): the same vector database, now behind HTTP on 127.0.0.1.

Lesson 10 ran Chroma *embedded*: `chromadb.PersistentClient` keeps the index inside the notebook's own
process, so only that process can use it. Past one machine (or one process), a vector database runs
as a server that many clients share: `chroma run --path DIR --host 127.0.0.1 --port P` serves the
folder, and `chromadb.HttpClient(host, port)` speaks to it with the same API (`get_or_create_collection`,
`add`, `query`). Every call now crosses a socket: the same results, plus a round trip per call.

    with start_chroma_server(folder) as server:
        collection = server.client().get_or_create_collection("docs", embedding_function=None)
        collection.add(ids=[...], embeddings=[...]); collection.query(query_embeddings=[...], n_results=5)

As with the chat server (utils.server_process): loopback only, a port that is already taken is refused,
the child is stopped by `.stop()` (or at interpreter exit) and, on Linux, dies with its parent.
Shown in lesson 17.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from utils.checks import check_int, check_number
from utils.server_process import _RUNNING, ChildProcess, check_loopback, free_port, port_is_open


def chroma_executable() -> str:
    """The `chroma` command installed next to this Python (the chromadb package's CLI)."""
    beside = Path(sys.executable).parent / "chroma"
    found = str(beside) if beside.exists() else shutil.which("chroma")
    if found is None:
        raise FileNotFoundError("the `chroma` command was not found; install chromadb (pip install chromadb)")
    return found


def die_with_parent() -> None:
    """In the child, before exec (Linux): ask the kernel for SIGTERM when the parent process dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not Linux: stop() and atexit still end it
        pass


class ChromaServer(ChildProcess):
    """Handle on a `chroma run` child process: .url, .client(), .stop()."""

    def __init__(self, process: subprocess.Popen, host: str, port: int, path: Path, log_path: Path):
        self.process, self.host, self.port, self.path, self.log_path = process, host, port, path, log_path
        self.url = f"http://{host}:{port}"

    def client(self):
        """A chromadb.HttpClient connected to this server (telemetry off)."""
        import chromadb
        from chromadb.config import Settings

        return chromadb.HttpClient(host=self.host, port=self.port, settings=Settings(anonymized_telemetry=False))

    def __repr__(self):
        return f"ChromaServer({self.url}, folder {self.path}, pid {self.pid}, {self.state()})"


def heartbeat(url: str) -> bool:
    """Whether a Chroma server answers GET /api/v2/heartbeat (straight to loopback, no proxy)."""
    import httpx

    try:
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            return client.get(url + "/api/v2/heartbeat").status_code == 200
    except httpx.TransportError:
        return False


def start_chroma_server(path, port: int | None = None, host: str = "127.0.0.1", timeout: float = 120.0) -> ChromaServer:
    """Run `chroma run --path path --host host --port port` as a child and wait for its heartbeat.

    port: None picks a free one; a port in use is refused (RuntimeError). host: loopback only.
    Example: start_chroma_server("/tmp/db").client().heartbeat() -> 1764390000000000000
    """
    check_loopback(host)
    port = free_port(host) if port is None else check_int("port", port, low=1, high=65535, what=" (or None)")
    check_number("timeout", timeout, low=0, low_open=True)
    if port_is_open(host, port):
        raise RuntimeError(f"port {port} on {host} is already in use; pick another or pass port=None")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    log_fd, log_name = tempfile.mkstemp(prefix="llm-course-chroma-", suffix=".log")
    env = dict(os.environ, ANONYMIZED_TELEMETRY="False")  # nothing leaves this machine
    with os.fdopen(log_fd, "wb") as log:
        process = subprocess.Popen([chroma_executable(), "run", "--path", str(path), "--host", host,
                                    "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent)
    server = ChromaServer(process, host, port, path, Path(log_name))
    _RUNNING.add(server)
    try:
        deadline = time.monotonic() + timeout
        while not heartbeat(server.url):
            if process.poll() is not None:
                raise RuntimeError(f"chroma exited with code {process.returncode} before it was ready. Its "
                                   f"log ({log_name}) ends with:\n{server.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"chroma did not answer within {timeout:g} s. Its log ends with:\n{server.log()}")
            time.sleep(0.25)
        return server
    except BaseException:  # never leave a half-started server behind
        server.stop()
        raise


def stop_all_chroma_servers() -> int:
    """Stop every Chroma server this process started; returns how many were running."""
    servers = [server for server in list(_RUNNING) if isinstance(server, ChromaServer)]
    for server in servers:
        server.stop()
    return len(servers)


atexit.register(stop_all_chroma_servers)
