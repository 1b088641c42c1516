"""Downstream evaluation suites on the model in training, so a run's dashboard shows them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules.tokenizer import vocab_of
from evaluation.model import LoadedModel
from evaluation.suites import options_for, run_suites, save_results


class EvaluationCallback(L.Callback):
    """Run `experiments.evaluate`'s suites at the end of `fit` (and every N steps if asked).

    Results are the same as evaluating the exported model afterwards: TensorBoard tags
    `eval/<suite>/<metric>` at the current step, plots and a report in `<run dir>/eval/`, and at
    the end of `fit` the metrics merged into `metrics.json`. Only rank zero evaluates.

    Args:
        suites: suite name -> its options, the keys of `--<suite>.*` in `experiments.evaluate`,
            e.g. `{needle: {lengths: [64, 128], samples: 2}, ppl: {}}`.
        every_n_steps: also evaluate every this many optimiser steps; None = only at the end of fit.
    """

    def __init__(self, suites: dict[str, dict[str, Any] | None], every_n_steps: int | None = None) -> None:
        self.options = {
            name: options_for(name, values) for name, values in suites.items()
        }  # a bad key fails before training
        self.every_n_steps = every_n_steps
        self._last: tuple[int, dict] | None = None  # (step, results) of the latest periodic evaluation
        self.run_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.run_dir = Path(trainer.log_dir)  # a collective under DDP: every rank asks here, rank zero uses it later

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = self.every_n_steps and step > 0 and step % self.every_n_steps == 0
        already = self._last is not None and self._last[0] == step  # gradient accumulation: several batches per step
        if due and not already and trainer.is_global_zero:
            self.evaluate(trainer, pl_module, final=False)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self._last is not None and self._last[0] == trainer.global_step:  # evaluated at this very step already
            save_results(self._last[1], self.run_dir / "eval", self.run_dir / "metrics.json")
        else:
            self.evaluate(trainer, pl_module, final=True)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        run_dir = self.run_dir
        datamodule = trainer.datamodule
        data = {
            "block_size": datamodule.block_size,
            "prompt_template": getattr(datamodule, "prompt_template", None),
            "builtin_variant": getattr(datamodule, "builtin_variant", None),
            "recall": dataclasses.asdict(datamodule.recall) if hasattr(datamodule, "recall") else None,
            "seed": getattr(datamodule, "seed", 0),
        }
        was_training = pl_module.training
        pl_module.eval()
        try:
            model = pl_module.export_model().eval()  # a copy for n-hot models: put it in eval mode too
            loaded = LoadedModel(
                model,
                datamodule.tokenizer,
                vocab_of(datamodule.tokenizer),
                pl_module.objective,
                run_config={"data": {"init_args": data}},
            )
            results = run_suites(loaded, self.options)
        finally:
            pl_module.train(was_training)
        self._last = (trainer.global_step, results)
        writer = trainer.logger.experiment if isinstance(trainer.logger, TensorBoardLogger) else None
        save_results(
            results, run_dir / "eval", run_dir / "metrics.json" if final else None, writer, trainer.global_step
        )
