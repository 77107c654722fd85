"""Helpers for the server tests (no test functions here): a live server on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import uvicorn

from pybitnet.serve import ServerSettings, create_app


class LiveServer:
    """create_app(...) served by uvicorn in a background thread on 127.0.0.1:<free port>."""

    def __init__(self, model, tokenizer, **settings):
        self.app = create_app(lambda: (model, tokenizer), ServerSettings(**settings))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def state(self):
        return self.app.state.server

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        wait_healthy(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def wait_healthy(url: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not become healthy within {timeout} s")


def metric(url: str, name: str, labels: str = "") -> float:
    """The value of one sample of /metrics, e.g. metric(url, "pybitnet_requests_running")."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    raise KeyError(wanted)


class Delegate:
    """Wraps a model or tokenizer: every attribute is the wrapped object's unless the subclass overrides it."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        if name == "inner":  # not set yet (copy.copy makes the object before its attributes)
            raise AttributeError(name)
        return getattr(self.inner, name)


class SlowModel(Delegate):
    """A model whose decode steps take at least `seconds` each, so a test can act in the middle of a request."""

    def __init__(self, inner, seconds: float):
        super().__init__(inner)
        self.seconds = seconds

    def decode_step(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.inner.decode_step(*args, **kwargs)


class GatedTokenizer(Delegate):
    """A tokenizer whose encode waits for `gate` (and sets `entered` first): tokenizing that takes as long as
    the test wants."""

    def __init__(self, inner):
        super().__init__(inner)
        self.gate, self.entered = threading.Event(), threading.Event()

    def encode(self, *args, **kwargs):
        self.entered.set()
        self.gate.wait(30)
        return self.inner.encode(*args, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m pybitnet serve MODEL ...` in a subprocess on a free loopback port (with MKL_CBWR set, as
    the command would otherwise restart itself to set it)."""

    def __init__(self, model: str, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "pybitnet", "serve", model, "--port", str(self.port), *args]
        self.log = tempfile.TemporaryFile("w+")  # a pipe nobody reads would fill up and block the server
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "MKL_CBWR": "AUTO", **(env or {})})

    def __enter__(self) -> "ServerProcess":
        try:
            wait_healthy(self.url, timeout=90, process=self.process)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> str:
        """Kill the server if it still runs; returns everything it printed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.seek(0)
        return self.log.read()


def test_prefill_chunks_take_a_short_remainder_along():
    from pybitnet.serve.engine import chunk_end

    def plan(total: int, chunk: int) -> list[int]:
        ends, start = [], 0
        while start < total:
            start = chunk_end(start, total, chunk)
            ends.append(start)
        return ends

    assert plan(513, 512) == [513]  # 512 + BOS: one pass, not 512 then 1
    assert plan(640, 512) == [640]  # a quarter chunk rides along
    assert plan(641, 512) == [512, 641]
    assert plan(1100, 512) == [512, 1100]  # 588 left after the first: 512 + 76 in one
    assert plan(48, 7) == [7, 14, 21, 28, 35, 42, 48]  # 7 // 4 = 1: the last 6 go alone
    assert plan(5, 512) == [5]
