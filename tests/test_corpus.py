"""Corpus scoring on one process: windows, document reading, bad documents, output files, the CLI."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from typer.testing import CliRunner

import pybitnet
from pybitnet import corpus, evaluate, synthetic
from pybitnet.cli import corpus_cmds
from pybitnet.errors import InputError


@pytest.fixture(scope="module")
def model():
    return synthetic.random_model("tiny", seed=0, dtype=torch.float64)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) from the full logits of one forward pass: (T-1,)."""
    logits = model.forward_full(torch.tensor([ids])).double()[0]
    return logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_one_window_is_the_full_sequence_log_probs(model):
    ids = _ids(40, 1)
    logp, windows = corpus.document_logprobs(model, ids, ctx=64, stride=64)
    assert windows == 1
    assert torch.allclose(logp, _direct_logprobs(model, ids), rtol=1e-9, atol=0)


def test_strided_windows_score_each_token_in_its_own_window(model):
    ids = _ids(45, 2)
    ctx, stride = 16, 6
    logp, windows = corpus.document_logprobs(model, ids, ctx=ctx, stride=stride)
    expected = {}
    for begin, first, end in evaluate.perplexity_windows(len(ids), ctx, stride):
        window = _direct_logprobs(model, ids[begin:end])  # predicts ids[begin+1:end]
        for t in range(first, end):
            expected[t] = float(window[t - begin - 1])
    assert windows == 6  # ending at 16, 22, 28, 34, 40, 45
    assert sorted(expected) == list(range(1, len(ids)))  # every token but the first, once
    assert logp.tolist() == pytest.approx([expected[t] for t in range(1, len(ids))], rel=1e-9, abs=0)
    # the same sliding-window figure as the single-text evaluator
    reference = evaluate.perplexity(model, ids, ctx=ctx, stride=stride)
    assert math.exp(-logp.sum().item() / logp.numel()) == pytest.approx(reference.perplexity, rel=1e-9)
    assert logp.numel() == reference.tokens_scored


def _write_corpus(tmp_path):
    """Files of every kind, good and bad documents: returns (paths, expected ids in corpus order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_bytes(b"caf\xc3\xa9 au lait")  # valid UTF-8 text, but no tokenizer
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe not utf-8")
    lines = [json.dumps({"id": "j-short", "tokens": _ids(12, 3)}).encode(),
             b"",  # blank lines are skipped, not documents
             json.dumps({"tokens": _ids(30, 4)}).encode(),
             b'{"text": "\xff"}',
             b"{not json",
             json.dumps({"id": "j-one", "tokens": [5]}).encode(),
             json.dumps({"id": "j-range", "tokens": [1, 700]}).encode(),
             json.dumps({"id": "j-none"}).encode(),
             json.dumps({"id": "j-empty", "text": "   "}).encode()]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    pq.write_table(pa.table({"id": ["p0", "p1"], "tokens": [_ids(20, 5), _ids(9, 6)]}), tmp_path / "e.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    paths = [tmp_path / n for n in ("a.txt", "bad.txt", "d.jsonl", "e.parquet", "broken.parquet", "missing.txt")]
    return paths


def test_documents_are_read_in_corpus_order_with_errors_named(tmp_path):
    paths = _write_corpus(tmp_path)
    docs = list(corpus.read_documents(paths))
    d = str(tmp_path / "d.jsonl")
    assert [doc.id for doc in docs] == [
        str(paths[0]), str(paths[1]), "j-short", f"{d}:3", f"{d}:4", f"{d}:5", "j-one", "j-range", "j-none", "j-empty",
        "p0", "p1", str(paths[4]), str(paths[5])]
    by_id = {doc.id: doc for doc in docs}
    assert by_id[str(paths[0])].text == "café au lait"
    assert "invalid UTF-8 at byte 3" in by_id[str(paths[1])].error
    assert by_id["j-short"].tokens == _ids(12, 3) and by_id[f"{d}:3"].tokens == _ids(30, 4)
    assert "invalid UTF-8" in by_id[f"{d}:4"].error
    assert "not valid JSON" in by_id[f"{d}:5"].error
    assert "no 'text' or \"tokens\" field" in by_id["j-none"].error
    assert by_id["p1"].tokens == _ids(9, 6)
    assert "not a readable parquet file" in by_id[str(paths[4])].error
    assert "cannot read" in by_id[str(paths[5])].error


def test_bad_documents_are_reported_and_left_out_of_the_corpus_figure(tmp_path, model):
    paths = _write_corpus(tmp_path)
    result = corpus.score_documents(model, None, corpus.read_documents(paths), ctx=8, stride=5, per_token=True)
    good = {s.id: s for s in result.scores if s.error is None}
    assert set(good) == {"j-short", f"{tmp_path / 'd.jsonl'}:3", "p0", "p1"}
    errors = {s.id: s.error for s in result.scores if s.error}
    assert "needs" in errors[str(paths[0])] or "tokenize" in errors[str(paths[0])]  # text without a tokenizer
    assert "only one token" in errors["j-one"]
    assert "token id out of range" in errors["j-range"] and errors["j-range"].startswith("j-range:")
    assert "empty document" in errors["j-empty"]
    assert result.documents == 14 and result.failed == 10
    # the corpus figure is total NLL over total scored tokens, from independently scored documents
    total_logp, total_tokens = 0.0, 0
    for s in good.values():
        ids = next(d for d in corpus.read_documents(paths) if d.id == s.id).tokens
        logp, _ = corpus.document_logprobs(model, ids, ctx=8, stride=5)
        assert s.tokens == len(ids) and s.tokens_scored == len(ids) - 1 == len(s.logprobs)
        assert s.logprob_sum == pytest.approx(float(logp.sum()), rel=1e-12)
        assert s.perplexity == pytest.approx(math.exp(-float(logp.sum()) / logp.numel()), rel=1e-12)
        total_logp += float(logp.sum())
        total_tokens += logp.numel()
    assert result.tokens_scored == total_tokens
    assert result.perplexity == pytest.approx(math.exp(-total_logp / total_tokens), rel=1e-12)


def test_text_documents_go_through_the_model_tokenizer(tmp_path, write_text_checkpoint):
    from pybitnet import load_tokenizer

    path = write_text_checkpoint(tmp_path / "m")
    text = "The quick brown fox jumps over the lazy dog."
    model = pybitnet.load(str(path), dtype=torch.float64)
    result = corpus.score_documents(model, corpus.open_tokenizer(str(path)), [corpus.Document("t", (0, 0), text=text)],
                                    ctx=64)
    ids = load_tokenizer(path).encode(text)
    assert result.scores[0].tokens == len(ids)
    assert result.scores[0].logprob_sum == pytest.approx(float(_direct_logprobs(model, ids).sum()), rel=1e-9)
    missing = corpus.open_tokenizer("synthetic:tiny-has-none")
    scored = corpus.score_document(model, missing, corpus.Document("t", (0, 0), text=text), ctx=64, stride=64)
    assert "cannot tokenize text" in scored.error


def test_output_files_round_trip_atomically(tmp_path, model):
    import pyarrow.parquet as pq

    docs = [corpus.Document("a", (0, 0), tokens=_ids(10, 7)), corpus.Document("b", (0, 1), error="b: broken")]
    result = corpus.score_documents(model, None, docs, ctx=8, per_token=True)
    corpus.write_scores(result, tmp_path / "s.json", per_token=True)
    corpus.write_scores(result, tmp_path / "s.parquet", per_token=False)
    payload = json.loads((tmp_path / "s.json").read_text())
    assert payload["corpus"]["perplexity"] == result.perplexity and payload["corpus"]["failed"] == 1
    assert payload["documents"][0]["logprobs"] == result.scores[0].logprobs
    assert payload["documents"][1] == {"id": "b", "tokens": 0, "tokens_scored": 0, "logprob_sum": 0.0,
                                       "perplexity": None, "windows": 0, "error": "b: broken", "logprobs": None}
    rows = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert [r["id"] for r in rows] == ["a", "b"] and "logprobs" not in rows[0]
    assert rows[0]["logprob_sum"] == result.scores[0].logprob_sum
    assert sorted(os.listdir(tmp_path)) == ["s.json", "s.parquet"]  # no temporary files left behind
    with pytest.raises(InputError, match="must end in .json or .parquet"):
        corpus.write_scores(result, tmp_path / "s.csv")


def test_window_arguments_are_checked(model):
    with pytest.raises(InputError, match="1 <= stride <= ctx"):
        corpus.score_documents(model, None, [], ctx=8, stride=9)
    with pytest.raises(InputError, match="ctx >= 2"):
        corpus.score_documents(model, None, [], ctx=1)
    assert corpus.resolve_window(model, None, None) == (1024, 1024)  # the tiny model's context
    assert corpus.context_warning(model, 2048) and corpus.context_warning(model, 1024) is None


# ---------------------------------------------------------------------------------------------- CLI

def _cli(*args):
    from pybitnet.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_scores_many_documents_like_the_library(tmp_path, model):
    paths = _write_corpus(tmp_path)
    out = tmp_path / "out.json"
    tokens_file = tmp_path / "ids.txt"
    tokens_file.write_text(" ".join(map(str, _ids(25, 8))))
    run = _cli("perplexity", "synthetic:tiny", *map(str, paths), "--tokens-file", str(tokens_file), "--ctx", "8",
               "--stride", "5", "--dtype", "float64", "--threads", "1", "--json", str(out), "--per-token")
    assert run.exit_code == 0, run.output
    assert "perplexity" in run.output and "tokens/s" in run.output and "invalid UTF-8" in run.output
    payload = json.loads(out.read_text())
    docs = list(corpus.read_documents(paths)) + [corpus.Document(str(tokens_file), (6, 0), tokens=_ids(25, 8))]
    # the CLI tokenizes text documents with the model's own tokenizer, if it has one
    expected = corpus.score_documents(model, corpus.open_tokenizer("synthetic:tiny"), docs, ctx=8, stride=5)
    assert [d["id"] for d in payload["documents"]] == [s.id for s in expected.scores]
    assert [d["logprob_sum"] for d in payload["documents"]] == pytest.approx(
        [s.logprob_sum for s in expected.scores], rel=1e-12)
    assert payload["corpus"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-12)
    assert payload["corpus"]["failed"] == expected.failed >= 9


def test_cli_fails_only_when_no_document_scores(tmp_path, cli):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff")
    run = cli("perplexity", "synthetic:tiny", str(bad), "--ctx", "4000", "--threads", "1")
    assert run.code == 1 and "error: no document could be scored (1 of 1 failed)" in run.err
    assert "Traceback" not in run.err
    assert "invalid UTF-8" in run.out
    assert "exceeds the model's context of 1024" in run.out  # --ctx past the model's positions warns
    run = cli("perplexity", "synthetic:tiny", "--threads", "1")
    assert run.code == 1 and "give the documents" in run.err
    run = cli("perplexity", "synthetic:tiny", str(bad), "--json", str(tmp_path / "x.csv"))
    assert run.code == 1 and "must end in .json" in run.err


def test_cli_reports_lone_surrogates_and_huge_token_ids_per_document(tmp_path, cli, model):
    """JSON that decodes but names no valid text (a lone surrogate escaped as \\ud800) or no token id
    torch can hold (2**70, negatives): each such line is one failed document; the others are scored and
    the --json file is written."""
    good = [_ids(9, 11), _ids(14, 12)]
    lines = [json.dumps({"id": "g0", "tokens": good[0]}).encode(),
             b'{"id": "text-surrogate", "text": "caf\\ud800 au lait"}',
             b'{"id": "big", "tokens": [1, 1180591620717411303424, 2]}',  # 2**70
             b'{"id": "negative", "tokens": [1, -3, 2]}',
             b'{"id": "id-\\udfff", "tokens": [1, 2, 3]}',  # the id itself cannot be written out
             json.dumps({"id": "g1", "tokens": good[1]}).encode()]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "scores.json"
    run = cli("perplexity", "synthetic:tiny", str(path), "--dtype", "float64", "--threads", "1", "--json", str(out))
    assert run.code == 0, run.err
    payload = json.loads(out.read_text())
    rows = {row["id"]: row for row in payload["documents"]}
    assert list(rows) == ["g0", "text-surrogate", "big", "negative", f"{path}:5", "g1"]
    assert "'text' is not valid Unicode (a lone surrogate" in rows["text-surrogate"]["error"]
    assert "token id out of range: 1180591620717411303424" in rows["big"]["error"]
    assert "token id out of range: -3" in rows["negative"]["error"]
    assert "\"id\" is not valid Unicode" in rows[f"{path}:5"]["error"]
    assert payload["corpus"]["failed"] == 4 and payload["corpus"]["documents"] == 6
    for name, ids in zip(("g0", "g1"), good):  # the good documents score as they do alone
        assert rows[name]["error"] is None
        assert rows[name]["logprob_sum"] == pytest.approx(float(_direct_logprobs(model, ids).sum()), rel=1e-9)


def test_cli_checks_the_output_files_before_any_work(tmp_path, cli, monkeypatch):
    """An output file that cannot be written is a one-line error before the model is even loaded."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output file was checked")

    monkeypatch.setattr(corpus_cmds, "open_model", no_model)
    doc = tmp_path / "doc.txt"
    doc.write_text("some text")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "taken.json").mkdir()
    for flag, target, message in [
        ("--json", tmp_path / "no" / "such" / "dir" / "s.json", "does not exist"),
        ("--json", tmp_path / "a-file" / "s.json", "does not exist"),
        ("--json", tmp_path / "taken.json", "is a directory"),
        ("--parquet", tmp_path / "missing" / "s.parquet", "does not exist"),
    ]:
        run = cli("perplexity", "synthetic:tiny", str(doc), flag, str(target))
        assert run.code == 1 and message in run.err and len(run.err.strip().splitlines()) == 1, run.err
        assert "Traceback" not in run.err and str(target) in run.err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        run = cli("perplexity", "synthetic:tiny", str(doc), "--json", str(locked / "s.json"))
        assert run.code == 1 and "cannot write in" in run.err, run.err


def test_distributed_scoring_says_how_to_install_ray_when_it_is_missing(monkeypatch):
    from pybitnet.distributed import RayUnavailableError, require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray gives
    with pytest.raises(RayUnavailableError, match=r"pip install \"pybitnet\[ray\]\""):
        require_ray()
