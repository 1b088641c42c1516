"""Train one experiment: ``python -m experiments.run --config experiments/configs/<name>.yaml``.

Any key is overridable on the command line (``--trainer.max_steps 50 --data.mask_ratio 0.2``);
``--print_config`` shows the resolved config. A run writes ``runs/<experiment>/version_<n>/``:
``config.yaml``, TensorBoard events, ``checkpoints/`` (last + best), ``hf_model/`` and
``metrics.json``. ``--ckpt_path <run dir>/checkpoints/last.ckpt`` (or ``last``) resumes a run
into its own directory.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from callbacks import (
    ExportCallback,
    MaskRatioLogger,
    TokenThroughputMonitor,
    update_metrics_json,
)
from callbacks.export import scalar_metrics
from callbacks.policy_driver import compatibility_errors
from core.errors import ConfigError, MasklabError
from lightning_modules import LanguageModelModule

# Our sampler skips the batches an interrupted epoch consumed (see ResumableSampler), so
# Lightning's warning that a mid-epoch resume is unreliable does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

TRAINER_DEFAULTS = Path(__file__).parent / "configs" / "trainers" / "default.yaml"
RUN_VERSION_ENV = "MASKLAB_RUN_VERSION"  # hands the run dir chosen by rank 0 to the DDP workers it launches


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as `config.yaml`; a resumed run adds `config.resume-<k>.yaml`
    beside it instead of overwriting the original."""

    def setup(self, trainer, pl_module, stage) -> None:
        if not self.already_saved and trainer.log_dir and (Path(trainer.log_dir) / self.config_filename).exists():
            resumes = len(list(Path(trainer.log_dir).glob("config.resume-*.yaml")))
            self.config_filename = f"config.resume-{resumes + 1}.yaml"
        super().setup(trainer, pl_module, stage)


def resolve_run(runs_dir: Path, experiment: str, ckpt_path: str | None) -> tuple[int | None, str | None]:
    """The version directory this run logs into, and the checkpoint to resume from. None on the
    ranks > 0 of a run started by an external launcher (torchrun, SLURM's srun): rank 0 claims the
    directory and the trainer hands it to the others (`trainer.log_dir` is a broadcast)."""
    root = runs_dir / experiment
    if ckpt_path == "last":
        candidates = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ConfigError(f"ckpt_path=last: no {root}/version_*/checkpoints/last.ckpt to resume from")
        ckpt_path = str(candidates[-1])
    if ckpt_path:
        ckpt = Path(ckpt_path)
        if not ckpt.is_file():
            raise ConfigError(f"ckpt_path: {ckpt_path!r} is not a checkpoint file")
        version_dir = ckpt.resolve().parent.parent
        if version_dir.name.startswith("version_") and version_dir.parent == root.resolve():
            return int(version_dir.name.removeprefix("version_")), ckpt_path
    if RUN_VERSION_ENV in os.environ:
        return int(os.environ[RUN_VERSION_ENV]), ckpt_path
    if rank_zero_only.rank != 0:  # read by Lightning from the launcher's RANK / SLURM_PROCID
        return None, ckpt_path
    root.mkdir(parents=True, exist_ok=True)
    version = 0
    while True:  # mkdir claims the number, so two runs started together never share a directory
        try:
            (root / f"version_{version}").mkdir()
            return version, ckpt_path
        except FileExistsError:
            version += 1


class MasklabCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--experiment",
            type=str | None,
            default=None,
            help="Run name: runs go to <runs_dir>/<experiment>/version_<n>. Default: the config file's name.",
        )
        parser.add_argument("--runs_dir", type=str, default="runs", help="Folder holding every experiment's runs.")
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Resume from this checkpoint, or 'last': the newest last.ckpt of this experiment.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(TokenThroughputMonitor, "throughput")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-step{step}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,  # a resumed run rolls last.ckpt forward, not last-v1.ckpt
            }
        )
        parser.link_arguments("data.init_args.block_size", "model.init_args.block_size")
        parser.link_arguments(
            "data", "model.init_args.vocab", compute_fn=lambda data: data.model_vocab, apply_on="instantiate"
        )

    def before_instantiate_classes(self) -> None:
        config = self.config
        module_name, class_name = config.data.class_path.rsplit(".", 1)
        data_class = getattr(importlib.import_module(module_name), class_name)
        if errors := getattr(data_class, "config_errors", lambda **_: [])(**config.data.init_args):
            raise ConfigError(errors)
        if config.experiment is None:
            config_files = config.get("config") or []
            config.experiment = Path(str(config_files[0])).stem if config_files else "default"
        self.run_version, config.ckpt_path = resolve_run(Path(config.runs_dir), config.experiment, config.ckpt_path)
        self.run_dir = Path(config.runs_dir) / config.experiment / f"version_{self.run_version}"

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception:
            self.release_run_dir()
            raise

    def release_run_dir(self) -> None:
        """Give back the version directory of a run that failed before writing anything."""
        if self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()

    def instantiate_trainer(self, **kwargs):
        if self._get(self.config_init, "trainer", default={}).get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(
                self.config.runs_dir, name=self.config.experiment, version=self.run_version, default_hp_metric=False
            )
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as err:  # e.g. a strategy this machine cannot run
            raise ConfigError(f"trainer: {err}") from err


def masklab_cause(err: BaseException | None) -> MasklabError | None:
    """Our own error behind `err` (jsonargparse wraps what a class raises while instantiating)."""
    while err is not None and not isinstance(err, MasklabError):
        err = err.__cause__ or err.__context__
    return err


def main(args: list[str] | None = None) -> MasklabCLI:
    # Tiny values in AdamW states and gradients turn into denormal floats, which x86 CPUs compute
    # up to 10x slower; flushing them to zero keeps CPU training at full speed (no effect on GPU).
    torch.set_flush_denormal(True)
    claimed_version = RUN_VERSION_ENV not in os.environ
    try:
        cli = MasklabCLI(
            LanguageModelModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            seed_everything_default=0,
            auto_configure_optimizers=False,  # the module's OptimizerConfig is the one optimiser setting
            trainer_defaults={
                "callbacks": [
                    LearningRateMonitor(logging_interval="step"),
                    MaskRatioLogger(),
                    ExportCallback(),
                ]
            },
            parser_kwargs={"default_config_files": [str(TRAINER_DEFAULTS)]},  # what every experiment starts from
            run=False,
            args=args,
        )
        if errors := compatibility_errors(cli.model, cli.datamodule, cli.trainer.callbacks):
            cli.release_run_dir()
            raise ConfigError(errors)
        if cli.run_version is not None:
            os.environ[RUN_VERSION_ENV] = str(cli.run_version)
        trainer = cli.trainer
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
        final = trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        run_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.is_global_zero and final:
            metrics = update_metrics_json(Path(run_dir) / "metrics.json", scalar_metrics(final[0]))
            print(f"run dir: {run_dir}\nfinal: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        return cli
    except Exception as err:
        cause = masklab_cause(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
    finally:
        if claimed_version:
            os.environ.pop(RUN_VERSION_ENV, None)


if __name__ == "__main__":
    main()
