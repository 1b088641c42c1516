"""Train one experiment: ``python -m experiments.run --config experiments/configs/<name>.yaml``.

Any key is overridable on the command line (``--trainer.max_steps 50 --data.mask_ratio 0.2``);
``--print_config`` shows the resolved config. A run writes ``runs/<experiment>/version_<n>/``:
``config.yaml``, TensorBoard events, ``checkpoints/`` (last + best), ``hf_model/`` and
``metrics.json``, and ``status.json`` (how the run ended). ``--ckpt_path last`` resumes the newest
unfinished run into its own directory; docs/reliability.md lists what each fault leaves behind.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from jsonargparse import ArgumentError, DefaultHelpFormatter
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

import experiments.quiet  # noqa: F401  (installs the filters of what a user cannot act on)
from callbacks import (
    ExportCallback,
    MaskRatioLogger,
    TokenThroughputMonitor,
    update_metrics_json,
)
from callbacks.export import scalar_metrics
from callbacks.fault_tolerance import InterruptCheckpoint, NonFiniteLossGuard
from callbacks.policy_driver import compatibility_errors
from callbacks.progress import ProgressLine
from core.errors import ConfigError, MasklabError
from datamodules.tokenizer import SPECIAL_TOKENS, default_to_init_tokenizer
from experiments.checkpoints import (
    checkpoint_callbacks,
    checkpoint_step,
    data_errors,
    model_errors,
    start_errors,
    use_checksums,
)
from experiments.cli_errors import config_args, parse_error
from experiments.run_dir import (
    FINISHED,
    RUN_VERSION_ENV,
    RunDirSnapshot,
    claim_run,
    find_checkpoint,
    write_status,
)
from experiments.run_lock import RunLock
from lightning_modules import LanguageModelModule

# Our sampler skips the batches an interrupted epoch consumed (see ResumableSampler), so
# Lightning's warning that a mid-epoch resume is unreliable does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

TRAINER_DEFAULTS = Path(__file__).parent / "configs" / "trainers" / "default.yaml"
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)  # a byte-level BPE holds every byte and masklab's special tokens
NOTHING_TO_KEEP = "interrupted before the first training step: nothing to keep"

HELP = """\
masklab: train one experiment from a config; any key below can be overridden on the command line:
  python -m experiments.run --config experiments/configs/quickstart.yaml --trainer.max_steps 50

masklab's keys most often changed:
  --data.masking CLASS          the masking policy, e.g. datamodules.MEAPInputMask, datamodules.RandomMLMMask
  --data.mask_ratio R           share of tokens the policy masks
  --data.block_size N           tokens per training sequence
  --data.batch_size N           sequences per batch
  --data.vocab_size N           BPE vocabulary trained on the corpus (>= 263)
  --data.data_path PATH         a text file or folder (default: the built-in offline corpus)
  --model.hidden_size N         also --model.num_layers N, --model.num_heads N
  --model.optimizer.lr LR       also --model.optimizer.warmup_steps N
  --trainer.max_steps N         also --trainer.val_check_interval N
  --ckpt_path last|DIR|FILE     resume the newest unfinished run, a run dir, or a checkpoint
  --threads N                   CPU threads (default: the cores not already busy)
  --progress.every_n_steps N    a progress line every N steps when stdout is not a terminal
  --experiment NAME, --runs_dir DIR   runs go to DIR/NAME/version_<n>/

Every key of a class, with its default and meaning:
  --data.help datamodules.PretrainingDataModule     (datamodules.FineTuneDataModule for SFT)
  --data.masking.help datamodules.MEAPInputMask     (any policy class; after --config)
  --model.help lightning_modules.CausalLMModule     (lightning_modules.MaskedLMModule for encoders)
docs/running.md explains them; Lightning's own flags (--trainer.*, --checkpoint.*) follow.
"""


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of the masklab section at the top of `--help`."""


def default_threads() -> int:
    """The cores this process may use, less those already busy (the 1-minute load average): PyTorch
    otherwise starts one thread per core, and on a busy machine its threads wait for each other."""
    return max(1, len(os.sched_getaffinity(0)) - round(os.getloadavg()[0]))


def set_threads(threads: int | None) -> None:
    """`--threads`, else OMP_NUM_THREADS when the user set it (PyTorch already follows it), else
    `default_threads()`."""
    if threads is None and "OMP_NUM_THREADS" in os.environ:
        return
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads or default_threads())
    if rank_zero_only.rank == 0:
        print(f"threads: {torch.get_num_threads()} of {os.cpu_count()} cores (--threads N to change)")


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as `config.yaml`; a resumed run adds `config.resume-<k>.yaml`
    beside it instead of overwriting the original."""

    def setup(self, trainer, pl_module, stage) -> None:
        if not self.already_saved and trainer.log_dir and (Path(trainer.log_dir) / self.config_filename).exists():
            resumes = len(list(Path(trainer.log_dir).glob("config.resume-*.yaml")))
            self.config_filename = f"config.resume-{resumes + 1}.yaml"
        super().setup(trainer, pl_module, stage)


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
            help="Resume from this checkpoint, a run dir (its checkpoints/last.ckpt), or 'last': the newest "
            "last.ckpt of an unfinished run of this experiment. A finished run's checkpoint starts a new run dir.",
        )
        parser.add_argument(
            "--allow_other_data",
            type=bool,
            default=False,
            help="Continue from a checkpoint although the data's tokenizer or corpus differs from the one it "
            "was trained on (e.g. continued pre-training on new text); without it such a start is refused.",
        )
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="CPU threads for PyTorch. Default: OMP_NUM_THREADS if set, else the cores not already busy.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(TokenThroughputMonitor, "throughput")
        parser.add_lightning_class_args(ProgressLine, "progress")
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
        default_to_init_tokenizer(config.data.get("init_args"), config.model.get("init_args"))
        errors = getattr(data_class, "config_errors", lambda **_: [])(**config.data.init_args)
        for key in ("max_steps", "max_epochs"):
            if config.trainer.get(key) == 0:
                errors.append(f"trainer.{key}=0 trains nothing: give a positive number (-1: no limit)")
        vocab_size = config.data.init_args.get("vocab_size")
        if vocab_size and not config.data.init_args.get("tokenizer_path") and vocab_size < MIN_BPE_VOCAB:
            errors.append(
                f"data.vocab_size={vocab_size} is below {MIN_BPE_VOCAB}, the smallest byte-level BPE "
                f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
        if errors:
            raise ConfigError(errors)
        set_threads(config.threads)
        if config.experiment is None:
            config_files = config.get("config") or []
            config.experiment = Path(str(config_files[0])).stem if config_files else "default"
        root = Path(config.runs_dir) / config.experiment
        ckpt_path, resume_dir = find_checkpoint(root, config.ckpt_path)
        max_steps = config.trainer.get("max_steps")
        if ckpt_path and (errors := start_errors(ckpt_path, config.model.class_path, max_steps, resume_dir is None)):
            raise ConfigError(errors)
        resolved = claim_run(root, ckpt_path, resume_dir)
        self.run_version, config.ckpt_path = resolved.version, resolved.ckpt_path
        self.run_dir = root / f"version_{self.run_version}"
        self.run_note = resolved.note if rank_zero_only.rank == 0 else None  # printed once every check passed
        self.snapshot = RunDirSnapshot.take(self.run_dir, resolved.claimed, resolved.made_from)
        # rank 0 of the launch holds the lock; the workers Lightning starts for DDP train in its run dir
        self.lock = RunLock(self.run_dir) if rank_zero_only.rank == 0 and RUN_VERSION_ENV not in os.environ else None

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            files = [TRAINER_DEFAULTS, *config_args(sys.argv[1:] if args is None else args)]
            raise ConfigError(parse_error(str(err), list(parser._option_string_actions), files)) from err

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException:  # Ctrl-C while the tokenizer trains, too
            self.release_run_dir()
            raise

    def release_run_dir(self) -> None:
        """Undo what a run that failed before its first training step wrote: a new version directory
        is removed (its number is free again), a resumed one is left as it was."""
        if rank_zero_only.rank == 0:
            self.snapshot.restore()
        self.release_lock()

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def instantiate_trainer(self, **kwargs):
        if self._get(self.config_init, "trainer", default={}).get("logger") in (None, True):
            # A resumed run hides what an earlier session logged after its checkpoint (a run killed at
            # step 160 that resumes from step 100 would otherwise show steps 100-159 twice).
            resumed_at = checkpoint_step(self.config.ckpt_path) if self.config.ckpt_path else None
            kwargs["logger"] = TensorBoardLogger(
                self.config.runs_dir,
                name=self.config.experiment,
                version=self.run_version,
                default_hp_metric=False,
                purge_step=resumed_at,
            )
        checkpoints = checkpoint_callbacks(self.config_init["checkpoint"], self.config.checkpoint.as_dict())
        self.config_init["checkpoint"] = checkpoints[0]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as err:  # e.g. a strategy this machine cannot run
            raise ConfigError(f"trainer: {err}") from err
        trainer.callbacks.extend(checkpoints[1:])
        use_checksums(trainer.strategy)
        return trainer


def masklab_cause(err: BaseException | None) -> MasklabError | None:
    """Our own error behind `err` (jsonargparse wraps what a class raises while instantiating)."""
    while err is not None and not isinstance(err, MasklabError):
        err = err.__cause__ or err.__context__
    return err


def build_cli(args: list[str] | None) -> MasklabCLI:
    """The CLI with its model, data and trainer. A Ctrl-C meanwhile (e.g. while the tokenizer
    trains) has left every run dir as it was (`instantiate_classes`): exit 130 with one line."""
    try:
        return MasklabCLI(
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
                    InterruptCheckpoint(),
                    NonFiniteLossGuard(),
                ]
            },
            parser_kwargs={
                "default_config_files": [str(TRAINER_DEFAULTS)],  # what every experiment starts from
                "exit_on_error": False,  # parse errors become one line below, not a usage dump
                "allow_abbrev": False,  # --trainer.max_step is a typo to report, not max_steps
                "usage": "python -m experiments.run --config CONFIG [--KEY VALUE ...]",
                "description": HELP,
                "formatter_class": HelpFormatter,
            },
            run=False,
            args=args,
        )
    except KeyboardInterrupt:
        print(NOTHING_TO_KEEP, file=sys.stderr)
        raise SystemExit(130) from None


def start_errors_after_instantiation(cli: MasklabCLI) -> list[str]:
    """What only the instantiated model, data and callbacks can tell: policy and model fit
    together, and the checkpoint fits the model and was trained on this data."""
    if errors := compatibility_errors(cli.model, cli.datamodule, cli.trainer.callbacks):
        return errors
    if not cli.config.ckpt_path:
        return []
    errors = [] if cli.config.allow_other_data else data_errors(cli.config.ckpt_path, cli.datamodule)
    return errors or model_errors(cli.config.ckpt_path, cli.model)


def main(args: list[str] | None = None) -> MasklabCLI:
    # Tiny values in AdamW states and gradients turn into denormal floats, which x86 CPUs compute
    # up to 10x slower; flushing them to zero keeps CPU training at full speed (no effect on GPU).
    torch.set_flush_denormal(True)
    claimed_version = RUN_VERSION_ENV not in os.environ
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C after an interrupt; give it back after
    cli = None
    try:
        cli = build_cli(args)
        if errors := start_errors_after_instantiation(cli):
            cli.release_run_dir()
            raise ConfigError(errors)
        if cli.run_note:
            print(cli.run_note)
        if cli.run_version is not None:
            os.environ[RUN_VERSION_ENV] = str(cli.run_version)
        trainer = cli.trainer
        fit(cli)
        final = trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        run_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.is_global_zero and final:
            metrics = update_metrics_json(Path(run_dir) / "metrics.json", scalar_metrics(final[0]))
            print(f"run dir: {run_dir}\nfinal: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        if trainer.is_global_zero:
            write_status(Path(run_dir), FINISHED, trainer.global_step)
        return cli
    except Exception as err:
        cause = masklab_cause(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(getattr(cause, "exit_code", 2))
    finally:
        if cli is not None:
            cli.release_lock()
        signal.signal(signal.SIGINT, sigint)
        if claimed_version:
            os.environ.pop(RUN_VERSION_ENV, None)


def fit(cli: MasklabCLI) -> None:
    """`trainer.fit`, recording in the run dir how it ended when it did not finish: a session that
    trained at least one step gets `status.json` (interrupted or failed, at which step); one that
    failed before that leaves the run dir as it found it."""
    trainer = cli.trainer
    try:
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    except BaseException as err:
        if not trainer.is_global_zero:
            raise
        guard = next(c for c in trainer.callbacks if isinstance(c, InterruptCheckpoint))
        # Lightning turns Ctrl-C into exit(1); DataLoader workers die of the same Ctrl-C and fail the next fetch
        interrupted = isinstance(err, (SystemExit, KeyboardInterrupt)) or guard.stop_requested
        if not guard.trained(trainer):
            cli.release_run_dir()
            if interrupted:
                print(NOTHING_TO_KEEP, file=sys.stderr)
                raise SystemExit(130) from None
            raise
        step = trainer.global_step
        message = "interrupted (Ctrl-C)" if interrupted else f"{type(err).__name__}: {err}".splitlines()[0]
        write_status(cli.run_dir, "interrupted" if interrupted else "failed", step, message)
        if interrupted:
            kept = f"saved {guard.ckpt_path}" if guard.saved_step == step else "no checkpoint saved at this step"
            print(f"interrupted at step {step}: {kept}; resume with --ckpt_path last", file=sys.stderr)
            raise SystemExit(130) from None
        raise


if __name__ == "__main__":
    main()
