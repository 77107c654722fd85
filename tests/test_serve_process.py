"""`pybitnet serve` as a process: SIGTERM drains (accepted requests finish, new ones are refused, then exit 0),
and schemathesis checks every endpoint against the app's own OpenAPI schema."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import schemathesis
from schemathesis import checks
from hypothesis import HealthCheck, given, settings

from test_serve_support import LiveServer, ServerProcess, free_port

MODEL = "synthetic:tiny"
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance]


def _stream_all(url: str, tokens: int) -> list[dict]:
    body = {"prompt": [1, 5, 9, 13], "max_tokens": tokens, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_sigterm_finishes_running_requests_then_exits():
    with ServerProcess(MODEL, "--max-batch", "2", "--ctx", "1000", "--threads", "1") as server:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(_stream_all, server.url, 900)
            deadline = time.monotonic() + 30
            while "pybitnet_requests_running 1.0" not in httpx.get(f"{server.url}/metrics").text:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
            assert not running.done(), "the stream ended before the drain was tested; make it longer"
            chunks = running.result(timeout=60)
        # uvicorn ends a graceful shutdown by re-raising the signal it caught
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "draining" in server.stop()
    tokens = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert len(tokens) == 900 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]


def _serve(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`pybitnet serve` run to its end (for the cases where it must exit by itself)."""
    return subprocess.run([sys.executable, "-m", "pybitnet", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MKL_CBWR": "AUTO", **(env or {})})


def _hold_requests(url: str, count: int, tokens: int = 1000) -> list[socket.socket]:
    """`count` accepted non-streaming requests whose clients stay connected (and read nothing)."""
    host, port = url.rsplit("//", 1)[1].split(":")
    body = json.dumps({"prompt": [1, 5, 9], "max_tokens": tokens, "ignore_eos": True}).encode()
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        sockets.append(sock)
    return sockets


def _wait_exit(process: subprocess.Popen, seconds: float) -> int:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server was still running {seconds} s later")


def test_a_half_sent_body_does_not_hold_up_shutdown():
    with ServerProcess(MODEL, "--threads", "1") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            time.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            assert _wait_exit(server.process, 20) in (0, -signal.SIGTERM)


def _drain_with_work(args: tuple[str, ...], signals: int, signal_number: int = signal.SIGTERM) -> tuple[int, str]:
    """Exit code and log of a server sent `signals` signals while 24 requests of 1,000 tokens wait for its one
    row: far more work than a bounded drain leaves time for."""
    with ServerProcess(MODEL, "--threads", "1", "--max-batch", "1", "--ctx", "1024", *args) as server:
        held = _hold_requests(server.url, 24)
        try:
            deadline = time.monotonic() + 30
            while "pybitnet_requests_running 1.0" not in httpx.get(f"{server.url}/metrics").text:
                assert time.monotonic() < deadline, "the requests never started"
                time.sleep(0.02)
            for _ in range(signals):
                server.process.send_signal(signal_number)
                time.sleep(0.3)
            code = _wait_exit(server.process, 10)
        finally:
            for sock in held:
                sock.close()
        return code, server.stop()


def test_the_drain_is_bounded():
    code, log = _drain_with_work(("--drain-timeout", "1"), 1)
    assert code in (0, -signal.SIGTERM) and "drain timeout" in log, log


def test_a_second_signal_ends_the_drain():
    code, log = _drain_with_work((), 2)
    assert code in (0, -signal.SIGTERM) and "second signal" in log, log


def test_ctrl_c_twice_during_a_drain_exits_130():
    code, log = _drain_with_work((), 2, signal.SIGINT)
    assert code == 130 and log.rstrip().endswith("interrupted"), log


def test_ctrl_c_exits_130():
    with ServerProcess(MODEL, "--threads", "1") as server:
        server.process.send_signal(signal.SIGINT)
        assert _wait_exit(server.process, 20) == 130
        assert "interrupted" in server.stop()


def test_a_port_in_use_is_one_line_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve(MODEL, "--port", str(port))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: port {port} on 127.0.0.1 is in use (another server?); "
                                                f"pick another with --port"], done.stderr


@pytest.mark.parametrize("args, env", [(["--api-key", ""], {}), ([], {"PYBITNET_API_KEY": ""})])
def test_an_empty_api_key_is_refused(args, env):
    done = _serve(MODEL, "--port", str(free_port()), *args, env=env, timeout=30)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "API key is empty" in done.stderr


def test_a_reachable_host_without_a_key_is_warned_about():
    # 192.0.2.1 is a documentation address that no machine holds: the warning comes, then the bind fails.
    done = _serve(MODEL, "--host", "192.0.2.1", "--port", str(free_port()), timeout=30)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert "without an API key" in lines[0] and lines[-1].startswith("error: cannot listen on 192.0.2.1:")


@pytest.fixture(scope="module")
def live():
    import pybitnet

    model = pybitnet.synthetic.random_model("tiny", seed=0, num_layers=1)
    with LiveServer(model, None, max_batch=4, max_queue=8, context=64, max_tokens_default=4) as server:
        yield server


def _schema(live):
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json")


def test_every_response_matches_the_openapi_schema(live):
    schema = _schema(live)
    failures = []
    for operation in schema.get_all_operations():
        operation = operation.ok()

        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(timeout=30)
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text}"
            # Not positive_data_acceptance: a schema-valid body may still be refused for what a schema
            # cannot say (a token id beyond the vocabulary, text for a model without a tokenizer).
            case.validate_response(response, checks=CHECKS)

        try:
            check()
        except Exception as err:  # collect every operation's failure, not just the first
            failures.append(f"{operation.label}: {err}")
    assert not failures, "\n\n".join(failures)
