"""Corpus scoring on Ray Data gives the numbers of one local process, with any number of actors and
after actors die mid-job; one local Ray instance (2 CPUs) serves the whole module."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import pybitnet
from pybitnet import corpus
from pybitnet.errors import InputError

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e \".[ray]\"")
pytest.importorskip("ray.data", reason="Ray Data is an optional extra: pip install -e \".[ray]\"")

from pybitnet.distributed import score_corpus  # noqa: E402

CTX, STRIDE = 16, 6
N_DOCUMENTS = 210


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # A shared test machine can sit above Ray's memory threshold because of other processes; the tiny
    # actors here use a few hundred MB, so Ray's OOM killer must not pick them.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # the model factories below live in this test module, which Ray workers cannot import: ship them by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def _documents() -> list[dict]:
    """>= 200 small token-id documents of varied length, and a few bad ones."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(N_DOCUMENTS):
        n = int(torch.randint(2, 40, (1,), generator=gen))
        rows.append({"id": f"doc-{i:03d}", "tokens": torch.randint(0, 512, (n,), generator=gen).tolist()})
    rows[17]["tokens"] = [3]  # one token: nothing to score
    rows[42]["tokens"] = [1, 512]  # out of the vocabulary
    rows[99]["tokens"] = []
    return rows


@pytest.fixture(scope="module")
def local_float64():
    """The reference: the same documents scored one after another on this process, one thread like an actor."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = pybitnet.load("synthetic:tiny", dtype=torch.float64)
        docs = [corpus.Document(r["id"], (0, 0), tokens=r["tokens"]) for r in _documents()]
        return corpus.score_documents(model, None, docs, ctx=CTX, stride=STRIDE, per_token=True)
    finally:
        torch.set_num_threads(threads)


def _assert_same(result, expected):
    assert [s.id for s in result.scores] == [s.id for s in expected.scores]  # every document once, none dropped
    for got, want in zip(result.scores, expected.scores):
        assert (got.tokens, got.tokens_scored, got.windows, got.error) == (
            want.tokens, want.tokens_scored, want.windows, want.error), got.id
        assert got.logprob_sum == want.logprob_sum, got.id  # float64: identical
    assert result.perplexity == expected.perplexity
    assert (result.tokens_scored, result.documents, result.failed) == (
        expected.tokens_scored, expected.documents, expected.failed)


@pytest.mark.parametrize("actors", [1, 2, 3])
def test_same_numbers_as_one_process_with_any_number_of_actors(actors, local_float64, tmp_path):
    dataset = ray.data.from_items(_documents(), override_num_blocks=7)
    out = tmp_path / "scores.json"
    result = score_corpus("synthetic:tiny", dataset, actors=actors, cpus_per_actor=0.5, ctx=CTX, stride=STRIDE,
                          dtype=torch.float64, per_token=True, output=out, batch_documents=16)
    _assert_same(result, local_float64)
    assert local_float64.failed == 3 and local_float64.documents == N_DOCUMENTS
    for got, want in zip(result.scores, local_float64.scores):
        assert got.logprobs == want.logprobs
    written = json.loads(out.read_text())
    assert [d["id"] for d in written["documents"]] == [s.id for s in local_float64.scores]
    assert written["corpus"]["perplexity"] == local_float64.perplexity


SENTENCES = [f"Sentence {i}: the quick brown fox jumps over {i % 7} lazy dogs, again and again." for i in range(14)]


def test_files_with_text_and_bad_documents_match_a_local_run(tmp_path, write_text_checkpoint):
    """Text, JSONL and parquet files through the model's tokenizer (float32: the float32 rule), parquet out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model_dir = str(write_text_checkpoint(tmp_path / "m"))
    (tmp_path / "one.txt").write_text(" ".join(SENTENCES[:5]))
    (tmp_path / "bad.txt").write_bytes(b"\xc3\x28 broken")
    lines = [json.dumps({"id": f"line-{i}", "text": text}) for i, text in enumerate(SENTENCES[:12])]
    lines += ["{oops", json.dumps({"id": "blank", "text": ""})]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    pq.write_table(pa.table({"id": ["pq-0", "pq-1"], "text": SENTENCES[12:14]}), tmp_path / "docs.parquet")
    paths = [str(tmp_path / n) for n in ("one.txt", "bad.txt", "docs.jsonl", "docs.parquet")]

    model = pybitnet.load(model_dir)
    expected = corpus.score_documents(model, corpus.open_tokenizer(model_dir), corpus.read_documents(paths),
                                      ctx=24, stride=10)
    out = tmp_path / "scores.parquet"
    result = score_corpus(model_dir, paths, actors=2, cpus_per_actor=0.5, ctx=24, stride=10, output=out)
    assert [s.id for s in result.scores] == [s.id for s in expected.scores]
    assert [(s.tokens, s.error) for s in result.scores] == [(s.tokens, s.error) for s in expected.scores]
    assert sum(s.error is not None for s in result.scores) == 3  # invalid UTF-8, bad JSON, empty text
    for got, want in zip(result.scores, expected.scores):
        if want.error is None:
            assert abs(got.logprob_sum - want.logprob_sum) <= 5e-2 * abs(want.logprob_sum), got.id
    assert abs(result.perplexity - expected.perplexity) <= 5e-2 * expected.perplexity
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == [s.id for s in expected.scores]


class _DiesOnce:
    """A model that takes its actor down once, on its n-th window, the first time any actor gets there."""

    def __init__(self, model, marker: str, after: int, how: str):
        self.model, self.marker, self.after, self.how, self.calls = model, marker, after, how, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def hidden_states(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.after:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))  # exactly one death in the whole job
            except FileExistsError:
                pass
            else:
                if self.how == "exit":
                    os._exit(1)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
        return self.model.hidden_states(*args, **kwargs)


@pytest.mark.parametrize("how", ["exit", "ray.kill"])
def test_an_actor_that_dies_mid_job_is_restarted_and_its_batch_retried(how, local_float64, tmp_path):
    marker = str(tmp_path / "died")

    def dies_once():
        return _DiesOnce(pybitnet.load("synthetic:tiny", dtype=torch.float64), marker, after=40, how=how)

    dataset = ray.data.from_items(_documents(), override_num_blocks=7)
    result = score_corpus(dies_once, dataset, actors=2, cpus_per_actor=0.5, ctx=CTX, stride=STRIDE,
                          dtype=torch.float64, batch_documents=16)
    assert os.path.exists(marker)  # an actor did die mid-job
    _assert_same(result, local_float64)


def test_documents_need_an_id_and_a_text_or_tokens_column():
    with pytest.raises(InputError, match="needs an \"id\" column"):
        score_corpus("synthetic:tiny", ray.data.from_items([{"text": "x"}]), actors=1)
    with pytest.raises(InputError, match="'text' or \"tokens\" column"):
        score_corpus("synthetic:tiny", ray.data.from_items([{"id": "a", "body": "x"}]), actors=1)
    with pytest.raises(InputError, match="1 <= stride <= ctx"):
        score_corpus("synthetic:tiny", ray.data.from_items([{"id": "a", "tokens": [1, 2]}]), ctx=8, stride=9)


def test_the_perplexity_command_runs_on_ray(tmp_path, local_float64):
    from typer.testing import CliRunner

    from pybitnet.cli import app

    rows = _documents()[:40]
    lines = [json.dumps(r).encode() for r in rows] + [b'{"id": "bad", "text": "\xff"}']
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines))
    out = tmp_path / "scores.json"
    run = CliRunner().invoke(app, ["perplexity", "synthetic:tiny", str(tmp_path / "docs.jsonl"), "--ray", "--actors", "1",
                                   "--ctx", str(CTX), "--stride", str(STRIDE), "--dtype", "float64", "--json", str(out)])
    assert run.exit_code == 0, run.output
    assert "perplexity" in run.output and "invalid UTF-8" in run.output
    written = json.loads(out.read_text())["documents"]
    # the bad line's own id cannot be read (it is not UTF-8): it is named after its place
    assert [d["id"] for d in written] == [r["id"] for r in rows] + [f"{tmp_path / 'docs.jsonl'}:41"]
    expected = {s.id: s.logprob_sum for s in local_float64.scores if s.error is None}
    for d in written:
        if d["id"] in expected:
            assert d["logprob_sum"] == expected[d["id"]], d["id"]


def test_the_server_on_ray_serve_spreads_requests_over_two_replicas():
    """The OpenAI routes through Ray Serve with 2 replicas: the openai client gets what one process answers."""
    pytest.importorskip("ray.serve", reason="Ray Serve is optional: pip install \"ray[serve]\"")
    openai = pytest.importorskip("openai")
    import socket
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from fastapi.testclient import TestClient
    from ray import serve

    from pybitnet.distributed.serving import REPLICA_HEADER, _load, run
    from pybitnet.serve.app import create_app

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    run("synthetic:tiny", port=port, replicas=2, cpus_per_replica=0.5)
    try:
        healthy, deadline = 0, time.monotonic() + 240
        while healthy < 6 and time.monotonic() < deadline:  # both replicas answer 200 once loaded
            try:
                healthy = healthy + 1 if httpx.get(base + "/health", timeout=10).status_code == 200 else 0
            except httpx.HTTPError:
                healthy = 0
            time.sleep(0.2)
        assert healthy >= 6, "the replicas did not become healthy"
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

        def complete(i: int):
            raw = client.completions.with_raw_response.create(model="bitnet", prompt=[1, 7, 3 + i % 5, 9], max_tokens=5,
                                                              temperature=0, logprobs=1)
            return raw.headers[REPLICA_HEADER], raw.parse()

        with ThreadPoolExecutor(8) as pool:  # a loopback load at concurrency 8
            answers = list(pool.map(complete, range(16)))
        assert len({replica for replica, _ in answers}) == 2, "every request went to one replica"

        one_process = create_app(lambda: _load("synthetic:tiny", torch.float32, 1))
        with TestClient(one_process) as local:
            while local.get("/health").status_code != 200:
                time.sleep(0.05)
            for i, (_, answer) in enumerate(answers[:5]):
                expected = local.post("/v1/completions", json={"model": "bitnet", "prompt": [1, 7, 3 + i % 5, 9],
                                                               "max_tokens": 5, "temperature": 0, "logprobs": 1}).json()
                assert answer.choices[0].text == expected["choices"][0]["text"]
                assert answer.choices[0].logprobs.token_logprobs == pytest.approx(
                    expected["choices"][0]["logprobs"]["token_logprobs"], rel=1e-5)
        with pytest.raises(openai.BadRequestError) as bad:  # the app's own validation, through the proxy
            client.completions.create(model="bitnet", prompt=[1, 10**6], max_tokens=2)
        assert "token id 1000000 is out of range" in str(bad.value)
    finally:
        serve.shutdown()
