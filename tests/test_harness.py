"""lm-evaluation-harness: `pybitnet eval`, lm-eval's own `hf` backend and `local-completions` against our server
give the same numbers on one checkpoint.

Everything is local: a tiny BitNet checkpoint that transformers' BitNetForCausalLM loads (float32 floats on disk),
and three task YAMLs written here over JSONL files written here (`dataset_path: json`): a multiple-choice task
(some contexts shared by four choices, some longer than the context and left-truncated), a generate_until task
with stop strings, and a loglikelihood_rolling task whose documents are longer than the context.

Agreement with transformers is held to the float32 rule's spirit (docs/exactness.md): per-sample log-likelihoods
within 2e-3 relative, the same accuracy, the same greedy generations, the same rolling perplexity; our server is held
to our backend within 1e-6, as both run the same kernels.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from test_tokenizer_helpers import BOS, CORPUS, EOS, EOT, save_hf_tokenizer, train_llama3_style_bpe

MAX_LENGTH = 64  # the context every backend evaluates in; the rolling documents are longer
REL_TOL = 2e-3
TASKS = ("harness_mc", "harness_gen", "harness_ppl")


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason='lm-eval is not installed: pip install "pybitnet[eval]"')


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Nothing here may reach a hub (lm-eval's hf backend asks one for the model's revision); module-scoped, so the
    module's evaluations below run inside it."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("TOKENIZERS_PARALLELISM", "false")
        yield


def _words(rng: random.Random, n: int) -> str:
    vocabulary = " ".join(CORPUS[:10]).replace("\n", " ").split()
    return " ".join(rng.choice(vocabulary) for _ in range(n))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from pybitnet.config import preset
    from pybitnet.loaders.hf import save_hf
    from pybitnet.synthetic import random_weights

    tokenizer = train_llama3_style_bpe(400)
    config = preset("tiny").replace(
        vocab_size=tokenizer.get_vocab_size(), tie_word_embeddings=False, num_layers=2, max_position_embeddings=256,
        bos_token_id=tokenizer.token_to_id(BOS), eos_token_ids=(tokenizer.token_to_id(EOS), tokenizer.token_to_id(EOT)))
    directory = tmp_path_factory.mktemp("harness-model")
    # float32 floats on disk: transformers keeps an autobitlinear checkpoint's floats in their on-disk dtype
    save_hf(directory, config, random_weights(config, seed=1), float_dtype=torch.float32)
    save_hf_tokenizer(directory, tokenizer)
    return directory


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    rng = random.Random(0)
    directory = tmp_path_factory.mktemp("harness-tasks")

    def write(name: str, rows: list[dict], yaml: str) -> None:
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{yaml}", encoding="utf-8")

    lengths = [rng.randint(3, 12) for _ in range(10)] + [40, 60]  # the last two overflow MAX_LENGTH
    write("harness_mc", [{"question": _words(rng, n), "choices": [_words(rng, rng.randint(1, 4)) for _ in range(4)],
                          "answer": rng.randrange(4)} for n in lengths],
          'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
          'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    write("harness_gen", [{"prompt": _words(rng, rng.randint(3, 12)), "target": _words(rng, 2)} for _ in range(6)],
          'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
          'generation_kwargs:\n  until: [" and", "o"]\n  max_gen_toks: 12\n  do_sample: false\n'
          "metric_list:\n  - metric: exact_match\n")
    write("harness_ppl", [{"text": _words(rng, rng.randint(40, 100))} for _ in range(4)],
          'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
          "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return directory


def _samples_from_files(output: Path) -> tuple[dict, dict]:
    results_file = next(output.rglob("results_*.json"))
    samples = {}
    for task in TASKS:
        path = next(output.rglob(f"samples_{task}_*.jsonl"))
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()),
                               key=lambda s: s["doc_id"])
    return json.loads(results_file.read_text()), samples


@pytest.fixture(scope="module")
def ours(lm_eval, checkpoint, task_dir, tmp_path_factory):
    """`pybitnet eval` through the real entry point, as a user runs it; its results and samples files."""
    from pybitnet.cli import main

    output = tmp_path_factory.mktemp("harness-out")
    argv = ["pybitnet", "eval", str(checkpoint), "--tasks", ",".join(TASKS), "--include-path", str(task_dir),
            "--max-length", str(MAX_LENGTH), "--batch-size", "4", "--output-path", str(output), "--log-samples",
            "--threads", "1", "--seed", "7"]
    old_argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = argv
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    finally:
        sys.argv = old_argv
        torch.set_num_threads(threads)
    assert code in (0, None)
    results, samples = _samples_from_files(output)
    return {"results": results["results"], "config": results["config"], "samples": samples, "output": output}


def _evaluate(lm_eval, task_dir, model: str, model_args: str) -> dict:
    from lm_eval.tasks import TaskManager

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch._dynamo.config.patch(disable=True):  # transformers' BitNet helpers run eagerly (2 cores)
            out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), batch_size=4,
                                          device="cpu", log_samples=True,
                                          task_manager=TaskManager(include_path=str(task_dir)))
    finally:
        torch.set_num_threads(threads)
    samples = {task: sorted(rows, key=lambda s: s["doc_id"]) for task, rows in out["samples"].items()}
    return {"results": out["results"], "config": out["config"], "samples": samples}


@pytest.fixture(scope="module")
def hf(lm_eval, checkpoint, task_dir):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return _evaluate(lm_eval, task_dir, "hf", f"pretrained={checkpoint},dtype=float32,max_length={MAX_LENGTH}")


def _loglikelihoods(samples: list[dict]) -> list[float]:
    """Per request of each sample: a choice's (log-likelihood, is greedy) or a document's rolling log-likelihood."""
    values = [r[0] for s in samples for r in s["resps"]]
    return [float(v[0] if isinstance(v, (list, tuple)) else v) for v in values]


def _assert_close(ours: list[float], theirs: list[float], tol: float, what: str) -> None:
    assert len(ours) == len(theirs) and ours, what
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs))
    print(f"[harness] {what}: max relative difference {worst:.2e}")
    assert worst <= tol, f"{what}: relative difference {worst:.2e} > {tol:g}"


def _compare(ours: dict, theirs: dict, tol: float, who: str) -> None:
    mc_ours, mc_theirs = ours["samples"]["harness_mc"], theirs["samples"]["harness_mc"]
    _assert_close(_loglikelihoods(mc_ours), _loglikelihoods(mc_theirs), tol, f"{who}: multiple-choice log-likelihoods")
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["harness_mc"][metric] == theirs["results"]["harness_mc"][metric], metric
    assert [s["acc"] for s in mc_ours] == [s["acc"] for s in mc_theirs]

    gen_ours = [s["filtered_resps"] for s in ours["samples"]["harness_gen"]]
    gen_theirs = [s["filtered_resps"] for s in theirs["samples"]["harness_gen"]]
    assert gen_ours == gen_theirs, f"{who}: greedy generations differ"

    _assert_close(_loglikelihoods(ours["samples"]["harness_ppl"]), _loglikelihoods(theirs["samples"]["harness_ppl"]),
                  tol, f"{who}: rolling log-likelihoods")
    for metric in ("bits_per_byte,none", "byte_perplexity,none"):
        _assert_close([ours["results"]["harness_ppl"][metric]], [theirs["results"]["harness_ppl"][metric]],
                      tol, f"{who}: {metric}")


def test_eval_command_matches_lm_evals_hf_backend(ours, hf, checkpoint, task_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    documents = [json.loads(line)["text"] for line in (task_dir / "harness_ppl.jsonl").read_text().splitlines()]
    assert min(len(tokenizer.encode(d).ids) for d in documents) > 2 * MAX_LENGTH  # several windows each
    questions = [json.loads(line)["question"] for line in (task_dir / "harness_mc.jsonl").read_text().splitlines()]
    assert max(len(tokenizer.encode(q).ids) for q in questions) > MAX_LENGTH  # some contexts are truncated
    _compare(ours, hf, REL_TOL, "pybitnet eval vs hf")
    assert any(s["filtered_resps"][0] for s in ours["samples"]["harness_gen"])  # not all cut to nothing


def test_local_completions_against_pybitnet_serve_matches(ours, hf, lm_eval, checkpoint, task_dir):
    """lm-eval's OpenAI-compatible client (token-id prompts, echo + logprobs) against a live server. It reserves a
    token for the one it generates and scores rolling windows one token shorter, so max_length is ours + 2."""
    import pybitnet
    from pybitnet.harness import load_tokenizer
    from test_serve_support import LiveServer

    model, tokenizer = pybitnet.load(checkpoint), load_tokenizer(str(checkpoint))
    with LiveServer(model, tokenizer) as server:
        served = _evaluate(lm_eval, task_dir, "local-completions",
                           f"model=bitnet,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                           f"tokenizer={checkpoint},add_bos_token=True,max_length={MAX_LENGTH + 2}")
    _compare(ours, served, 1e-6, "local-completions vs pybitnet eval")
    _compare(served, hf, REL_TOL, "local-completions vs hf")


def test_eval_writes_lm_evals_files_and_table(ours):
    assert set(TASKS) <= set(ours["results"]) and ours["config"]["model"] == "pybitnet"
    assert ours["config"]["model_args"]["max_length"] == MAX_LENGTH
    assert all(len(ours["samples"][t]) > 0 for t in TASKS)


def test_shared_contexts_give_what_one_row_at_a_time_gives(lm_eval, checkpoint):
    """Choices that share a context run it once through a KV cache; the numbers are those of full passes, one request
    at a time (float64: equal to 1e-9), with groups larger than a batch and ragged continuations."""
    from pybitnet.harness import PyBitNetLM

    lm = PyBitNetLM(pretrained=str(checkpoint), dtype="float64", batch_size=3, max_length=MAX_LENGTH)
    rng = random.Random(3)
    requests = []
    for n in (5, 9, 2, 30):
        context = lm.tok_encode(_words(rng, n))
        for _ in range(rng.randint(2, 5)):
            requests.append((None, context, lm.tok_encode(" " + _words(rng, rng.randint(1, 5)),
                                                          add_special_tokens=False)))
    requests.append((None, lm.tok_encode(_words(rng, 7)), [5]))
    # a long context with short choices beside a short context with long ones: padded to the widest choice,
    # a row of the long context needs more cache than its own choices do
    long_context, short_context = list(range(10, 40)), [7, 8, 9]
    for context, first, n in ((long_context, 50, 3), (long_context, 60, 3), (short_context, 70, 20),
                              (short_context, 100, 20)):
        requests.append((None, context, list(range(first, first + n))))
    batched = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    alone = [lm._loglikelihood_tokens([r], disable_tqdm=True)[0] for r in requests]
    _assert_close([b[0] for b in batched], [a[0] for a in alone], 1e-9, "shared context vs one row")
    assert [b[1] for b in batched] == [a[1] for a in alone]


def test_generation_settings_follow_the_tasks_kwargs(lm_eval, checkpoint):
    from pybitnet.harness import PyBitNetLM, cut_at_stops

    lm = PyBitNetLM(pretrained=str(checkpoint), max_length=MAX_LENGTH, max_gen_toks=9)
    stops, limit, sampling = lm._generation_settings({"until": "\n\n", "do_sample": True, "temperature": 0.7,
                                                      "top_p": 0.9})
    assert stops == ["\n\n", EOS] and limit == 9 and sampling.temperature == 0.7 and sampling.top_p == 0.9
    stops, limit, sampling = lm._generation_settings({"until": ["Q:"], "max_gen_toks": 4, "temperature": 0.5})
    assert stops == ["Q:", EOS] and limit == 4 and sampling.greedy  # no do_sample: greedy, as hf
    assert cut_at_stops("abc Q: def\n\nx", ["\n\n", "Q:"]) == "abc "


def test_chat_template_as_transformers_renders_it(lm_eval, checkpoint):
    transformers = pytest.importorskip("transformers")
    from pybitnet.harness import PyBitNetLM

    lm = PyBitNetLM(pretrained=str(checkpoint), max_length=MAX_LENGTH)
    theirs = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    assert lm.apply_chat_template(chat) == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    prefilled = chat + [{"role": "assistant", "content": "The answer is"}]
    assert lm.apply_chat_template(prefilled, add_generation_prompt=False) == theirs.apply_chat_template(
        prefilled, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    assert lm.tokenizer_name and "/" not in lm.tokenizer_name
    assert lm.chat_template(True) == theirs.chat_template


def test_eval_names_an_unknown_task_in_one_line(lm_eval, cli, task_dir):
    run = cli("eval", "synthetic:tiny", "--tasks", "harness_mc,no_such_task_here", "--include-path", str(task_dir))
    assert run.code == 1 and "unknown task: no_such_task_here" in run.err and len(run.err.strip().splitlines()) == 1


def test_eval_without_lm_eval_says_how_to_install_it(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    run = cli("eval", "--tasks", "hellaswag")
    assert run.code == 1 and 'pip install "pybitnet[eval]"' in run.err and len(run.err.strip().splitlines()) == 1


def test_eval_log_samples_needs_an_output_path(cli):
    run = cli("eval", "--tasks", "hellaswag", "--log-samples")
    assert run.code == 1 and "--output-path" in run.err
