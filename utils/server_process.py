"""Process management for the course's chat server: not the lesson, the plumbing around it.

Lesson 11's API (`utils.serving`) is a FastAPI app. A notebook cannot run a web server in its own
kernel and keep executing cells, so `start_server()` runs `python -m utils.serving` as a child
process and returns a `ChatServer` handle. The safety rules live here:

* loopback only (`check_loopback`): the server binds to 127.0.0.1 / ::1, so other machines on the
  network cannot reach the model;
* nothing is left running: `ChatServer.stop()` ends the child, `stop_all_servers()` runs at exit
  (atexit), and the child runs a watchdog (`exit_when_parent_dies`) that ends it if the notebook
  kernel is killed without cleaning up;
* a server that fails to start is stopped and its log is shown, instead of hanging the notebook;
* `start_server` talks to its own child, not to whatever answers on the port: each start passes a
  random id to the child (environment variable INSTANCE_ENV), the child's /health echoes it, and any
  other answer is an error. The probe goes straight to the loopback address, ignoring HTTP_PROXY &
  co. (a proxy cannot reach this machine's 127.0.0.1, and must not see the traffic).

`serve_in_thread(app)` runs an app on a thread of this process instead (one model copy in memory:
lesson 16's notebook); `stop()` and `stop_all_servers()` end it the same way.

`utils.serving` re-exports `start_server`, `ChatServer`, `serve_in_thread` and `stop_all_servers`.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from utils.checks import check_choice, check_int, check_number

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTANCE_ENV = "LLM_COURSE_SERVER_INSTANCE"  # the per-start id the child echoes in /health


def check_loopback(host: str) -> str:
    """Return host if it is a loopback address, else ValueError.

    Example: check_loopback("127.0.0.1") -> "127.0.0.1"; check_loopback("0.0.0.0") -> ValueError.
    """
    if not isinstance(host, str):
        raise TypeError(f"host must be a string such as '127.0.0.1', got {type(host).__name__}")
    if host == "localhost":
        return host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"host={host!r} would expose the model to other machines; this course server "
                         "binds to loopback only: use '127.0.0.1' (or '::1', 'localhost').")
    return host


def is_loopback_host_header(host: str) -> bool:
    """Whether an HTTP Host header names this machine: localhost or a loopback IP, with any port.

    Example: "127.0.0.1:8000" -> True; "[::1]" -> True; "attacker.example" -> False.
    """
    bracketed = host.startswith("[")  # an IPv6 address is written in brackets: [::1]:8000
    address, _, port = host[1:].partition("]") if bracketed else host.partition(":")
    if bracketed:
        if port and not port.startswith(":"):
            return False
        port = port[1:]
    if port and not port.isdigit():
        return False
    if not bracketed and address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback and (":" in address) == bracketed
    except ValueError:
        return False


def port_is_open(host: str, port: int) -> bool:
    """Whether something already listens on host:port (a TCP connection succeeds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def read_health(url: str, timeout: float = 2.0) -> dict | None:
    """GET url/health directly, never through a proxy: its JSON object, {} for any other HTTP answer
    (an error status, not JSON), None when nothing answers."""
    import httpx

    try:
        with httpx.Client(trust_env=False, timeout=timeout) as client:  # trust_env=False: no proxies
            response = client.get(url + "/health")
        body = response.json()
    except httpx.TransportError:
        return None
    except ValueError:  # not JSON
        return {}
    return body if response.status_code == 200 and isinstance(body, dict) else {}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_RUNNING: set = set()  # servers (ChildProcess, ThreadServer) this Python process started and has not stopped yet


class ChildProcess:
    """Handle on a server this process started as a child: .running(), .log(), .stop(), `with`.

    Shared by the chat server (ChatServer) and lesson 17's Chroma server; each subclass sets .process
    and .log_path and registers itself in _RUNNING, so stop_all_servers() ends it too.
    """

    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log(self, last_lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-last_lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """End the server (SIGTERM, then SIGKILL after `timeout` s). Safe to call twice."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _RUNNING.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def state(self) -> str:
        return "running" if self.running() else f"stopped (exit code {self.process.returncode})"


class ChatServer(ChildProcess):
    """Handle on a server child process: .base_url for the openai client, .stop() to end it.

    .instance_id: the random id this start gave the child, which its /health echoes.
    """

    def __init__(self, process: subprocess.Popen, host: str, port: int, log_path: Path,
                 instance_id: str | None = None):
        self.process, self.host, self.port, self.log_path = process, host, port, log_path
        self.instance_id = instance_id
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.url = f"http://{netloc}"
        self.base_url = self.url + "/v1"

    def __repr__(self):
        return f"ChatServer({self.base_url}, pid {self.pid}, {self.state()})"


def stop_all_servers() -> int:
    """Stop every server this Python process started; returns how many were running."""
    servers = list(_RUNNING)
    for server in servers:
        server.stop()
    return len(servers)


atexit.register(stop_all_servers)


def start_server(port: int | None = None, host: str = "127.0.0.1", timeout: float = 180.0,
                 threads: int | None = None, batching: str = "one_at_a_time") -> ChatServer:
    """Start `python -m utils.serving` as a child process and wait until its /health answers.

    port: None picks a free one; a port where something already listens is refused (RuntimeError).
    host: loopback only (ValueError otherwise). timeout: seconds to wait for the model to load.
    batching: "one_at_a_time" or "continuous" (lesson 17's engine, utils.continuous_batching).
    If anything goes wrong while waiting, the child is stopped.
    """
    check_loopback(host)
    if port is None:
        port = free_port(host)
    check_int("port", port, low=1, high=65535, what=" (or None for a free one)")
    check_number("timeout", timeout, low=0, low_open=True)
    if threads is not None:
        check_int("threads", threads, low=1, what=" or None")
    check_choice("batching", batching, ("one_at_a_time", "continuous"))
    if port_is_open(host, port):
        raise RuntimeError(f"port {port} on {host} is already in use by another process; stop it, pick "
                           "another port, or pass port=None for a free one.")

    instance_id = secrets.token_hex(16)  # the child echoes it in /health: proof we reached our child
    log_fd, log_name = tempfile.mkstemp(prefix="llm-course-server-", suffix=".log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env[INSTANCE_ENV] = instance_id
    command = [sys.executable, "-m", "utils.serving", "--host", host, "--port", str(port),
               "--parent-pid", str(os.getpid())]
    if threads is not None:
        command += ["--threads", str(threads)]
    command += ["--batching", batching]
    with os.fdopen(log_fd, "wb") as log:  # the child keeps its own copy of the file descriptor
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=REPO_ROOT, env=env)
    server = ChatServer(process, host, port, Path(log_name), instance_id)
    _RUNNING.add(server)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it was "
                                   f"ready. Its log ({log_name}) ends with:\n{server.log()}")
            health = read_health(server.url)  # None: not listening yet
            if health is not None and health.get("instance_id") == instance_id:
                return server
            if health is not None:
                raise RuntimeError(f"another process answers on {server.url} (its /health does not carry "
                                   "this start's id), so this server could not take the port; stop the "
                                   "other process or pass port=None.")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not answer /health within {timeout:g} s. Its log "
                                   f"ends with:\n{server.log()}")
            time.sleep(0.25)
    except BaseException:  # also KeyboardInterrupt: never leave a half-started server behind
        server.stop()
        raise


class ThreadServer:
    """The app served by uvicorn on a thread of this process: .base_url for the openai client, .stop().

    Made by `serve_in_thread`. It shares the caller's model (one copy in memory instead of two),
    which suits a notebook on a small machine; `start_server` (a child process) is the robust choice.
    """

    def __init__(self, server, thread: threading.Thread, host: str, port: int):
        self.server, self.thread, self.host, self.port = server, thread, host, port
        self.url = f"http://{host}:{port}"
        self.base_url = self.url + "/v1"

    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to finish (open requests end first) and wait for the thread. Safe to call twice."""
        self.server.should_exit = True
        self.thread.join(timeout)
        _RUNNING.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"ThreadServer({self.base_url}, {'running' if self.running() else 'stopped'})"


def serve_in_thread(app, port: int | None = None, host: str = "127.0.0.1", timeout: float = 30.0) -> ThreadServer:
    """Serve an ASGI `app` (e.g. utils.serving.create_app(model, tokenizer)) on a background thread,
    loopback only; returns once it accepts connections. stop_all_servers() also stops it."""
    import uvicorn

    check_loopback(host)
    port = free_port(host) if port is None else check_int("port", port, low=1, high=65535)
    if port_is_open(host, port):
        raise RuntimeError(f"port {port} on {host} is already in use; pass port=None for a free one.")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", proxy_headers=False))
    thread = threading.Thread(target=server.run, daemon=True, name=f"course-server-{port}")
    thread.start()
    handle = ThreadServer(server, thread, host, port)
    _RUNNING.add(handle)
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            handle.stop()
            raise RuntimeError(f"the in-thread server on {host}:{port} did not start within {timeout:g} s")
        time.sleep(0.05)
    return handle


def exit_when_parent_dies(parent_pid: int) -> None:
    """In the child: a watchdog thread that ends the server once its parent process is gone."""
    def watch():
        while True:
            if os.getppid() != parent_pid:  # re-parented: the notebook kernel died
                os._exit(0)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()
