"""What TensorBoard shows first: a custom-scalars layout and the run's real hyperparameters.

:class:`TensorBoardSummary` (added to every run by ``train.py``) writes into the run's
TensorBoard log, once at the start of fit:

* a **Custom Scalars** layout: training curves first (loss, accuracy: train and validation in
  one chart), then Santurkar Fig. 4 per LandscapeCallback as native margin charts (the bands
  [loss_min, loss_max] and [grad_diff_min, grad_diff_max] shaded, beta and ||g|| as lines), ICS
  with every layer in one chart, activation drift, sharpness and Hessian values: only the
  categories the run's callbacks log;
* **HParams**: the model class and its constructor arguments, data module and batch size,
  optimizer with its learning rate, momentum and weight decay, seed, precision, devices and
  the training length, with train/val loss and accuracy as the metrics (TensorBoard reads
  their latest logged values). Lightning's own hyperparameter summary is switched off for the
  run (it carries LightningCLI's ``_instantiator`` and an ``hp_metric`` of -1); hparams.yaml is
  still written, with the model's arguments.

The session end (success or failure) is written when fit ends or raises. Without a
TensorBoardLogger the callback does nothing.
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams

METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")


def _tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def _plain(value: Any) -> int | float | str | bool:
    """A value TensorBoard's HParams can show (numbers, strings, booleans; the rest as text)."""
    return value if isinstance(value, bool | int | float | str) else str(value)


def run_hparams(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | float | str | bool]:
    """The hyperparameters that tell runs apart, as HParams shows them."""
    out: dict[str, Any] = {"model": type(pl_module).__name__}
    out.update({k: _plain(v) for k, v in pl_module.hparams_initial.items() if not k.startswith("_")})
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        out["data"] = type(datamodule).__name__
        if isinstance(getattr(datamodule, "batch_size", None), int):
            out["batch_size"] = datamodule.batch_size
    if trainer.optimizers:
        optimizer = trainer.optimizers[0]
        out["optimizer"] = type(optimizer).__name__
        group = optimizer.param_groups[0]
        for key in ("lr", "momentum", "weight_decay"):
            if key in group:
                out[f"optimizer.{key}"] = _plain(group.get("initial_lr", group[key]) if key == "lr" else group[key])
    seed = os.environ.get("PL_GLOBAL_SEED")
    out.update(
        seed=int(seed) if seed is not None and seed.lstrip("-").isdigit() else "none",
        precision=str(trainer.precision),
        devices=trainer.world_size,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        max_steps=trainer.max_steps,
        max_epochs=_plain(trainer.max_epochs),
    )
    return out


def _landscape_charts(suffix: str) -> dict[str, list[Any]]:
    tag = lambda name: f"landscape/{name}{suffix}"  # noqa: E731
    return {
        "loss band L(W - eta g) over eta": ["Margin", [tag("loss_min"), tag("loss_min"), tag("loss_max")]],
        "gradient change band": ["Margin", [tag("grad_diff_min"), tag("grad_diff_min"), tag("grad_diff_max")]],
        "effective beta-smoothness": ["Multiline", [tag("beta_smoothness")]],
        "gradient norm": ["Multiline", [tag("grad_norm")]],
    }


def layout_for(trainer: pl.Trainer) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout of the run's callbacks (category -> chart -> [kind, tags])."""
    from callbacks import (
        ActivationStatsCallback,
        HessianCallback,
        ICSCallback,
        KeskarSharpnessCallback,
        LandscapeCallback,
    )

    layout: dict[str, dict[str, list[Any]]] = {
        "1 training": {
            "loss": ["Multiline", ["train/loss", "val/loss"]],
            "accuracy": ["Multiline", ["train/acc", "val/acc"]],
        }
    }
    for callback in trainer.callbacks:
        if isinstance(callback, LandscapeCallback):
            suffix = callback.key_suffix
            layout[f"2 landscape{suffix} (Santurkar Fig. 4)"] = _landscape_charts(suffix)
        elif isinstance(callback, ICSCallback):
            layout["3 internal covariate shift (Def. 2.1)"] = {
                "||G - G'|| per layer": ["Multiline", [r"ics/.*/l2_diff"]],
                "cos(G, G') per layer": ["Multiline", [r"ics/.*/cosine"]],
            }
        elif isinstance(callback, ActivationStatsCallback):
            prefix = callback.prefix
            layout[f"4 {prefix} drift"] = {
                "drift of unit means": ["Multiline", [rf"{prefix}/.*/mean_drift"]],
                "drift of unit stds": ["Multiline", [rf"{prefix}/.*/std_drift"]],
            }
        elif isinstance(callback, KeskarSharpnessCallback | HessianCallback):
            layout["5 sharpness and Hessian"] = {
                "Keskar sharpness": ["Multiline", [r"sharpness/keskar_eps[^/]*"]],
                "Hessian": ["Multiline", [r"hessian/(top_eigenvalue|trace)"]],
            }
    return dict(sorted(layout.items()))  # the numbers order the categories: training curves first


def _failed_session() -> Any:
    """The session-end summary with status failure (torch's ``hparams`` only writes success)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_FAILURE),
        version=metadata.PLUGIN_DATA_VERSION,
    )
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    value = Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(plugin_data=plugin))
    return Summary(value=[value])


class TensorBoardSummary(pl.Callback):
    """Write the custom-scalars layout and the run's HParams (module docstring)."""

    def __init__(self) -> None:
        self._session_open = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and _tensorboard(trainer) is not None:
            # Lightning's own summary (flag read by pytorch_lightning.loggers.utilities) is
            # replaced by ours; the other loggers get the module's arguments from on_fit_start
            pl_module._log_hyperparams = False
            if trainer.datamodule is not None:
                trainer.datamodule._log_hyperparams = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = _tensorboard(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        arguments = {k: v for k, v in pl_module.hparams_initial.items() if not k.startswith("_")}
        for other in trainer.loggers:
            if other is not logger:
                other.log_hyperparams(arguments)
        logger.hparams.update(arguments)  # hparams.yaml, written by logger.save()
        writer = logger.experiment
        writer.add_custom_scalars(layout_for(trainer))
        experiment, start, self._end = hparams(run_hparams(trainer, pl_module), dict.fromkeys(METRICS, 0.0))
        file_writer = writer._get_file_writer()
        file_writer.add_summary(experiment)
        file_writer.add_summary(start)
        self._session_open = True

    def _close(self, trainer: pl.Trainer, status: str) -> None:
        logger = _tensorboard(trainer)
        if not self._session_open or logger is None:
            return
        logger.experiment._get_file_writer().add_summary(self._end if status == "success" else _failed_session())
        logger.experiment.flush()
        self._session_open = False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(trainer, "success")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close(trainer, "failure")
