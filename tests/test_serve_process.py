"""`pybitnet serve` as a process: SIGTERM drains (accepted requests finish, new ones are refused, then exit 0),
and schemathesis checks every endpoint against the app's own OpenAPI schema."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import httpx
import pytest
import schemathesis
from schemathesis import checks
from hypothesis import HealthCheck, given, settings

from test_serve_support import LiveServer, ServerProcess

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
