"""Sweeps: grid expansion, derived values, run names, the run.json life cycle (skip complete,
resume interrupted, restart crashed), the command line, and every sweep file under
configs/experiments/ expanding into runs that LightningCLI accepts."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lightning_bn.cli import main as cli_main
from lightning_bn.errors import ConfigError
from lightning_bn.sweep import build_spec, expand, expr, load_sweep, option_args, plan, stage_args
from lightning_bn.sweep.__main__ import main as sweep_main
from lightning_bn.sweep.state import read_record, write_record

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))

# Stands in for `python -m lightning_bn`: same arguments, no training; records each call.
STUB = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    args = sys.argv[1:]
    stage = args[0]
    options = dict(a[2:].split("=", 1) for a in args[1:] if a.startswith("--") and "=" in a)
    run_dir = Path(options["trainer.logger.init_args.save_dir"], options["trainer.logger.init_args.name"],
                   options["trainer.logger.init_args.version"])
    with open(os.environ["STUB_CALLS"], "a") as calls:
        env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
        calls.write(json.dumps({"stage": stage, "run": run_dir.name, "args": args, "env": env}) + "\\n")
    out_dir = run_dir / options.get("trainer.logger.init_args.sub_dir", "")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stage}.done").write_text("stub")
    if stage == "fit" and os.environ.get("STUB_NO_CHECKPOINT") != "1":
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / "last.ckpt").write_text("stub checkpoint")
    text, _, fail_stage = os.environ.get("STUB_FAIL", "").partition(":")
    if text and text in run_dir.name and fail_stage == stage:
        print(f"stub: failing {stage} of {run_dir.name} on purpose")
        sys.exit(3)
    if os.environ.get("STUB_SLEEP"):
        (run_dir / "sleeping").write_text("")
        time.sleep(float(os.environ["STUB_SLEEP"]))
    print(f"stub: {stage} of {run_dir.name} ok")
    """
)


def spec_of(**sweep):
    sweep.setdefault("name", "demo")
    return build_spec(sweep, check_files=False)


BASIC = {
    "grid": {
        "model.init_args.norm": ["none", "batch"],
        "model.init_args.lr": [0.1, 0.5],
        "seed_everything": [0, 1],
    },
    "overrides": {"trainer.max_steps": 5},
    "then": ["test"],
}


# -- expansion ------------------------------------------------------------------------------
def test_grid_is_the_product_in_written_order_with_deterministic_names():
    runs = expand(spec_of(**BASIC))
    assert len(runs) == 8
    assert [r.name for r in runs[:3]] == [
        "norm=none,lr=0.1,seed=0",
        "norm=none,lr=0.1,seed=1",
        "norm=none,lr=0.5,seed=0",
    ]
    assert runs[-1].name == "norm=batch,lr=0.5,seed=1"
    assert len({r.name for r in runs}) == 8
    assert runs[5].values == {"model.init_args.norm": "batch", "model.init_args.lr": 0.1, "seed_everything": 1}
    assert runs[5].options["model.init_args.lr"] == 0.1 and runs[5].options["trainer.max_steps"] == 5
    assert [r.name for r in expand(spec_of(**BASIC))] == [r.name for r in runs]  # deterministic


def test_derived_learning_rate_scales_with_batch_size_and_variables_stay_out_of_the_command():
    spec = spec_of(
        grid={"data.init_args.batch_size": [32, 128], "base_lr": [0.001, 0.00025]},
        derived={"model.init_args.lr": "base_lr * data.init_args.batch_size"},
    )
    runs = expand(spec)
    lrs = {(r.values["data.init_args.batch_size"], r.values["base_lr"]): r.options["model.init_args.lr"] for r in runs}
    assert lrs == {(32, 0.001): 0.032, (32, 0.00025): 0.008, (128, 0.001): 0.128, (128, 0.00025): 0.032}
    assert runs[0].name == "batch_size=32,base_lr=0.001"
    assert runs[0].variables == {"base_lr": 0.001}
    args = option_args(spec, runs[2])
    assert "--model.init_args.lr=0.128" in args and not any("base_lr" in a for a in args)


def test_labelled_axis_sets_several_options_together_and_parents_come_first():
    spec = spec_of(
        grid={
            "model.init_args.lr": [0.1],
            "norm": {
                "standard": {"model.init_args.norm": "none"},
                "l1": {"model.init_args.norm": "lp", "model.init_args.norm_kwargs": {"p": 1}},
            },
        },
        overrides={"model": "lightning_bn.VGG"},
    )
    standard, l1 = expand(spec)
    assert (standard.name, l1.name) == ("lr=0.1,norm=standard", "lr=0.1,norm=l1")
    assert l1.values == {"model.init_args.lr": 0.1, "norm": "l1"}
    assert l1.options["model.init_args.norm_kwargs"] == {"p": 1}
    args = option_args(spec, l1)
    assert args[0] == "--model=lightning_bn.VGG"  # the class before its init_args
    assert '--model.init_args.norm_kwargs={"p": 1}' in args


def test_short_names_grow_until_unique():
    spec = spec_of(grid={"model.init_args.lr": [0.1], "optimizer.init_args.lr": [0.2], "data.init_args.seed": [1]})
    assert expand(spec)[0].name == "model.init_args.lr=0.1,optimizer.init_args.lr=0.2,seed=1"


def test_values_become_file_name_safe_labels():
    spec = spec_of(grid={"model.init_args.norm_kwargs": [{"p": 1}, {"p": "inf"}], "trainer.devices": [[0, 1]]})
    assert [r.name for r in expand(spec)] == ["norm_kwargs=p-1,devices=0+1", "norm_kwargs=p-inf,devices=0+1"]


def test_full_block_applies_only_with_full_and_goes_to_its_own_directory():
    raw = {
        **BASIC,
        "full": {"overrides": {"trainer.max_steps": 1000}, "grid": {"seed_everything": [0, 1, 2]}},
    }
    small, full = spec_of(**raw), build_spec({"name": "demo", **raw}, full=True, check_files=False)
    assert (small.experiment, full.experiment) == ("demo", "demo-full")
    assert len(expand(small)) == 8 and len(expand(full)) == 12
    assert expand(full)[0].options["trainer.max_steps"] == 1000
    assert expand(small)[0].options["trainer.max_steps"] == 5


def test_yaml_scientific_notation_is_a_number(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("sweep:\n  name: s\n  grid:\n    model.init_args.lr: [1e-3, 2.5E-4]\n")
    runs = expand(load_sweep(path))
    assert [r.options["model.init_args.lr"] for r in runs] == [0.001, 0.00025]


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"grid": {"a.b": [1]}, "gird": {}}, "unknown key 'gird'"),
        ({"name": "a/b"}, "name='a/b' must be a file-name-safe string"),
        ({"grid": {"seed_everythin": [0]}}, "'seed_everythin' is neither a LightningCLI option"),
        ({"grid": {"a.b": []}}, "must be a non-empty list of values or a mapping"),
        ({"grid": {"a.b": [1]}, "overrides": {"a.b": 2}}, "'a.b' is set by both overrides and grid.a.b"),
        ({"derived": {"a.lr": "base * 2"}}, "reads 'base', which no grid axis or override sets"),
        ({"grid": {"x": [1]}, "derived": {"a.lr": "__import__('os').getcwd()"}}, "allowed functions"),
        ({"grid": {"x": [1]}, "derived": {"a.lr": "x if x else 1"}}, "IfExp is not allowed"),
        ({"grid": {"x": [1]}, "derived": {"a.lr": "'x' * 3"}}, "only numbers are allowed"),
        ({"grid": {"x": [0]}, "derived": {"a.lr": "1 / x"}}, "fails with x=0: division by zero"),
        ({"grid": {"a.norm": ["none"]}, "derived": {"a.lr": "a.norm * 2"}}, "a.norm='none' is not a number"),
        ({"command": "train"}, "command='train' is not allowed"),
        ({"command": "test", "then": ["test"]}, "needs command: fit"),
        ({"grid": {"arch": {"res net": {"model": "X"}}}}, "label 'res net' must be file-name safe"),
        ({"grid": {"a.b": ["x y", "x_y"]}}, "two values give the same run-name label"),
        ({"checkpoint_every_n_steps": 0}, "checkpoint_every_n_steps=0 must be an integer >= 1"),
        ({"full": {"overides": {}}}, "unknown key 'overides'"),
    ],
)
def test_mistakes_in_a_sweep_fail_at_load_with_one_line(sweep, message):
    with pytest.raises(ConfigError) as err:
        expand(spec_of(**sweep))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_sweep_file_needs_the_sweep_key_and_its_base_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain.yaml").write_text("trainer: {max_steps: 1}\n")
    with pytest.raises(ConfigError, match="exactly one top-level key 'sweep:'"):
        load_sweep(tmp_path / "plain.yaml")
    (tmp_path / "s.yaml").write_text("sweep: {name: s, base_config: configs/nope.yaml}\n")
    with pytest.raises(ConfigError, match="base_config 'configs/nope.yaml' not found from the current directory"):
        load_sweep(tmp_path / "s.yaml")


def test_expression_language():
    tree = expr.parse("max(1, int(sqrt(a.b))) * 2 ** -c + log2(8) - 7 // 2 % 2", "t")
    assert expr.names_in(tree) == ["a.b", "c"]
    assert expr.evaluate(tree, {"a.b": 16.0, "c": 1}, "t") == 4 * 0.5 + 3 - 1
    assert expr.evaluate(expr.parse("0.1 * 3", "t"), {}, "t") == 0.3  # rounded to 12 significant digits
    for bad in ("a[0]", "a < b", "lambda: 1", "f(1)", "min(x=1)", "(1).real"):
        with pytest.raises(ConfigError):
            expr.parse(bad, "t")


# -- commands ---------------------------------------------------------------------------------
def test_stage_commands_set_the_log_directory_checkpoint_and_resume():
    spec = spec_of(**BASIC, base_config=["configs/quickstart.yaml"])
    run = expand(spec)[0]
    fit = stage_args(spec, run, "fit", "runs")
    assert fit[:3] == ["fit", "--config", "configs/quickstart.yaml"]
    assert "--trainer.logger.init_args.save_dir=runs" in fit
    assert "--trainer.logger.init_args.name=demo" in fit
    assert "--trainer.logger.init_args.version=norm=none,lr=0.1,seed=0" in fit
    assert fit[-2:] == [
        "--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
        "--trainer.callbacks.save_last=true",
    ]
    resumed = stage_args(spec, run, "fit", "runs", resume_from="runs/demo/x/checkpoints/last.ckpt")
    assert resumed[-1] == "--ckpt_path=runs/demo/x/checkpoints/last.ckpt"
    test = stage_args(spec, run, "test", "runs")
    assert "--trainer.logger.init_args.sub_dir=test" in test
    assert test[-1] == f"--ckpt_path={Path('runs/demo/norm=none,lr=0.1,seed=0/checkpoints/last.ckpt')}"
    assert not any("callbacks" in a for a in test)


# -- run states -------------------------------------------------------------------------------
def _record(spec, run, **fields):
    return {"args": option_args(spec, run), "stages": list(spec.stages), "done": [], "complete": False, **fields}


def test_plan_reads_the_state_of_each_run(tmp_path):
    spec = spec_of(**BASIC)
    runs = expand(spec)
    root = tmp_path / "runs"

    def at(i, record=None, checkpoint=False, other=None):
        directory = root / "demo" / runs[i].name
        directory.mkdir(parents=True)
        if record is not None:
            write_record(directory, record)
        if checkpoint:
            (directory / "checkpoints").mkdir()
            (directory / "checkpoints" / "last.ckpt").write_text("x")
        if other:
            (directory / other).write_text("x")
        return plan(spec, runs[i], root)

    assert plan(spec, runs[0], root).status == "pending"
    assert plan(spec, runs[0], root).stages == ("fit", "test")
    assert at(1, _record(spec, runs[1], complete=True, done=["fit", "test"])).status == "complete"
    changed = _record(spec, runs[2], complete=True, done=["fit", "test"])
    changed["args"] = changed["args"] + ["--trainer.max_steps=9"]
    assert at(2, changed).status == "changed"
    assert plan(spec, runs[2], root, rerun_changed=True).status == "restart"
    interrupted = at(3, _record(spec, runs[3], status="interrupted"), checkpoint=True)
    assert (interrupted.status, interrupted.stages) == ("resume", ("fit", "test"))
    assert interrupted.resume_from == root / "demo" / runs[3].name / "checkpoints" / "last.ckpt"
    crashed = at(4, _record(spec, runs[4], status="failed"))
    assert (crashed.status, crashed.resume_from) == ("restart", None)
    test_failed = at(5, _record(spec, runs[5], status="failed", done=["fit"]), checkpoint=True)
    assert (test_failed.status, test_failed.stages, test_failed.resume_from) == ("resume", ("test",), None)
    assert at(6, None, other="events.out.tfevents.x").status == "blocked"
    alive = _record(spec, runs[7], status="running", pid=os.getppid(), host=socket.gethostname())
    assert at(7, alive).status == "running"
    write_record(root / "demo" / runs[7].name, {**alive, "pid": 2**22 + 12345})  # no such process
    assert plan(spec, runs[7], root).status == "restart"


# -- running (a stub stands in for the training process) ------------------------------------
@pytest.fixture
def stub(tmp_path, monkeypatch):
    script = tmp_path / "stub.py"
    script.write_text(STUB)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("STUB_CALLS", str(calls))
    monkeypatch.chdir(tmp_path)
    for name in ("STUB_FAIL", "STUB_SLEEP", "STUB_NO_CHECKPOINT", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)

    def read_calls():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return [sys.executable, str(script)], read_calls


def write_sweep(path: Path, sweep: dict) -> Path:
    path.write_text(json.dumps({"sweep": sweep}))  # JSON is YAML
    return path


def run_sweep(entry, *argv):
    out = io.StringIO()
    code = sweep_main([*argv, "--quiet"], entry=entry, out=out)
    return code, out.getvalue()


def test_sweep_runs_every_stage_then_skips_complete_runs(tmp_path, stub):
    entry, calls = stub
    path = write_sweep(tmp_path / "s.yaml", {"name": "demo", **BASIC})
    code, out = run_sweep(entry, str(path), "--jobs", "2")
    assert code == 0, out
    assert sorted((c["run"], c["stage"]) for c in calls()) == sorted(
        (r.name, s) for r in expand(spec_of(**BASIC)) for s in ("fit", "test")
    )
    assert "8 runs (8 pending)" in out and "8 ran, 0 skipped, 0 failed" in out
    assert out.count(" done    ") == 8
    assert {c["env"]["OMP_NUM_THREADS"] for c in calls()} == {str(max(1, (os.cpu_count() or 1) // 2))}
    record = read_record(tmp_path / "runs" / "demo" / "norm=batch,lr=0.5,seed=1")
    assert record["complete"] and record["status"] == "complete" and record["done"] == ["fit", "test"]
    assert record["values"] == {"model.init_args.norm": "batch", "model.init_args.lr": 0.5, "seed_everything": 1}
    assert record["axes"] == {"model.init_args.norm": "norm", "model.init_args.lr": "lr", "seed_everything": "seed"}
    assert [h["command"].split()[3] for h in record["history"]] == ["fit", "test"]
    assert record["history"][0]["command"].startswith("python -m lightning_bn fit ")
    assert record["sweep"]["command"] == f"python -m lightning_bn.sweep {path}"
    assert json.loads((tmp_path / "runs" / "demo" / "sweep.json").read_text())["axes"][0]["values"] == ["none", "batch"]

    n_calls = len(calls())
    code, out = run_sweep(entry, str(path))
    assert code == 0 and len(calls()) == n_calls
    assert "8 runs (8 complete)" in out


def test_crashed_run_is_retried_and_resumes_from_its_checkpoint(tmp_path, stub, monkeypatch):
    entry, calls = stub
    path = write_sweep(tmp_path / "s.yaml", {"name": "demo", **BASIC})
    monkeypatch.setenv("STUB_FAIL", "norm=batch,lr=0.5,seed=0:fit")
    code, out = run_sweep(entry, str(path))
    assert code == 1
    assert "FAILED  norm=batch,lr=0.5,seed=0: fit exited with status 3" in out
    assert "stub: failing fit of norm=batch,lr=0.5,seed=0 on purpose" in out  # the log's tail
    assert "7 ran, 0 skipped, 1 failed" in out
    crashed = tmp_path / "runs" / "demo" / "norm=batch,lr=0.5,seed=0"
    assert read_record(crashed)["status"] == "failed" and not read_record(crashed)["complete"]

    monkeypatch.delenv("STUB_FAIL")
    before = len(calls())
    code, out = run_sweep(entry, str(path))
    assert code == 0, out
    again = calls()[before:]
    assert [(c["run"], c["stage"]) for c in again] == [(crashed.name, "fit"), (crashed.name, "test")]
    assert again[0]["args"][-1] == f"--ckpt_path={Path('runs', 'demo', crashed.name, 'checkpoints', 'last.ckpt')}"
    record = read_record(crashed)
    assert record["complete"] and record["attempts"] == 2
    assert [h["returncode"] for h in record["history"]] == [3, 0, 0]  # every command that made the run


def test_crash_before_any_checkpoint_restarts_from_a_clean_directory(tmp_path, stub, monkeypatch):
    entry, calls = stub
    path = write_sweep(tmp_path / "s.yaml", {"name": "demo", "grid": {"model.init_args.lr": [0.1]}})
    monkeypatch.setenv("STUB_FAIL", "lr=0.1:fit")
    monkeypatch.setenv("STUB_NO_CHECKPOINT", "1")
    assert run_sweep(entry, str(path))[0] == 1
    run_dir = tmp_path / "runs" / "demo" / "lr=0.1"
    assert (run_dir / "fit.done").exists()  # what the crashed attempt left behind
    monkeypatch.delenv("STUB_FAIL")
    monkeypatch.setenv("STUB_SLEEP", "0")
    code, out = run_sweep(entry, str(path))
    assert code == 0 and "(restart: no checkpoint to resume from)" in out
    assert not any(a.startswith("--ckpt_path") for a in calls()[-1]["args"])
    assert (run_dir / "train.log").read_text().count("=== ") == 2  # the log keeps both attempts


def test_failed_test_stage_reruns_only_the_test(tmp_path, stub, monkeypatch):
    entry, calls = stub
    path = write_sweep(tmp_path / "s.yaml", {"name": "demo", "grid": {"model.init_args.lr": [0.1]}, "then": ["test"]})
    monkeypatch.setenv("STUB_FAIL", "lr=0.1:test")
    assert run_sweep(entry, str(path))[0] == 1
    monkeypatch.delenv("STUB_FAIL")
    assert run_sweep(entry, str(path))[0] == 0
    assert [c["stage"] for c in calls()] == ["fit", "test", "test"]


def test_interrupted_sweep_marks_the_run_interrupted_and_resumes_it(tmp_path, stub, monkeypatch):
    from lightning_bn.sweep import SweepRunner

    entry, calls = stub
    monkeypatch.setenv("STUB_SLEEP", "60")
    spec = spec_of(grid={"model.init_args.lr": [0.1]})
    run = expand(spec)[0]
    runner = SweepRunner(spec, "runs", entry=entry, out=io.StringIO())
    sleeping = tmp_path / "runs" / "demo" / "lr=0.1" / "sleeping"

    def interrupt_when_training():
        while not sleeping.exists():
            time.sleep(0.05)
        runner.interrupt()

    threading.Thread(target=interrupt_when_training, daemon=True).start()
    (outcome,) = runner.execute([plan(spec, run, "runs")])
    assert not outcome.ok
    assert read_record(sleeping.parent)["status"] == "interrupted"
    assert plan(spec, run, "runs").status == "resume"  # the stub wrote last.ckpt before sleeping


def test_list_dry_run_and_emit_commands(tmp_path, stub):
    entry, calls = stub
    path = write_sweep(tmp_path / "s.yaml", {"name": "demo", **BASIC})
    code, out = run_sweep(entry, str(path), "--only", "norm=none,lr=0.1,seed=0")
    assert code == 0
    code, listing = run_sweep(entry, str(path), "--list")
    lines = listing.splitlines()
    assert lines[0] == "0\tcomplete\tnorm=none,lr=0.1,seed=0" and lines[1] == "1\tpending\tnorm=none,lr=0.1,seed=1"
    code, emitted = run_sweep(entry, str(path), "--emit-commands", "--full", "--set", "trainer.max_steps=7")
    commands = emitted.splitlines()
    assert len(commands) == 8  # --full is another experiment directory: nothing complete there
    assert shlex.split(commands[1]) == [
        "python", "-m", "lightning_bn.sweep", str(path), "--full", "--set", "trainer.max_steps=7",
        "--only", "norm=none,lr=0.1,seed=1",
    ]  # fmt: skip
    code, dry = run_sweep(entry, str(path), "--dry-run", "--index", "1")
    assert dry.splitlines()[0] == "# norm=none,lr=0.1,seed=1: pending"
    assert [shlex.split(line)[3] for line in dry.splitlines()[1:]] == ["fit", "test"]
    assert len(calls()) == 2  # listing, emitting and dry runs start nothing


def test_parallel_jobs_get_their_own_gpus(tmp_path, stub):
    entry, calls = stub
    path = write_sweep(tmp_path / "s.yaml", {"name": "demo", "grid": {"model.init_args.lr": [0.1, 0.2, 0.3, 0.4]}})
    code, out = run_sweep(entry, str(path), "--jobs", "2", "--gpus-per-job", "2")
    assert code == 0, out
    assert {c["env"]["CUDA_VISIBLE_DEVICES"] for c in calls()} <= {"0,1", "2,3"}


def test_command_line_mistakes_exit_2(tmp_path, stub, capsys):
    entry, _ = stub
    path = write_sweep(tmp_path / "s.yaml", {"name": "demo", **BASIC})
    assert sweep_main([str(path), "--only", "nope"], entry=entry) == 2
    assert "--only 'nope' is not a run of demo" in capsys.readouterr().err
    assert sweep_main([str(path), "--index", "8"], entry=entry) == 2
    assert sweep_main([str(path), "--set", "novalue"], entry=entry) == 2
    assert sweep_main([str(path), "--jobs", "0"], entry=entry) == 2
    assert "jobs must be an integer >= 1, got 0" in capsys.readouterr().err


# -- the sweep files of the project ---------------------------------------------------------
def _covering(runs):
    """A few runs in which every value of every axis appears at least once (+ the last run)."""
    chosen, seen = [], set()
    for run in runs:
        pairs = {(k, json.dumps(v)) for k, v in run.values.items()}
        if not pairs <= seen:
            chosen.append(run)
            seen |= pairs
    return chosen + ([runs[-1]] if runs[-1] not in chosen else [])


def test_there_are_experiment_sweeps():
    assert len(EXPERIMENTS) >= 2


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
@pytest.mark.parametrize("full", [False, True], ids=["cpu", "full"])
def test_every_experiment_sweep_expands_into_runs_lightningcli_accepts(path, full, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # base_config paths are relative to the project root
    monkeypatch.setattr(sys, "argv", ["lightning_bn"])
    spec = load_sweep(path.relative_to(ROOT), full=full)
    runs = expand(spec)
    assert runs and spec.description
    # Every CPU-scale run is instantiated; at paper scale (big models) every grid value once.
    for run in runs if not full else _covering(runs):
        args = stage_args(spec, run, spec.command, tmp_path / "runs")
        cli = cli_main(args[1:], run=False)  # run=False takes the arguments without the subcommand
        assert cli.trainer.logger.log_dir == str(tmp_path / "runs" / spec.experiment / run.name)
        assert any(type(c).__name__ == "ModelCheckpoint" and c.save_last for c in cli.trainer.callbacks)
        for key, value in run.options.items():
            if key.startswith("model.init_args.") and key.count(".") == 2:
                assert cli.model.hparams[key.rsplit(".", 1)[1]] == value
        for stage in spec.then:  # without a subcommand there is no --ckpt_path to give
            args = [a for a in stage_args(spec, run, stage, tmp_path / "runs")[1:] if not a.startswith("--ckpt_path")]
            assert cli_main(args, run=False).trainer.logger.sub_dir == stage


# -- one real run -----------------------------------------------------------------------------
@pytest.mark.slow
def test_real_two_batch_sweep_trains_tests_resumes_and_reports(tmp_path, monkeypatch):
    from lightning_bn.report import build_report

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning_bn"])
    runs_root = tmp_path / "runs"
    sweep = {
        "name": "tiny",
        "base_config": "configs/quickstart.yaml",
        "then": ["test"],
        "grid": {"model.init_args.norm": ["batch"]},
        "overrides": {
            "model.init_args.width": 0.0625,
            "data.init_args.batch_size": 8,
            "trainer.max_epochs": 1,
            "trainer.limit_train_batches": 2,
            "trainer.limit_val_batches": 1,
            "trainer.limit_test_batches": 1,
            "trainer.log_every_n_steps": 1,
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
        },
    }
    path = write_sweep(tmp_path / "tiny.yaml", sweep)
    code, out = run_sweep([sys.executable, "-m", "lightning_bn"], str(path), "--runs-root", str(runs_root))
    run_dir = runs_root / "tiny" / "norm=batch"
    assert code == 0, out + (run_dir / "train.log").read_text()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    assert read_events_tags(run_dir) >= {"train/loss", "val/acc"}
    assert "test/acc" in read_events_tags(run_dir / "test")
    assert read_record(run_dir)["complete"]

    # Interrupted after the checkpoint: the resume command the sweep would run is accepted by
    # Lightning and restores the checkpoint (in-process here, to spare a third process start).
    spec = load_sweep(path)
    write_record(run_dir, {**read_record(run_dir), "complete": False, "status": "interrupted", "done": []})
    resume = plan(spec, expand(spec)[0], runs_root)
    assert (resume.status, resume.resume_from) == ("resume", run_dir / "checkpoints" / "last.ckpt")
    cli = cli_main(stage_args(spec, resume.run, "fit", runs_root, resume.resume_from))
    assert cli.trainer.ckpt_path == str(resume.resume_from) and cli.trainer.global_step == 2

    text = build_report(runs_root, tmp_path / "report").read_text()
    assert "## tiny" in text and "python -m lightning_bn fit" in text and "python -m lightning_bn test" in text
    # the run is still marked interrupted (we resumed it by hand): the table says so
    row = r"\| norm=batch \| interrupted \| [\d.]+ \| [\d.]+% \| [\d.]+% \| [\d.]+% \| [\d.]+% \|"
    assert re.search(row, text)


def read_events_tags(directory: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return set(acc.Tags()["scalars"])
