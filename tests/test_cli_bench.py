"""`pybitnet bench`: a quick default with progress, outputs checked before the work, results saved before the plot."""

from __future__ import annotations

import json
import sys

import pytest

from pybitnet import bench as suite

TINY_RUN = ("bench", "--layers", "1", "--threads", "1", "--sections", "full_vs_step,decode")


@pytest.fixture
def tiny_shape(monkeypatch):
    """The suite on the tiny preset instead of the 2B-4T shape: the same steps in a fraction of the time."""
    from pybitnet import synthetic

    real = synthetic.random_model
    monkeypatch.setattr(synthetic, "random_model", lambda preset, **kwargs: real("tiny", **kwargs))


def test_default_workload_is_the_real_depth_and_fits_a_newcomers_minutes():
    # The estimate is what the progress bar counts down; the default must stay a short wait at the real depth.
    assert 30 <= suite.estimated_seconds(30, **suite.QUICK) <= 120
    assert suite.estimated_seconds(30, **suite.FULL) > 5 * suite.estimated_seconds(30, **suite.QUICK)
    assert set(suite.FULL["sections"]) == set(suite.SECTIONS)


def test_bench_prints_tables_and_writes_json_and_markdown(cli, tmp_path, monkeypatch, tiny_shape):
    monkeypatch.setenv("COLUMNS", "120")
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    done = cli(*TINY_RUN, "--json", str(out), "--markdown", str(md))
    assert done.code == 0, done.err
    results = json.loads(out.read_text())
    assert results["threads"] == 1 and results["layers"] == 1
    assert [r["T"] for r in results["full_vs_step"]] == list(suite.QUICK["full_vs_step_t"])
    assert [r["context"] for r in results["decode"]] == list(suite.QUICK["decode_contexts"])
    assert all(r["speedup"] > 0 for r in results["full_vs_step"])
    assert "1 layer," in done.out and "1 layers" not in done.out and "1 layers" not in md.read_text()
    assert "decode (decode_step, batch 1)" in done.out and "|---" not in done.out  # a table, not raw markdown
    assert "Full-sequence vs step-by-step" in md.read_text()


def test_progress_goes_to_stderr_with_the_model_build_inside_its_step(cli, monkeypatch, tiny_shape):
    """The bar (here plain lines: stderr is no terminal) is on stderr and moves while the model is built;
    stdout holds only the results."""
    from pybitnet.cli import progress

    monkeypatch.setattr(progress, "FIRST_LINE_AFTER", 0.0)
    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)
    done = cli(*TINY_RUN)
    assert done.code == 0, done.err
    lines = done.err.splitlines()
    building = [line for line in lines if line.startswith("building the model")]
    assert "building the model: layer 1/1" in done.err and len(building) > 2
    percents = [int(line.split("%")[0].split()[-1]) for line in lines if "%" in line]
    assert percents == sorted(percents) and "left" in done.err
    assert "decode at context" in done.err
    assert "building the model" not in done.out and "left" not in done.out
    assert "decode (decode_step, batch 1)" in done.out


def test_estimates_cover_every_step_the_suite_reports(tiny_shape):
    reported = []
    suite.run_suite(layers=1, threads=1, sections=("decode",), decode_contexts=(8,),
                    progress=lambda message, seconds: reported.append((message, seconds)))
    assert [m for m, _ in reported if not m.startswith("WARNING")] == [
        "checking the machine is idle", "building the model", "decode at context 8"]
    assert all(seconds > 0 for m, seconds in reported if not m.startswith("WARNING"))


def test_the_progress_total_is_the_sum_of_the_steps(tiny_shape, monkeypatch):
    # so the bar reaches 100% as the run ends, for every section
    monkeypatch.setattr(suite, "peak_rss", lambda layers, seq, threads: 2**30 + seq)  # no child processes
    workload = {**suite.FULL, "full_vs_step_t": (8,), "scaling_t": (8, 16), "decode_contexts": (8,)}
    reported = []
    suite.run_suite(layers=2, threads=1, progress=lambda message, seconds: reported.append(seconds), **workload)
    assert abs(sum(reported) - suite.estimated_seconds(2, **workload)) < 1e-9


@pytest.mark.parametrize("option", ["--json", "--markdown", "--plot"])
def test_unwritable_outputs_are_refused_before_the_work(cli, tmp_path, monkeypatch, option):
    monkeypatch.setattr(suite, "run_suite", lambda **kwargs: pytest.fail("benchmarked before checking outputs"))
    done = cli(*TINY_RUN, option, str(tmp_path / "missing" / "out.file"))
    assert done.code == 1 and f"no such directory {tmp_path / 'missing'}" in done.err
    done = cli(*TINY_RUN, option, str(tmp_path))
    assert done.code == 1 and "is a directory" in done.err


def test_plot_without_matplotlib_is_refused_before_the_work(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "run_suite", lambda **kwargs: pytest.fail("benchmarked before checking outputs"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    done = cli(*TINY_RUN, "--plot", str(tmp_path / "p.png"))
    assert done.code == 1 and "needs matplotlib" in done.err and len(done.err.splitlines()) == 1


def test_a_failing_plot_keeps_the_printed_table_and_the_saved_json(cli, tmp_path, monkeypatch, tiny_shape):
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setattr(suite, "plot", lambda results, path: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    done = cli(*TINY_RUN, "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"))
    # the error is one line, after any progress lines (stderr is no terminal here: the bar prints plain lines)
    errors = [line for line in done.err.splitlines() if line.startswith("error")]
    assert done.code == 1 and errors == [done.err.splitlines()[-1]] and errors[0].startswith("error: No space left on device")
    assert "Traceback" not in done.err
    assert "decode (decode_step, batch 1)" in done.out
    assert json.loads((tmp_path / "r.json").read_text())["layers"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_results_are_saved_before_a_failing_plot(tmp_path, monkeypatch):
    results = {"threads": 1}
    monkeypatch.setattr(suite, "plot", lambda results, path: (_ for _ in ()).throw(RuntimeError("plot failed")))
    monkeypatch.setattr(suite, "markdown", lambda results: "# report\n")
    with pytest.raises(RuntimeError):
        suite.save(results, str(tmp_path / "r.json"), str(tmp_path / "r.md"), str(tmp_path / "r.png"))
    assert json.loads((tmp_path / "r.json").read_text()) == results
    assert (tmp_path / "r.md").read_text() == "# report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # no partial plot or temp files


def test_the_suite_script_leaves_the_committed_report_alone_unless_asked():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("run_suite", root / "benchmarks" / "run_suite.py")
    run_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_suite)
    committed = (root / "BENCHMARKS.md").resolve()
    assert Path(run_suite.parse_args([]).output).resolve() != committed
    assert Path(run_suite.parse_args(["--output", str(committed)]).output).resolve() == committed
