"""Bad input, everywhere, one line (issue 16).

Every user mistake in an entry point (``train.py``, ``python -m lightning_bn.sweep``,
``python -m lightning_bn.report``, ``python -m lightning_bn.interpolate``) ends with exit
status 2 and exactly one line on stderr naming the option and the bad value, never a
traceback. The entry points run in-process (``main(argv)``); one subprocess checks the real
stderr of ``train.py`` (Lightning's own log lines included). Runs that fail late leave what
was there readable: the previous report is not half overwritten, a run directory still reads.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lightning_bn.cli import main as train_main
from lightning_bn.interpolate import main as interpolate_main
from lightning_bn.report.__main__ import main as report_main
from lightning_bn.sweep.__main__ import main as sweep_main

ROOT = Path(__file__).resolve().parents[1]
DLN = str(ROOT / "configs" / "dln" / "none.yaml")  # tiny deep linear net, synthetic data, builds fast
FIT = ["fit", "--config", DLN, "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"]

TWO_CALLBACKS = """\
trainer:
  callbacks:
    - class_path: callbacks.ActivationStatsCallback
      init_args: {every_n_steps: 5}
    - class_path: callbacks.ICSCallback
      init_args: {%s}
"""
ONE_CALLBACK = """\
trainer:
  callbacks:
    - class_path: %s
      init_args: {%s}
"""
SWEEP = f"""\
sweep:
  name: bad
  base_config: {DLN}
  grid:
    model.init_args.norm: %s
  overrides:
    trainer.max_epochs: 1
"""


@dataclass
class Case:
    id: str
    entry: str  # train, sweep, report, interpolate
    argv: list[str]  # "{tmp}" becomes the test's tmp_path
    pattern: str  # re.search in the single stderr line
    files: dict[str, str] = field(default_factory=dict)  # tmp-relative path -> content


def _callbacks(text: str) -> dict[str, str]:
    return {"callbacks.yaml": text}


CASES = [
    # -- train.py: files and keys ------------------------------------------------------------------
    Case("missing config file", "train", ["fit", "--config", "{tmp}/nope.yaml"],
         r"^error: --config: no such file \(got '.*nope\.yaml'; allowed: a YAML file\)$"),
    Case("config not YAML", "train", [*FIT, "--config", "{tmp}/bad.yaml"],
         r"^error: --config .*bad\.yaml: not valid YAML \(line 2, column 1: ", {"bad.yaml": "trainer: [1, 2\n"}),
    Case("unknown trainer key in YAML", "train", [*FIT, "--config", "{tmp}/c.yaml"],
         r"^error: trainer\.max_epocs: not an option; did you mean 'trainer\.max_epochs'\?$",
         {"c.yaml": "trainer:\n  max_epocs: 3\n"}),
    Case("unknown top-level key", "train", [*FIT, "--config", "{tmp}/c.yaml"], r"^error: foo: not an option",
         {"c.yaml": "foo: 1\n"}),
    Case("unknown option on the command line", "train", [*FIT, "--trainer.max_epocs", "3"],
         r"^error: trainer\.max_epocs: not an option; did you mean 'trainer\.max_epochs'\?$"),
    Case("unknown model argument", "train", [*FIT, "--config", "{tmp}/c.yaml"],
         r"^error: model\.init_args\.widht \(DeepLinearNet\): not an option; did you mean 'width'\? "
         r"\(options of lightning_bn\.DeepLinearNet: in_features, ",
         {"c.yaml": "model:\n  init_args:\n    widht: 3\n"}),
    # -- issue 17: misspellings get a suggestion in their section, and no abbreviations ----------------
    Case("abbreviated trainer option is refused", "train", [*FIT, "--trainer.max_epoch", "3"],
         r"^error: trainer\.max_epoch: not an option; did you mean 'trainer\.max_epochs'\?$"),
    Case("abbreviated option with =", "train", [*FIT, "--trainer.max_epoch=3"],
         r"^error: trainer\.max_epoch: not an option; did you mean 'trainer\.max_epochs'\?$"),
    Case("abbreviated top-level option is refused", "train", [*FIT, "--seed_every", "3"],
         r"^error: seed_every: not an option; did you mean 'seed_everything'\?$"),
    Case("option in the wrong section", "train", [*FIT, "--max_epochs", "3"],
         r"^error: max_epochs: not an option; did you mean 'trainer\.max_epochs'\?$"),
    Case("unknown trainer key is no misspelling of its section", "train", [*FIT, "--trainer.foo", "3"],
         r"^error: trainer\.foo: not an option \(check its spelling; "),
    Case("misspelled model key lrate in YAML", "train", [*FIT, "--config", "{tmp}/c.yaml"],
         r"^error: model\.init_args\.lrate \(DeepLinearNet\): not an option; did you mean 'lr'\? ",
         {"c.yaml": "model:\n  lrate: 0.1\n"}),
    Case("misspelled model key lrate on the command line", "train", [*FIT, "--model.lrate", "0.1"],
         r"^error: model\.init_args\.lrate \(DeepLinearNet\): not an option; did you mean 'lr'\? "),
    Case("misspelled model class", "train", [*FIT, "--model", "VGGG"],
         r"^error: model: expected a class name or import path, got 'VGGG'; did you mean 'lightning_bn\.VGG'\? "
         r"\(the project's models: lightning_bn\.VGG, lightning_bn\.DeepLinearNet, "),
    Case("unknown subcommand", "train", ["fitt", "--config", DLN], r"^error: .*invalid choice: 'fitt'"),
    Case("unresolved interpolation", "train", [*FIT, "--config", "{tmp}/c.yaml"],
         r"^error: model\.init_args\.lr: Interpolation key 'oops' not found$",
         {"c.yaml": "model:\n  init_args:\n    lr: ${oops}\n"}),
    # -- train.py: model -------------------------------------------------------------------------------
    Case("bad norm name", "train", [*FIT, "--model.init_args.norm", "foo"],
         r"^error: model\.init_args\.norm \(DeepLinearNet\): norm='foo' is not a known normalization; "
         r"choose one of: batch, none"),
    Case("negative lr (exponent)", "train", [*FIT, "--model.init_args.lr", "-1e-3"],
         r"^error: model\.init_args\.lr \(DeepLinearNet\): lr must be > 0, got -0\.001$"),
    Case("lr zero", "train", [*FIT, "--model.init_args.lr", "0"],
         r"^error: model\.init_args\.lr \(DeepLinearNet\): lr must be > 0, got 0$"),
    Case("lr not a number", "train", [*FIT, "--model.init_args.lr", "abc"],
         r"^error: model\.init_args\.lr \(DeepLinearNet\): expected a number, got 'abc'$"),
    Case("depth zero", "train", [*FIT, "--model.init_args.depth", "0"],
         r"^error: model\.init_args\.depth \(DeepLinearNet\): depth must be >= 1 .*got 0$"),
    Case("unknown model class", "train", [*FIT, "--model", "lightning_bn.Nope"],
         r"^error: model: Problem with given class_path 'lightning_bn\.Nope'"),
    Case("no model at all", "train", ["fit", "--trainer.max_epochs", "1"], r"^error: model: is required"),
    # -- train.py: data ---------------------------------------------------------------------------------
    Case("batch size zero", "train", [*FIT, "--data.init_args.batch_size", "0"],
         r"^error: data\.batch_size must be an integer in \[1, num_samples=1000\] or null .*got 0$"),
    Case("batch size not a number", "train", [*FIT, "--data.init_args.batch_size", "abc"],
         r"^error: data\.init_args\.batch_size \(GaussianRegressionDataModule\): expected an integer or null, "
         r"got 'abc'$"),
    # -- train.py: trainer, seed, optimizer, checkpoint ------------------------------------------------
    Case("max_epochs not a number", "train", [*FIT, "--trainer.max_epochs", "abc"],
         r"^error: trainer\.max_epochs: expected an integer or null, got 'abc'$"),
    Case("unknown accelerator", "train", [*FIT, "--trainer.accelerator", "tpu9"],
         r"^error: trainer\.accelerator: .*accelerator='tpu9'.*Available names are"),
    Case("bad precision", "train", [*FIT, "--trainer.precision", "13"],
         r"^error: trainer\.precision: expected one of 64, 32, 16 .*'bf16-mixed'.*, got 13$"),
    Case("zero devices", "train", [*FIT, "--trainer.devices", "0"], r"^error: trainer\.devices: .*devices='0'"),
    Case("seed not a number", "train", [*FIT, "--seed_everything", "abc"],
         r"^error: seed_everything: expected true or false or an integer, got 'abc'$"),
    Case("unknown optimizer", "train", [*FIT, "--optimizer", "Nope"],
         r"^error: optimizer: expected a class name or import path .*got 'Nope'$"),
    Case("scheduler without its argument", "train", [*FIT, "--lr_scheduler", "StepLR"],
         r"^error: lr_scheduler\.init_args\.step_size \(StepLR\): is required"),
    Case("missing checkpoint", "train", [*FIT, "--ckpt_path", "{tmp}/missing.ckpt"],
         r"^error: ckpt_path: no such checkpoint file \(got '.*missing\.ckpt'; allowed: a checkpoint file"),
    Case("not a checkpoint", "train", [*FIT, "--ckpt_path", "{tmp}/junk.ckpt"],
         r"^error: ckpt_path: cannot read '.*junk\.ckpt' as a checkpoint \(", {"junk.ckpt": "not a checkpoint"}),
    # -- train.py: callbacks (the issue: the second of two callbacks) ------------------------------------
    Case("callback every_n_steps 0", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[1\]\.init_args\.every_n_steps \(ICSCallback\): "
         r"must be an integer >= 1, got 0$", _callbacks(TWO_CALLBACKS % "every_n_steps: 0")),
    Case("callback every_n_steps not a number", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[1\]\.init_args\.every_n_steps \(ICSCallback\): expected an integer, "
         r"got 'abc'$", _callbacks(TWO_CALLBACKS % "every_n_steps: abc")),
    Case("callback argument misspelled", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[1\]\.init_args\.every_n_stepz \(ICSCallback\): not an option; "
         r"did you mean 'every_n_steps'\? \(options of callbacks\.ICSCallback: every_n_steps, layers, ",
         _callbacks(TWO_CALLBACKS % "every_n_stepz: 3")),
    Case("callback bn_mode", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[1\]\.init_args\.bn_mode \(ICSCallback\): expected one of 'train', 'eval', "
         r"got 'frozen'$", _callbacks(TWO_CALLBACKS % "bn_mode: frozen")),
    Case("callback layers empty", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[1\]\.init_args\.layers \(ICSCallback\): must be None or a non-empty list "
         r"of module names, got \[\]$", _callbacks(TWO_CALLBACKS % "layers: []")),
    Case("bad schedule: end before start", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[0\]\.init_args\.end_step \(ActivationStatsCallback\): must be an integer "
         r">= 10 \(start_step\), got 5$",
         _callbacks(ONE_CALLBACK % ("callbacks.ActivationStatsCallback", "start_step: 10, end_step: 5"))),
    Case("landscape multipliers, numbers with :g", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[0\]\.init_args\.lr_multipliers \(LandscapeCallback\): must be a non-empty "
         r"list of finite numbers > 0, got \[0\.0004, -1\]$",
         _callbacks(ONE_CALLBACK % ("callbacks.LandscapeCallback", "lr_multipliers: [0.0003999999999999993, -1]"))),
    Case("hessian measures nothing", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[0\]\.init_args\.trace \(HessianCallback\): must be True with top_k=0 .*"
         r"got False$", _callbacks(ONE_CALLBACK % ("callbacks.HessianCallback", "top_k: 0, trace: false"))),
    Case("sharpness without epsilons", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[0\]\.init_args\.epsilons \(KeskarSharpnessCallback\): .*got \[\]$",
         _callbacks(ONE_CALLBACK % ("callbacks.KeskarSharpnessCallback", "epsilons: []"))),
    Case("unknown callback class", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[0\]\.class_path: Problem with given class_path 'callbacks\.Nope'",
         {"callbacks.yaml": "trainer:\n  callbacks:\n    - class_path: callbacks.Nope\n"}),
    Case("misspelled callback class lists the known ones", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[1\]\.class_path: .*'callbacks\.LandscapeCallbak'.*; "
         r"did you mean 'callbacks\.LandscapeCallback'\? \(the project's callbacks: "
         r"callbacks\.ActivationStatsCallback, .*callbacks\.ICSCallback, .*; or Lightning's, e\.g\. ModelCheckpoint\)$",
         _callbacks(TWO_CALLBACKS.replace("callbacks.ICSCallback", "callbacks.LandscapeCallbak") % "")),
    Case("misspelled short callback class", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[1\]\.class_path: 'LandscapeCallbak' is not a class; "
         r"did you mean 'callbacks\.LandscapeCallback'\? \(the project's callbacks: ",
         _callbacks(TWO_CALLBACKS.replace("callbacks.ICSCallback", "LandscapeCallbak") % "")),
    Case("misspelled callback class on the command line", "train", [*FIT, "--trainer.callbacks+=ICSCallbak"],
         r"^error: trainer\.callbacks: 'ICSCallbak' is not a class; did you mean 'callbacks\.ICSCallback'\? "),
    Case("second of two callbacks of one class", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[1\]\.init_args\.every_n_steps \(ICSCallback\): "
         r"must be an integer >= 1, got 0$",
         _callbacks(TWO_CALLBACKS.replace("callbacks.ActivationStatsCallback", "callbacks.ICSCallback")
                    % "every_n_steps: 0")),
    Case("Lightning callback refuses a value", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[0\] \(ModelCheckpoint\): .*every_n_train_steps=-1",
         _callbacks(ONE_CALLBACK % ("pytorch_lightning.callbacks.ModelCheckpoint", "every_n_train_steps: -1"))),
    Case("callback from command-line flags", "train",
         [*FIT, "--trainer.callbacks+=callbacks.ICSCallback", "--trainer.callbacks.every_n_steps=0"],
         r"^error: trainer\.callbacks\[0\]\.init_args\.every_n_steps \(ICSCallback\): must be an integer >= 1, "
         r"got 0$"),
    Case("callback refused at setup (late)", "train", [*FIT, "--config", "{tmp}/callbacks.yaml"],
         r"^error: trainer\.callbacks\[0\] \(ICSCallback\): ICSCallback layers \['net\.99'\] are not modules",
         _callbacks(ONE_CALLBACK % ("callbacks.ICSCallback", "every_n_steps: 1, layers: [net.99]"))),
    # -- python -m lightning_bn.sweep ---------------------------------------------------------------------
    Case("sweep file missing", "sweep", ["{tmp}/nope.yaml"], r"^error: sweep file '.*nope\.yaml' not found$"),
    Case("sweep unknown key", "sweep", ["{tmp}/s.yaml"], r"^error: .*unknown key 'grdi'",
         {"s.yaml": "sweep:\n  name: x\n  grdi: {seed_everything: [0]}\n"}),
    Case("sweep --jobs 0", "sweep", ["{tmp}/s.yaml", "--jobs", "0"], r"^error: jobs must be an integer >= 1, got 0$",
         {"s.yaml": SWEEP % "[none]"}),
    Case("sweep --jobs not a number", "sweep", ["{tmp}/s.yaml", "--jobs", "two"],
         r"^error: argument -j/--jobs: invalid int value: 'two'", {"s.yaml": SWEEP % "[none]"}),
    Case("sweep --set without value", "sweep", ["{tmp}/s.yaml", "--set", "novalue"],
         r"^error: --set 'novalue': expected KEY=VALUE", {"s.yaml": SWEEP % "[none]"}),
    Case("sweep grid value the model refuses", "sweep", ["{tmp}/s.yaml", "--runs-root", "{tmp}/runs", "--quiet"],
         r"^error: run norm=foo: model\.init_args\.norm \(DeepLinearNet\): norm='foo' is not a known normalization",
         {"s.yaml": SWEEP % "[none, foo]"}),
    Case("sweep --set unknown key", "sweep", ["{tmp}/s.yaml", "--runs-root", "{tmp}/runs", "--quiet",
                                              "--set", "trainer.foo=3"],
         r"^error: --set trainer\.foo=3: trainer\.foo: not an option", {"s.yaml": SWEEP % "[none, batch]"}),
    Case("sweep --set abbreviation is refused", "sweep", ["{tmp}/s.yaml", "--runs-root", "{tmp}/runs", "--quiet",
                                                          "--set", "trainer.max_epoch=3"],
         r"^error: --set trainer\.max_epoch=3: trainer\.max_epoch: not an option; "
         r"did you mean 'trainer\.max_epochs'\?$", {"s.yaml": SWEEP % "[none, batch]"}),
    Case("sweep --set misspelled model key", "sweep", ["{tmp}/s.yaml", "--runs-root", "{tmp}/runs", "--quiet",
                                                       "--set", "model.lrate=0.1"],
         r"^error: --set model\.lrate=0\.1: model\.init_args\.lrate \(DeepLinearNet\): not an option; "
         r"did you mean 'lr'\?", {"s.yaml": SWEEP % "[none]"}),
    Case("sweep --set value the model refuses", "sweep", ["{tmp}/s.yaml", "--runs-root", "{tmp}/runs", "--quiet",
                                                          "--set", "model.init_args.lr=-1"],
         r"^error: --set model\.init_args\.lr=-1: model\.init_args\.lr \(DeepLinearNet\): lr must be > 0, got -1$",
         {"s.yaml": SWEEP % "[none]"}),
    # -- python -m lightning_bn.report --------------------------------------------------------------------
    Case("report runs dir missing", "report", ["{tmp}/missing"], r"^error: runs directory '.*missing' does not exist$"),
    Case("report --out is a file", "report", ["{tmp}", "--out", "{tmp}/file.txt"],
         r"^error: output directory '.*file\.txt' is a file, not a directory$", {"file.txt": "x"}),
    Case("report unknown flag", "report", ["{tmp}", "--outt", "x"], r"^error: unrecognized arguments: --outt x"),
    # -- python -m lightning_bn.interpolate ---------------------------------------------------------------
    Case("interpolate missing checkpoint", "interpolate", ["{tmp}/no.ckpt", "{tmp}/no2.ckpt", "--out", "{tmp}/o"],
         r"^error: checkpoint not found: .*no\.ckpt$"),
    Case("interpolate not a checkpoint", "interpolate", ["{tmp}/junk.ckpt", "{tmp}/junk.ckpt", "--out", "{tmp}/o"],
         r"^error: cannot read checkpoint .*junk\.ckpt", {"junk.ckpt": "not a checkpoint"}),
    Case("interpolate bad --bn", "interpolate", ["a.ckpt", "b.ckpt", "--bn", "freeze"],
         r"^error: argument --bn: invalid choice: 'freeze'"),
    Case("interpolate --alphas NUM 0", "interpolate", ["a.ckpt", "b.ckpt", "--alphas", "0", "1", "0"],
         r"^error: --alphas NUM must be a positive integer, got 0$"),
    Case("interpolate --max-batches not a number", "interpolate", ["a.ckpt", "b.ckpt", "--max-batches", "many"],
         r"^error: argument --max-batches: invalid int value: 'many'"),
    Case("interpolate config missing", "interpolate", ["a.ckpt", "b.ckpt", "--config", "{tmp}/nope.yaml"],
         r"^error: config not found: .*nope\.yaml$"),
]  # fmt: skip

ENTRIES = {"train": train_main, "sweep": sweep_main, "report": report_main, "interpolate": interpolate_main}


def _run(entry: str, argv: list[str]) -> int:
    """Exit status of an entry point called in-process (``main`` returns it or raises SystemExit)."""
    try:
        result = ENTRIES[entry](argv)
    except SystemExit as exit_info:
        return exit_info.code
    return result if isinstance(result, int) else 0


def test_there_are_many_bad_inputs():
    assert len(CASES) >= 30
    assert {c.entry for c in CASES} == set(ENTRIES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_option_and_value(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [case.entry])
    for name, content in case.files.items():
        (tmp_path / name).write_text(content)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
    code = _run(case.entry, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert re.search(case.pattern, lines[0]), lines[0]
    if case.entry == "sweep":
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


# -- the real stderr of train.py ------------------------------------------------------------------
def test_train_py_prints_the_one_line_and_nothing_else(tmp_path):
    (tmp_path / "callbacks.yaml").write_text(TWO_CALLBACKS % "every_n_steps: 0")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FIT, "--config", "callbacks.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "error: trainer.callbacks[1].init_args.every_n_steps (ICSCallback): must be an integer >= 1, got 0\n"
    )  # no "Seed set to 0", no GPU/TPU lines, no traceback


# -- failing late keeps what was there readable -------------------------------------------------------
def _write_run(run_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for step in range(3):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
        writer.add_scalar("val/acc", 0.5 + 0.1 * step, step)
    writer.close()


def test_report_that_fails_late_leaves_the_previous_report_whole(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    _write_run(runs / "demo" / "version_0")
    assert report_main([str(runs), "--out", str(out)]) == 0
    figures = sorted(out.rglob("*.png"))
    assert figures and (out / "report.md").is_file()
    (out / "report.md").write_text("previous report")
    for figure in figures:
        figure.write_bytes(b"previous figure")
    # The last figure's path is now a directory: found only once every figure is made.
    blocked = figures[-1]
    blocked.unlink()
    blocked.mkdir()
    capsys.readouterr()
    assert report_main([str(runs), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(r"^error: cannot write .*: it is a directory$", lines[0]), lines
    assert (out / "report.md").read_text() == "previous report"
    assert all(f.read_bytes() == b"previous figure" for f in figures[:-1])
    assert not list(out.glob(".report-staging-*"))  # no leftovers


def test_report_that_crashes_midway_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    from lightning_bn.report import build

    runs, out = tmp_path / "runs", tmp_path / "out"
    _write_run(runs / "demo" / "version_0")
    assert report_main([str(runs), "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(exp):
        raise RuntimeError("a figure maker fails after the others wrote their figures")

    monkeypatch.setattr(build, "FIGURE_MAKERS", (*build.FIGURE_MAKERS, crash))
    with pytest.raises(RuntimeError):
        report_main([str(runs), "--out", str(out)])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_training_that_fails_at_setup_leaves_the_run_directory_readable(tmp_path, monkeypatch, capsys):
    from lightning_bn.report.runs import discover

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    runs = tmp_path / "runs"
    short = [
        "fit", "--config", DLN, "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(runs), "--trainer.logger.init_args.name", "dln",
    ]  # fmt: skip
    cli = train_main(short)
    first = Path(cli.trainer.logger.log_dir)
    saved = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert (first / "config.yaml") in saved and any(p.name.startswith("events.out") for p in saved)
    (tmp_path / "callbacks.yaml").write_text(
        ONE_CALLBACK % ("callbacks.ICSCallback", "every_n_steps: 1, layers: [net.99]")
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_main([*short, "--config", "callbacks.yaml"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: trainer.callbacks[0] (ICSCallback): "), lines
    # The earlier run is untouched, and everything under runs/ still reads as runs.
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == saved
    # The failed run leaves no version directory of its own (it would be an empty run in the report).
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]
    found = {run.dir: run for exp in discover(runs) for run in exp.runs}
    assert list(found) == [first] and found[first].events.tags("train/")


def test_interpolate_writes_results_whole_or_not_at_all(tmp_path):
    from lightning_bn.interpolate import COLUMNS, write_csv

    path = write_csv([dict.fromkeys(COLUMNS, 0.5)], tmp_path / "out" / "interpolation.csv")
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert [p.name for p in path.parent.iterdir()] == ["interpolation.csv"]  # no temporary left
