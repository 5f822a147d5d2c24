"""Sweep launchers (issue 15): local, SLURM through submitit, Ray.

Every launcher passes the same behaviour test on a 2-run stub sweep: one run fails and the
other is interrupted (Ctrl-C), a rerun resumes both from ``last.ckpt``, and a third run skips
both. SLURM runs through submitit's local executor (real subprocesses, the task code of a
cluster); the SLURM-only part (the sbatch script, the array, ``--list`` from sacct) is checked
against fake ``sbatch``/``squeue``/``sacct`` programs on PATH. The signal path (USR2, the
warning SLURM sends before a time limit or on preemption) is tested on a real local task.
Ray runs on a local cluster with 2 CPUs (slow; skipped when ray is not installed).
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from lightning_bn.errors import ConfigError
from lightning_bn.sweep import build_spec
from lightning_bn.sweep.__main__ import main as sweep_main
from lightning_bn.sweep.options import split_launcher_args
from lightning_bn.sweep.state import read_record
from tests.test_sweep import write_sweep

# Stands in for `python -m lightning_bn`: records each call, writes last.ckpt in fit, can fail,
# or sleep until interrupted (never when resuming), and notes the signal that stopped it.
STUB = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path

    args = sys.argv[1:]
    stage = args[0]
    options = dict(a[2:].split("=", 1) for a in args[1:] if a.startswith("--") and "=" in a)
    run_dir = Path(options["trainer.logger.init_args.save_dir"], options["trainer.logger.init_args.name"],
                   options["trainer.logger.init_args.version"])
    with open(os.environ["STUB_CALLS"], "a") as calls:
        calls.write(json.dumps({"stage": stage, "run": run_dir.name, "args": args}) + "\\n")
    out_dir = run_dir / options.get("trainer.logger.init_args.sub_dir", "")
    out_dir.mkdir(parents=True, exist_ok=True)
    if stage == "fit":
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / "last.ckpt").write_text("stub checkpoint")
    resuming = any(a.startswith("--ckpt_path") for a in args) and stage == "fit"
    if os.environ.get("STUB_FAIL") and os.environ["STUB_FAIL"] in run_dir.name and not resuming:
        print(f"stub: failing {stage} of {run_dir.name} on purpose")
        sys.exit(3)
    if os.environ.get("STUB_SLEEP") and os.environ["STUB_SLEEP"] in run_dir.name and not resuming:
        (run_dir / "sleeping").write_text(str(os.getpid()))
        try:
            time.sleep(60)
        except KeyboardInterrupt:  # Lightning stops the same way on SIGINT
            (run_dir / "stopped-by-sigint").write_text("")
            sys.exit(130)
    print(f"stub: {stage} of {run_dir.name} ok")
    """
)
GRID = {"name": "demo", "grid": {"model.init_args.lr": [0.1, 0.2]}, "overrides": {"trainer.max_steps": 5}}
LAUNCHERS = {
    "local": [],
    "slurm-local": ["--launcher", "slurm", "--slurm.cluster", "local"],
    "ray": ["--launcher", "ray", "--ray.num_cpus", "2", "--ray.cpus_per_run", "1"],
}


@pytest.fixture(autouse=True)
def _restore_sigint():
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def stub(tmp_path, monkeypatch):
    script = tmp_path / "stub.py"
    script.write_text(STUB)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("STUB_CALLS", str(calls))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    for name in ("STUB_FAIL", "STUB_SLEEP"):
        monkeypatch.delenv(name, raising=False)

    def read_calls():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return [sys.executable, str(script)], read_calls


def run_sweep(entry, *argv):
    out = io.StringIO()
    try:
        code = sweep_main([*argv, "--quiet"], entry=entry, out=out)
    except SystemExit as exit_info:  # argparse's mistakes end the command line
        code = exit_info.code
    return code, out.getvalue()


def interrupt_when(condition, timeout: float = 120.0) -> threading.Thread:
    """Ctrl-C (KeyboardInterrupt in the main thread) once ``condition()`` holds. Python's own
    SIGINT handler is installed first: a test run in the background inherits SIGINT ignored,
    and then neither ``interrupt_main`` nor the trainings would see Ctrl-C."""
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def watch():
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.1)
        # a real SIGINT to the main thread, as Ctrl-C: it wakes a blocking wait (interrupt_main would not)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# -- the same behaviour for every launcher -------------------------------------------------------------
@pytest.mark.parametrize(
    "launcher",
    ["local", "slurm-local", pytest.param("ray", marks=pytest.mark.slow)],
)
def test_two_run_sweep_fails_one_is_interrupted_resumes_both_then_skips_both(launcher, tmp_path, stub, monkeypatch):
    if launcher == "slurm-local":
        pytest.importorskip("submitit", reason="the slurm extra is not installed")
    if launcher == "ray":
        pytest.importorskip("ray", reason="the ray extra is not installed")
    entry, calls = stub
    path = write_sweep(tmp_path / "s.yaml", GRID)
    runs = tmp_path / "runs" / "demo"
    failing, sleeping = runs / "lr=0.1", runs / "lr=0.2"
    monkeypatch.setenv("STUB_FAIL", "lr=0.1")
    monkeypatch.setenv("STUB_SLEEP", "lr=0.2")

    def failed_and_sleeping():
        return (sleeping / "sleeping").exists() and (read_record(failing) or {}).get("status") == "failed"

    watcher = interrupt_when(failed_and_sleeping)
    code, out = run_sweep(entry, str(path), *LAUNCHERS[launcher])
    watcher.join()
    assert code == 130, out
    assert (sleeping / "stopped-by-sigint").exists()  # the training was stopped cleanly, by SIGINT
    assert read_record(sleeping)["status"] == "interrupted", out
    assert read_record(failing)["status"] == "failed"  # one run's failure did not stop the other

    code, out = run_sweep(entry, str(path), *LAUNCHERS[launcher])
    assert code == 0, out
    resumed = [c for c in calls() if any(a.startswith("--ckpt_path=") for a in c["args"])]
    assert sorted(c["run"] for c in resumed) == ["lr=0.1", "lr=0.2"]  # both resumed from last.ckpt
    assert all(c["args"][-1] == f"--ckpt_path={Path('runs/demo', c['run'], 'checkpoints/last.ckpt')}" for c in resumed)
    for run in (failing, sleeping):
        record = read_record(run)
        assert record["complete"] and record["attempts"] == 2
        assert record.get("launcher", {}).get("name") == {"local": None, "slurm-local": "slurm", "ray": "ray"}[launcher]

    before = len(calls())
    code, out = run_sweep(entry, str(path), *LAUNCHERS[launcher])
    assert code == 0 and len(calls()) == before, out
    assert "2 runs (2 complete)" in out


# -- SLURM: the signal path on a real (local) task -----------------------------------------------------
def test_slurm_warning_signal_requeues_the_task_which_resumes_from_last_ckpt(tmp_path, stub, monkeypatch):
    pytest.importorskip("submitit", reason="the slurm extra is not installed")
    entry, calls = stub
    path = write_sweep(tmp_path / "s.yaml", {**GRID, "grid": {"model.init_args.lr": [0.1]}})
    run = tmp_path / "runs" / "demo" / "lr=0.1"
    monkeypatch.setenv("STUB_SLEEP", "lr=0.1")

    def signal_like_slurm():  # SLURM's --signal=USR2@N reaches every process of the job step
        deadline = time.monotonic() + 120
        while not (run / "sleeping").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(int((run / "sleeping").read_text()), signal.SIGUSR2)  # the training ignores it...
        os.kill(read_record(run)["pid"], signal.SIGUSR2)  # ...the task's submitit handler requeues

    threading.Thread(target=signal_like_slurm, daemon=True).start()
    code, out = run_sweep(entry, str(path), "--launcher", "slurm", "--slurm.cluster", "local")
    assert code == 0, out + "".join(p.read_text() for p in (tmp_path / "runs" / "demo" / ".submitit").glob("*.out"))
    fits = [c for c in calls() if c["stage"] == "fit"]
    assert len(fits) == 2 and not any(a.startswith("--ckpt_path") for a in fits[0]["args"])
    assert fits[1]["args"][-1] == f"--ckpt_path={Path('runs/demo/lr=0.1/checkpoints/last.ckpt')}"
    assert (run / "stopped-by-sigint").exists()  # stopped by the task (SIGINT), not killed by USR2
    record = read_record(run)
    assert record["complete"] and record["attempts"] == 2
    assert [h["returncode"] for h in record["history"]] == [130, 0]
    logs = "".join(p.read_text() for p in (tmp_path / "runs" / "demo" / ".submitit").glob("*.out"))
    assert "requeued; it resumes from its last checkpoint" in logs


# -- SLURM: the submission, against fake sbatch/squeue/sacct ------------------------------------------
FAKE_SBATCH = """#!/bin/sh
n=$(ls "$FAKE_SLURM"/submitted-*.sh 2>/dev/null | wc -l)
cp "$1" "$FAKE_SLURM/submitted-$n.sh"
echo "Submitted batch job 424$n"
"""
FAKE_SQUEUE = "#!/bin/sh\nexit 0\n"
FAKE_SACCT = """#!/bin/sh
echo "JobID|State|NodeList"
echo "4240_0|PENDING|None assigned"
echo "4240_1|RUNNING|node7"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="the slurm extra is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    programs = (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("sacct", FAKE_SACCT), ("srun", FAKE_SQUEUE))
    for name, text in programs:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(bin_dir))
    return lambda: sorted(bin_dir.glob("submitted-*.sh"))


def test_slurm_submits_one_job_array_with_the_requested_resources(tmp_path, stub, fake_slurm):
    entry, calls = stub
    sweep = {**GRID, "launcher": {"slurm": {"sbatch": ["--constraint=a100", "--exclusive"], "setup": "module load x"}}}
    path = write_sweep(tmp_path / "s.yaml", sweep)
    argv = [str(path), "--launcher", "slurm", "--slurm.partition", "gpu", "--slurm.time", "04:00:00",
            "--slurm.gpus_per_run=1", "--slurm.cpus_per_run", "8", "--slurm.mem_gb", "32", "--slurm.account", "acc",
            "--slurm.qos", "high", "--slurm.array_parallelism", "1"]  # fmt: skip
    code, out = run_sweep(entry, *argv)
    assert code == 0, out
    (script,) = fake_slurm()
    lines = set(script.read_text().splitlines())
    for expected in ("--array=0-1%1", "--partition=gpu", "--time=240", "--gpus-per-node=1", "--cpus-per-task=8",
                     "--mem=32GB", "--account=acc", "--qos=high", "--constraint=a100", "--exclusive",
                     "--signal=USR2@120", "--open-mode=append", "--nodes=1", "--ntasks-per-node=1",
                     "--job-name=sweep-demo"):  # fmt: skip
        assert f"#SBATCH {expected}" in lines, expected
    assert "module load x" in lines
    assert "submitted 2 runs to SLURM job array 4240" in out and "squeue -j 4240" in out
    assert calls() == []  # nothing ran here
    records = [read_record(tmp_path / "runs" / "demo" / name) for name in ("lr=0.1", "lr=0.2")]
    assert [(r["status"], r["launcher"]["job_id"]) for r in records] == [("queued", "4240_0"), ("queued", "4240_1")]

    code, listing = run_sweep(entry, str(path), "--list")  # states from sacct
    assert listing.splitlines() == ["0\tqueued\tlr=0.1", "1\trunning\tlr=0.2"]
    code, out = run_sweep(entry, *argv)  # held by SLURM: not submitted twice
    assert code == 0 and len(fake_slurm()) == 1
    assert "skipping lr=0.1: queued in SLURM" in out and "skipping lr=0.2: running in SLURM" in out


def test_slurm_ddp_runs_get_one_task_per_device_on_each_node(tmp_path, stub, fake_slurm):
    entry, _ = stub
    sweep = {**GRID, "overrides": {"trainer.devices": 4, "trainer.num_nodes": 2, "trainer.strategy": "ddp"}}
    code, out = run_sweep(entry, str(write_sweep(tmp_path / "s.yaml", sweep)), "--launcher", "slurm",
                          "--slurm.gpus_per_run", "4", "--slurm.cpus_per_run", "32")  # fmt: skip
    assert code == 0, out
    lines = set(fake_slurm()[0].read_text().splitlines())
    assert {"#SBATCH --ntasks-per-node=4", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4"} <= lines
    assert "#SBATCH --cpus-per-task=8" in lines


# -- options ------------------------------------------------------------------------------------------
def test_launcher_options_from_the_command_line_and_the_sweep_file():
    rest, found = split_launcher_args(["s.yaml", "--slurm.time", "90", "--slurm.partition=gpu", "--jobs", "2"])
    assert rest == ["s.yaml", "--jobs", "2"] and found == {"slurm": {"time": 90, "partition": "gpu"}}
    assert split_launcher_args(["--slurm.time", "1-00:00:00"])[1]["slurm"]["time"] == 1440
    spec = build_spec(
        {**GRID, "launcher": {"slurm": {"time": 30}}, "full": {"launcher": {"slurm": {"gpus_per_run": 1}}}},
        full=True,
        check_files=False,
    )
    assert spec.launcher == {"slurm": {"time": 30, "gpus_per_run": 1}}
    with pytest.raises(ConfigError, match=r"sweep.launcher.slurm.partiton: not an option .* did you mean 'partition'"):
        build_spec({**GRID, "launcher": {"slurm": {"partiton": "gpu"}}}, check_files=False)
    with pytest.raises(ConfigError, match="unknown launcher 'kube'"):
        build_spec({**GRID, "launcher": {"kube": {}}}, check_files=False)


# -- bad input: one line, exit 2, nothing submitted -------------------------------------------------------
BAD = [
    (["--launcher", "kube"], r"^error: argument --launcher: invalid choice: 'kube'"),
    (["--launcher", "slurm", "--slurm.partiton", "gpu"],
     r"^error: --slurm\.partiton: not an option of the slurm launcher; did you mean 'partition'\?"),
    (["--launcher", "slurm", "--slurm.time", "soon"], r"^error: --slurm\.time='soon' must be minutes"),
    (["--launcher", "slurm", "--slurm.partition"], r"^error: --slurm\.partition needs a value"),
    (["--slurm.partition", "gpu"], r"^error: --slurm\.\* options are given but the launcher is local"),
    (["--launcher", "slurm", "--jobs", "2"], r"^error: --jobs and --gpus-per-job are options of --launcher local"),
    (["--launcher", "slurm"], r"^error: --launcher slurm: SLURM is not reachable from here \(no sbatch on PATH\)"),
    (["--launcher", "ray", "--ray.address", "127.0.0.1:1"], r"^error: --ray.address 127.0.0.1:1: cannot connect"),
]  # fmt: skip


@pytest.mark.parametrize("argv, pattern", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_launcher_input_is_one_line_and_submits_nothing(argv, pattern, tmp_path, stub, monkeypatch, capsys):
    import re

    if "ray" in argv:
        pytest.importorskip("ray", reason="the ray extra is not installed")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no sbatch here
    entry, calls = stub
    path = write_sweep(tmp_path / "s.yaml", GRID)
    code, _ = run_sweep(entry, str(path), *argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert re.search(pattern, err[0]), err[0]
    assert calls() == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("launcher, module", [("slurm", "submitit"), ("ray", "ray")])
def test_missing_extra_names_the_pip_command(launcher, module, tmp_path, stub, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    entry, calls = stub
    code, _ = run_sweep(entry, str(write_sweep(tmp_path / "s.yaml", GRID)), "--launcher", launcher)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        f"error: --launcher {launcher} needs the {module} package: pip install 'lightning-bn[{launcher}]'"
    )
    assert calls() == [] and not (tmp_path / "runs").exists()


def test_runs_for_a_cluster_are_checked_without_this_machines_hardware(tmp_path):
    # `--launcher slurm ... --set trainer.accelerator=gpu` from a login node without a GPU: the
    # keys and values are still checked before anything is submitted, the missing GPU is not a mistake.
    from lightning_bn.sweep import expand, load_sweep
    from lightning_bn.sweep.__main__ import check_runs
    from lightning_bn.sweep.state import plan

    dln = str(Path(__file__).resolve().parents[1] / "configs" / "dln" / "none.yaml")
    path = write_sweep(tmp_path / "s.yaml", {"name": "gpu", "base_config": dln, "grid": {"seed_everything": [0]}})

    def check(*items: str, remote: bool) -> None:
        spec = load_sweep(path, extra_overrides=dict(item.split("=") for item in items))
        plans = [plan(spec, run, tmp_path / "runs") for run in expand(spec)]
        check_runs(spec, plans, tmp_path / "runs", set_items=items, remote=remote)

    check("trainer.accelerator=gpu", "trainer.devices=1", remote=True)
    with pytest.raises(ConfigError, match=r"^--set trainer\.max_epoch=1: .*did you mean 'trainer\.max_epochs'\?$"):
        check("trainer.accelerator=gpu", "trainer.max_epoch=1", remote=True)
    if not torch.cuda.is_available():  # on this machine the runs would need the GPU it lacks
        with pytest.raises(ConfigError, match=r"^run seed=0: trainer: .*gpu"):
            check("trainer.accelerator=gpu", "trainer.devices=1", remote=False)
