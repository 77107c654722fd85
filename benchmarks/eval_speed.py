"""lm-evaluation-harness speed: requests/s of a multiple-choice task through pybitnet and through lm-eval's `hf` backend.

One random model of a preset's shape (2B-4T, 6 layers by default: the real vocabulary and widths, fewer layers)
is written once as a Hugging Face directory (float32 floats, so transformers' BitNetForCausalLM loads it as it is)
with a synthetic byte-level BPE vocabulary of the model's size (serve_load.synthetic_bpe). The script writes a
multiple-choice task over it (`dataset_path: json`): --questions questions of --context-min..--context-max tokens,
--choices answers each (200 log-likelihood requests by default), and runs it with lm-eval's simple_evaluate on:

  pybitnet    the `pybitnet` lm-eval model (pybitnet.harness): shared contexts prefilled once, continuations only
  hf          lm-eval's own `hf` backend on the same directory (transformers, float32, CPU)
  llama_cpp   lm-eval's `local-completions` against llama-cpp-python's OpenAI server on the directory converted
              to GGUF TQ2_0 (`pybitnet convert`). It answers echo + logprobs only when started with
              --logits_all True, and its /v1/completions takes text prompts only (no token ids), so requests go
              as text (tokenized_requests=False) and the server re-tokenizes them (to the same tokens here: the
              file it loads asks for no BOS, as lm-eval counts none). Its log-likelihoods are not comparable:
              llama.cpp's `bitnet` graph computes SiLU where this model has relu² (tests/test_gguf_llamacpp.py),
              so only its requests/s means something

Each engine's model is loaded and warmed up on one question before the clock starts; the time is that of lm-eval's
loglikelihood call (all 200 requests), and requests/s is requests over it. Per-request log-likelihoods are compared with pybitnet's (max
relative difference, same accuracy). All engines run with --threads threads.

    python benchmarks/eval_speed.py --json benchmarks/results/eval_speed.json

Quick check at a tiny size:
    python benchmarks/eval_speed.py --preset small --layers 2 --questions 4 --context-min 20 --context-max 40
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, launch, make_prompts, stop_server, synthetic_bpe  # noqa: E402

TASK = "eval_speed_mc"


def build_model(directory: Path, preset_name: str, layers: int, seed: int):
    """The HF directory (float32 floats, synthetic BPE tokenizer) and its tokenizers.Tokenizer."""
    from pybitnet.config import preset
    from pybitnet.loaders.hf import save_hf
    from pybitnet.synthetic import random_weights

    config = preset(preset_name).replace(num_layers=layers)
    tokenizer = synthetic_bpe(config.vocab_size)
    config = config.replace(bos_token_id=config.vocab_size - 3,
                            eos_token_ids=(config.vocab_size - 2, config.vocab_size - 1))
    save_hf(directory, config, random_weights(config, seed), float_dtype=torch.float32)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"}))
    return tokenizer


def write_task(directory: Path, tokenizer, questions: int, choices: int, shortest: int, longest: int,
               seed: int) -> Path:
    contexts = make_prompts(tokenizer, questions, shortest, longest, seed)
    answers = make_prompts(tokenizer, questions * choices, 2, 8, seed + 1)
    rng = random.Random(seed)
    data = directory / f"{TASK}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for q, context in enumerate(contexts):
            f.write(json.dumps({"question": context, "choices": answers[q * choices:(q + 1) * choices],
                                "answer": rng.randrange(choices)}) + "\n")
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\ntarget_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
    return directory


def timed(lm) -> dict:
    """Record the seconds of each loglikelihood call on this LM instance."""
    record = {"seconds": 0.0, "requests": 0}
    inner = lm.loglikelihood

    def loglikelihood(requests, *args, **kwargs):
        start = time.perf_counter()
        out = inner(requests, *args, **kwargs)
        record["seconds"] += time.perf_counter() - start
        record["requests"] += len(requests)
        return out

    lm.loglikelihood = loglikelihood
    return record


def evaluate(lm, task_manager, hf_eager: bool = False) -> tuple[dict, list[float], float]:
    """One untimed warm-up question (first-call costs: torch.compile, kernels, connections), then the task."""
    import contextlib

    import lm_eval

    record = timed(lm)
    context = torch._dynamo.config.patch(disable=True) if hf_eager else contextlib.nullcontext()
    with context:
        lm_eval.simple_evaluate(model=lm, tasks=[TASK], limit=1, bootstrap_iters=0, task_manager=task_manager)
        record.update(seconds=0.0, requests=0)
        out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], log_samples=True, bootstrap_iters=0,
                                      task_manager=task_manager)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    logliks = [float(r[0][0]) for s in samples for r in s["resps"]]
    record["acc"] = out["results"][TASK]["acc,none"]
    return record, logliks, out["results"][TASK]["acc,none"]


def start_llama_server(gguf: Path, threads: int, ctx: int, log: Path):
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
               str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(2 * ctx),
               "--n_batch", "512", "--model_alias", "model", "--logits_all", "True"]
    return launch("llama_cpp.server", command, port, threads, log)


def no_bos_copy(model_dir: Path, work: Path) -> Path:
    """The model directory with no BOS in its tokenizer config, for the GGUF llama.cpp serves: llama.cpp puts BOS
    before a text prompt when the file says so, and lm-eval counts the context's tokens without it (this vocabulary
    adds no BOS of its own), which would shift every continuation by one token."""
    copy = work / "hf-for-gguf"
    copy.mkdir(exist_ok=True)
    for path in model_dir.iterdir():
        target = copy / path.name
        if path.name == "tokenizer_config.json":
            config = json.loads(path.read_text())
            config.pop("bos_token", None)
            target.write_text(json.dumps(config))
        elif not target.exists():
            target.symlink_to(path.resolve())
    return copy


def compare(ours: list[float], theirs: list[float]) -> float:
    return max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ours, theirs)) if len(ours) == len(theirs) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bitnet-b1.58-2b-4t")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--context-min", type=int, default=100)
    parser.add_argument("--context-max", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass, both in-process engines")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--engines", default="pybitnet,hf,llama_cpp")
    parser.add_argument("--hf-eager", action="store_true",
                        help="run transformers' BitNet helpers uncompiled (by default they are torch.compiled)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model and task here [default: a temp dir]")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"pybitnet", "hf", "llama_cpp"}
    if unknown:
        parser.error(f"unknown engines: {', '.join(sorted(unknown))}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="eval-speed-") as tmp:
        work = args.workdir or Path(tmp)
        model_dir, task_dir = work / "hf", work / "tasks"
        model_dir.mkdir(parents=True, exist_ok=True)
        task_dir.mkdir(parents=True, exist_ok=True)
        print(f"writing a {args.layers}-layer {args.preset} model to {model_dir} ...", flush=True)
        tokenizer = build_model(model_dir, args.preset, args.layers, args.seed)
        write_task(task_dir, tokenizer, args.questions, args.choices, args.context_min, args.context_max, args.seed)
        requests = args.questions * args.choices
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=str(task_dir))  # indexing lm-eval's tasks takes a while: once
        ctx = args.context_max + 64  # every request fits: context + the longest choice
        rows, reference = {}, None
        for engine in engines:
            print(f"\n== {engine}", flush=True)
            start = time.perf_counter()
            try:
                process = None
                if engine == "pybitnet":
                    from pybitnet.harness import PyBitNetLM

                    lm = PyBitNetLM(pretrained=str(model_dir), batch_size=args.batch_size, max_length=ctx)
                elif engine == "hf":
                    import lm_eval.models  # noqa: F401
                    from lm_eval.models.huggingface import HFLM

                    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=args.batch_size,
                              max_length=ctx)
                else:
                    from lm_eval.models.openai_completions import LocalCompletionsAPI

                    gguf = work / "model-tq2_0.gguf"
                    subprocess.run([sys.executable, "-m", "pybitnet", "convert", str(no_bos_copy(model_dir, work)),
                                    str(gguf), "--type", "tq2_0", "--force"], check=True)
                    process, url = start_llama_server(gguf, args.threads, ctx + 2, work / "llama_cpp.log")
                    lm = LocalCompletionsAPI(model="model", base_url=f"{url}/v1/completions",
                                             tokenizer_backend="huggingface", tokenizer=str(model_dir),
                                             tokenized_requests=False, max_length=ctx + 2, batch_size=1)
                load_s = time.perf_counter() - start
                try:
                    record, logliks, acc = evaluate(lm, task_manager, hf_eager=args.hf_eager and engine == "hf")
                finally:
                    if process is not None:
                        stop_server(process)
            except Exception as err:  # a benchmark reports what failed and goes on with the other engines
                print(f"{engine}: failed: {type(err).__name__}: {str(err)[:500]}", flush=True)
                rows[engine] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
                continue
            if reference is None and engine == "pybitnet":
                reference = logliks
            row = {"load_s": round(load_s, 2), "loglikelihood_s": round(record["seconds"], 3),
                   "requests": record["requests"], "requests_per_s": round(record["requests"] / record["seconds"], 3),
                   "acc": acc}
            if reference is not None and engine != "pybitnet":
                row["max_rel_diff_vs_pybitnet"] = compare(reference, logliks)
            rows[engine] = row
            print(json.dumps(row), flush=True)

    summary = {"preset": args.preset, "layers": args.layers, "questions": args.questions, "choices": args.choices,
               "requests": requests, "context_tokens": [args.context_min, args.context_max],
               "batch_size": args.batch_size, "threads": args.threads, "torch": torch.__version__,
               "hf_compiled": not args.hf_eager, "engines": rows}
    print("\n| engine | requests/s | loglikelihood s | load s | acc | max rel diff vs pybitnet |")
    print("|---|---:|---:|---:|---:|---:|")
    for engine, row in rows.items():
        if "error" in row:
            print(f"| {engine} | failed: {row['error'][:80]} | | | | |")
            continue
        diff = row.get("max_rel_diff_vs_pybitnet")
        print(f"| {engine} | {row['requests_per_s']:.2f} | {row['loglikelihood_s']:.1f} | {row['load_s']:.1f} | "
              f"{row['acc']:.3f} | {'' if diff is None else f'{diff:.2e}'} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
