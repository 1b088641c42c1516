"""What every objective shares: the training step, metrics, optimiser and checkpoint state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from transformers import PretrainedConfig, PreTrainedModel, get_cosine_with_min_lr_schedule_with_warmup

from core.batch import IGNORE_INDEX
from core.errors import ConfigError, raise_if_any
from lightning_modules.flops import flop_counts

# what a run's final validation writes to metrics.json as val/<name> (a study checks its metric names with it);
# unigram_*: the unigram predictor's scores on the same targets, the plateau a model starts from
VALIDATION_METRICS = ("loss", "ppl", "acc", "unigram_acc", "unigram_loss", "unigram_ppl")


class TargetCounts(Metric):
    """How often each token is a validation target (summed over processes): the unigram predictor's
    accuracy (the most frequent target's share) and loss (the targets' entropy), so that a plot can
    mark the level a model sits at before it learns anything beyond token frequencies."""

    full_state_update = False

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.add_state("counts", default=torch.zeros(vocab_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, targets: Tensor) -> None:
        self.counts += torch.bincount(targets, minlength=self.counts.numel())

    def compute(self) -> tuple[Tensor, Tensor]:
        shares = self.counts[self.counts > 0].double() / self.counts.sum().clamp_min(1)
        if not shares.numel():  # no target at all: NaN, as the loss is
            return torch.tensor(float("nan")), torch.tensor(float("nan"))
        return shares.max().float(), (-(shares * shares.log()).sum()).float()


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up and cosine decay.

    Args:
        lr: peak learning rate.
        min_lr_ratio: learning rate at the end of the cosine, as a share of `lr`.
        warmup_steps: optimiser steps of linear warm-up.
        weight_decay: decoupled weight decay of matrices (biases, norms and embeddings get none).
        betas: AdamW betas.
        eps: AdamW epsilon.
        fused: torch's fused AdamW kernel; None = fused when the parameters are on a GPU. Clips
            under any precision (`configure_gradient_clipping`).
    """

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    fused: bool | None = None

    def __post_init__(self) -> None:
        # torch would refuse it only when the optimiser is built, with a traceback, after the run dir is made
        if self.lr < 0:
            raise ConfigError(f"model.optimizer.lr must be >= 0, got {self.lr}")


@dataclass
class TokenStats:
    """Per-position results of a step, for callbacks that learn from them (AMLM difficulty,
    entropy masking). Positions line up with the labels they score; all tensors are detached."""

    labels: Tensor  # [B, L'] token to predict, -100 = none
    inputs: Tensor  # [B, L'] input token at the label's position (the [MASK] for MLM / MEAP)
    loss: Tensor  # [B, L'] float32 cross-entropy, 0 where unlabelled
    correct: Tensor  # [B, L'] bool, argmax == label
    entropy: Tensor | None  # [B, L'] float32 predictive entropy at labelled positions (0 elsewhere), when asked for


@dataclass
class HeadLoss:
    """The output head's results at the N labelled positions of a batch."""

    loss: Tensor  # [N] cross-entropy
    predicted: Tensor  # [N] argmax token
    logits: Tensor | None  # [N, V]; None when a fused kernel never materialises them
    log_probs: Tensor | None  # [N, V] float32 log-softmax, when computed


def predictive_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of the softmax over the last dimension."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


class LanguageModelModule(L.LightningModule):
    """A transformers model trained on whatever the collate produced.

    Subclasses say which transformers model to build and how logits line up with labels; the
    module never knows which masking policy made the batch.
    """

    objective: ClassVar[str]
    auto_model_class: ClassVar[type]
    collect_entropy: bool = False  # set by callbacks that need `TokenStats.entropy` (costs a softmax)

    def __init__(
        self,
        vocab: dict | None,
        block_size: int,
        optimizer: OptimizerConfig,
        config_overrides: dict | None,
        model_args: dict,
        attn_implementation: str | None = None,
        compile: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if vocab is None:
            raise ConfigError("model.vocab is not set: it comes from the datamodule's tokenizer (data.model_vocab)")
        self.vocab = vocab
        self.block_size = block_size
        self.optimizer_config = optimizer
        model_args = {**model_args, **(config_overrides or {})}
        raise_if_any(self.shape_errors(model_args, vocab, block_size))
        config = self.build_config(vocab=vocab, **model_args)
        self.model: PreTrainedModel = self.build_model(config, attn_implementation)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.compile_body, self._compiled = compile, False
        self.flop_counts = flop_counts(self.model, head_transform=self.objective == "mlm")  # before any sharding
        self._last_train_batch: tuple[int, int, Tensor] | None = None  # B, L, labelled positions
        # nan_strategy="disable" keeps a NaN in the mean: the default drops it with a warning, so a
        # half-NaN validation would read as finite and slip past the non-finite check.
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.val_acc = MeanMetric(nan_strategy="disable")
        self.val_targets = TargetCounts(vocab["vocab_size"])

    @classmethod
    def build_config(cls, vocab: dict, **model_args) -> PretrainedConfig:
        raise NotImplementedError

    def build_model(self, config: PretrainedConfig, attn_implementation: str | None) -> PreTrainedModel:
        """The transformers model, refused with the key's name when it has no such attention."""
        try:
            return self.auto_model_class.from_config(config, attn_implementation=attn_implementation)
        except (ValueError, ImportError) as err:
            if attn_implementation is None:
                raise
            reason = str(err).split(". ")[0]
            raise ConfigError(f"model.attn_implementation={attn_implementation!r}: {reason}") from err

    def configure_model(self) -> None:
        """`compile: true` compiles the transformer body in place (parameter names, checkpoints and
        the export stay those of the plain model); the head and loss run on a data-dependent
        number of positions and stay eager."""
        if self.compile_body and not self._compiled:
            self.model.base_model.compile()
            self._compiled = True

    @staticmethod
    def usable_positions(model_args: dict, vocab: dict) -> int:
        return model_args["max_position_embeddings"]

    @classmethod
    def shape_errors(cls, model_args: dict, vocab: dict, block_size: int) -> list[str]:
        """Checked before transformers sees the config, so every problem is named at once."""
        errors = []
        usable = cls.usable_positions(model_args, vocab)
        if block_size > usable:
            errors.append(
                f"data.block_size={block_size} is larger than the model's {usable} usable positions "
                f"(model.max_position_embeddings={model_args['max_position_embeddings']})"
            )
        hidden, heads = model_args["hidden_size"], model_args["num_attention_heads"]
        if hidden % heads:
            errors.append(f"model.hidden_size={hidden} is not divisible by model.num_heads={heads}")
        kv_heads = model_args.get("num_key_value_heads", heads)
        if heads % kv_heads:
            errors.append(f"model.num_heads={heads} is not divisible by model.num_kv_heads={kv_heads}")
        return errors

    def export_model(self) -> PreTrainedModel:
        """The transformers model `save_pretrained` writes at the end of a run."""
        return self.model

    def align(self, logits: Tensor, *per_position: Tensor) -> tuple[Tensor, ...]:
        """Line logits up with the labels they predict (identity for MLM, a shift for causal)."""
        return (logits, *per_position)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits at every position [B, L, V], for callers outside training (evaluation, probes)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The transformer body's last hidden states [B, L, H], before the output head."""
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def output_logits(self, hidden: Tensor) -> Tensor:
        """The model's output head on hidden states [..., H] -> logits [..., V]."""
        raise NotImplementedError

    def step(self, batch: dict[str, Tensor]) -> tuple[Tensor, TokenStats]:
        """Mean cross-entropy over labelled positions (0, not NaN, when there are none), and the
        per-position statistics behind it.

        The output head runs on the labelled positions only: an MLM batch never materialises
        vocabulary logits for the ~85% of positions without a label.
        """
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"])  # [B, L, H]
        hidden, labels, inputs = self.align(hidden, batch["labels"], batch["input_ids"])
        labelled = labels != IGNORE_INDEX  # [B, L']
        targets = labels[labelled]  # [N]
        head = self.head_loss(hidden, labels, labelled)
        loss = head.loss.sum() / labelled.sum().clamp_min(1)
        if self.training:
            for name, term in self.auxiliary_losses(batch, head.logits, labels).items():
                loss = loss + term
                if self._trainer is not None:
                    self.log(f"train/{name}", term)
        with torch.no_grad():
            log_probs = head.log_probs
            stats = TokenStats(
                labels=labels,
                inputs=inputs,
                loss=_scatter(head.loss.detach().float(), labelled),
                correct=_scatter(head.predicted == targets, labelled),
                entropy=_scatter(-(log_probs.exp() * log_probs).sum(-1), labelled) if self.collect_entropy else None,
            )
        return loss, stats

    def head_loss(self, hidden: Tensor, labels: Tensor, labelled: Tensor) -> HeadLoss:
        """The output head and cross-entropy on the labelled positions of `hidden` [B, L', H]
        (`labels` [B, L'], `labelled` = labels != -100). Subclasses may swap in fused kernels
        when nothing needs the logits (`collect_entropy` off, no auxiliary loss)."""
        logits = self.output_logits(hidden[labelled])  # [N, V]
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [N, V], shared by the loss and the entropy
        selected_loss = -log_probs.gather(-1, labels[labelled][:, None]).squeeze(-1)  # [N]
        return HeadLoss(selected_loss, logits.argmax(-1), logits, log_probs)

    def auxiliary_losses(self, batch: dict[str, Tensor], logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Terms added to the training loss (e.g. distillation); none by default. `logits` [N, V]
        are those of the labelled positions, in the order of `labels[labels != -100]` ([B, L']).
        Logged as `train/<name>`; validation always reports the plain objective."""
        return {}

    @staticmethod
    def labelled_entropy(logits: Tensor, labelled: Tensor) -> Tensor:
        """Predictive entropy at the labelled positions only (0 elsewhere): for MLM that is a
        sixth of the softmax work of every position."""
        entropy = torch.zeros(labelled.shape, dtype=torch.float32, device=logits.device)  # [B, L']
        entropy[labelled] = predictive_entropy(logits[labelled])
        return entropy

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Mean cross-entropy over labelled positions, their accuracy, and their count."""
        loss, stats = self.step(batch)
        count = (stats.labels != IGNORE_INDEX).sum()
        return loss, stats.correct.sum() / count.clamp_min(1), count

    def shared_step(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor | TokenStats]:
        loss, stats = self.step(batch)
        count = (stats.labels != IGNORE_INDEX).sum()
        accuracy = stats.correct.sum() / count.clamp_min(1)
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/acc", accuracy)
        else:
            getattr(self, f"{stage}_loss").update(loss, weight=count)
            getattr(self, f"{stage}_acc").update(accuracy, weight=count)
            getattr(self, f"{stage}_targets").update(stats.labels[stats.labels != IGNORE_INDEX])
        return {"loss": loss, "token_stats": stats}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor | TokenStats]:
        """Returns the loss and `token_stats`, which callbacks receive as `outputs`."""
        outputs = self.shared_step(batch, "train")
        labels = outputs["token_stats"].labels
        self._last_train_batch = (*batch["input_ids"].shape, (labels != IGNORE_INDEX).sum())
        return outputs

    @property
    def flops_per_batch(self) -> int | None:
        """Model FLOPs of the last training batch (lightning_modules/flops.py): Lightning's
        ThroughputMonitor reads it after each batch and turns it into `perf/mfu`."""
        if self._last_train_batch is None:
            return None
        batch_size, seq_len, selected = self._last_train_batch
        return self.flop_counts.training_flops(batch_size, seq_len, int(selected))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        unigram_acc, unigram_loss = self.val_targets.compute()
        values = {
            "loss": loss,
            "ppl": torch.exp(loss),
            "acc": self.val_acc.compute(),
            "unigram_acc": unigram_acc,
            "unigram_loss": unigram_loss,
            "unigram_ppl": torch.exp(unigram_loss),
        }
        self.log_dict(
            {f"val/{name}": values[name] for name in VALIDATION_METRICS},
            prog_bar=True,
            sync_dist=True,  # already synced by torchmetrics; this only tells Lightning so
        )
        self.val_loss.reset()
        self.val_acc.reset()
        self.val_targets.reset()

    def build_optimizer(self) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices only (biases, norms and embeddings get none)."""
        cfg = self.optimizer_config
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2 and not _is_embedding(self, p)]
        decay_ids = {id(p) for p in decay}
        no_decay = [p for p in self.parameters() if p.requires_grad and id(p) not in decay_ids]
        fused = cfg.fused if cfg.fused is not None else all(p.is_cuda for p in decay + no_decay)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            fused=fused,
        )

    def configure_optimizers(self):
        cfg = self.optimizer_config
        optimizer = self.build_optimizer()
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer,
            num_warmup_steps=min(cfg.warmup_steps, total),
            num_training_steps=total,
            min_lr_rate=cfg.min_lr_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        """`trainer.gradient_clip_val` with any optimiser, fused AdamW included.

        Lightning refuses to clip for a fused optimiser under mixed precision because it assumes
        the gradients are still loss-scaled. Under bf16 (and fp32) nothing is scaled, so the plain
        clip is exact; under fp16 the GradScaler unscales first (`GradScaler.step` then skips its
        own unscale, as for a non-fused optimiser). FSDP's gradients are sharded, so the norm is
        the sharded module's own `clip_grad_norm_` (Lightning has no FSDP norm clipping).
        """
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # a non-fused optimiser was unscaled by Lightning already
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        elif isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    # The dropout RNG is part of a run's state: without it a resumed run draws other dropout masks.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_state"] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("rng_state")
        if state:
            torch.set_rng_state(state["cpu"])
            if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state["cuda"])


def _scatter(values: Tensor, where: Tensor) -> Tensor:
    """Per-position tensor [B, L'] holding `values` [N] at the True positions of `where`, 0 elsewhere."""
    out = torch.zeros(where.shape, dtype=values.dtype, device=values.device)
    out[where] = values
    return out


def _is_embedding(module: L.LightningModule, param: torch.nn.Parameter) -> bool:
    embeddings = [m.weight for m in module.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]
    return any(param is e for e in embeddings)
