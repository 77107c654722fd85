"""`pybitnet eval [MODEL] --tasks T1,T2`: EleutherAI's lm-evaluation-harness on a pybitnet model.

The model runs through the `pybitnet` lm-eval backend (pybitnet.harness); lm-eval does the rest as its own
`lm_eval` command would: tasks, few-shot contexts, metrics, the results and samples files (its
EvaluationTracker) and the results table (its make_table). Needs `pip install "pybitnet[eval]"`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import typer

from ..errors import InputError
from .app import app
from .options import DtypeOpt, ModelArg, ThreadsOpt, parse_dtype, set_threads

INSTALL_HINT = 'pip install "pybitnet[eval]"'
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError:
        raise InputError(f"pybitnet eval needs EleutherAI's lm-evaluation-harness: {INSTALL_HINT}") from None
    import lm_eval

    return lm_eval


def _task_names(tasks: str) -> list[str]:
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise InputError("--tasks needs at least one task name, e.g. --tasks hellaswag,arc_easy")
    return list(dict.fromkeys(names))


def _check_tasks(task_manager, names: list[str]) -> None:
    unknown = [name for name in names if not task_manager.match_tasks([name])]
    if unknown:
        raise InputError(f"unknown task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} (`lm_eval ls tasks` "
                         f"lists lm-eval's tasks; give a folder of task YAML files with --include-path DIR)")


def _limit(value: Optional[float]):
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"--limit must be a count >= 1 or a fraction in (0, 1), got {value}")
    if value < 1:
        return value
    if value != int(value):
        raise InputError(f"--limit must be a whole count of examples or a fraction below 1, got {value}")
    return int(value)


@app.command("eval")
def eval_cmd(
    model: str = ModelArg,
    tasks: str = typer.Option(..., "--tasks", help="comma-separated lm-eval task (or group) names"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help="examples in each few-shot context "
                                                                                   "[default: each task's own]"),
    limit: Optional[float] = typer.Option(None, "--limit", help="examples per task (below 1: a fraction); for "
                                                                 "quick checks, not reportable scores"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="sequences per forward pass"),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=2,
                                             help="context in tokens [default: the model's]"),
    include_path: Optional[Path] = typer.Option(None, "--include-path",
                                                help="a folder of extra task YAML files (local tasks)"),
    output_path: Optional[Path] = typer.Option(None, "--output-path",
                                               help="write lm-eval's results (and samples) files here"),
    log_samples: bool = typer.Option(False, "--log-samples", help="also write every request and response "
                                                                  "(needs --output-path)"),
    apply_chat_template: bool = typer.Option(False, "--apply-chat-template",
                                             help="format prompts with the model's chat template"),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=MAX_SEED,
                                       help="seed of python, numpy, torch and the few-shot sampler "
                                            "[default: lm-eval's]"),
    dtype: str = DtypeOpt, threads: Optional[int] = ThreadsOpt,
):
    """Evaluate MODEL on lm-evaluation-harness tasks (pip install "pybitnet[eval]")."""
    names = _task_names(tasks)
    limit_value = _limit(limit)
    parse_dtype(dtype)
    if log_samples and output_path is None:
        raise InputError("--log-samples writes the samples next to the results: give --output-path DIR too")
    if include_path is not None and not include_path.is_dir():
        raise InputError(f"--include-path {include_path}: not a folder")
    if output_path is not None and output_path.exists() and not output_path.is_dir() \
            and output_path.suffix.lower() != ".json":
        raise InputError(f"--output-path {output_path} exists and is not a folder")
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from .. import harness

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    task_manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    _check_tasks(task_manager, names)
    set_threads(threads)

    tracker = None
    if output_path is not None:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=str(output_path))
    model_args = {"pretrained": model, "dtype": dtype}  # batch_size reaches the model through simple_evaluate
    if max_length is not None:
        model_args["max_length"] = max_length
    seeds = {} if seed is None else {"random_seed": seed, "numpy_random_seed": seed, "torch_random_seed": seed,
                                     "fewshot_random_seed": seed}
    results = lm_eval.simple_evaluate(
        model=harness.MODEL_NAME, model_args=model_args, tasks=names, num_fewshot=num_fewshot,
        batch_size=batch_size, device="cpu", limit=limit_value, log_samples=log_samples,
        evaluation_tracker=tracker, apply_chat_template=apply_chat_template, task_manager=task_manager, **seeds,
    )
    if results is None:  # only a non-zero rank of a distributed run gets nothing back; we run one process
        raise InputError("lm-eval returned no results")
    samples = results.pop("samples", None)
    if tracker is not None:
        # the same files `lm_eval --output_path ... [--log_samples]` writes
        tracker.save_results_aggregated(results=results, samples=samples if log_samples else None)
        if log_samples:
            for task_name in results["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    shown = {k: v for k, v in model_args.items() if k != "pretrained"}
    print(f"pybitnet ({model}, {', '.join(f'{k}={v}' for k, v in shown.items())}), limit: {limit_value}, "
          f"num_fewshot: {num_fewshot}, batch_size: {batch_size}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if tracker is not None:
        print(f"results written under {output_path}")
