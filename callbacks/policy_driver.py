"""The contract between a masking policy and the callbacks that act on it.

A policy declares what it needs (`datamodules.masking.Policy`: objective, ratio, model,
required callbacks); a callback that acts on the policy subclasses `PolicyDriver` and declares
which policies it can drive. `compatibility_errors` checks both directions before training, so
that a policy without its callback (which would train with every label ignored, or with
weights that never move) or a callback without a policy it can drive is a one-line config error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import lightning as L

from core.errors import ConfigError
from datamodules.masking import Policy


class PolicyDriver(L.Callback):
    """Base of the callbacks that change the masking policy between steps.

    Class attributes:
        drives: the policy class (or base) this callback can drive.
        needs_ratio: the callback changes the policy's mask ratio, so the policy must have one.
    """

    drives: ClassVar[type[Policy]] = Policy
    needs_ratio: ClassVar[bool] = False

    @classmethod
    def drive_error(cls, policy: Policy) -> str | None:
        """Why this callback cannot drive `policy`, or None."""
        if not isinstance(policy, cls.drives):
            return f"{cls.__name__} needs data.masking={cls.drives.__name__}, got {type(policy).__name__}"
        if cls.needs_ratio and not policy.uses_ratio:
            return (
                f"{cls.__name__} changes the mask ratio, but data.masking={type(policy).__name__} has none "
                "(its budget is set by the text)"
            )
        return None

    def find_policy(self, trainer: L.Trainer) -> Policy:
        """The datamodule's policy, checked against what this callback drives."""
        policy = trainer.datamodule.policy
        if error := self.drive_error(policy):
            raise ConfigError(error)
        return policy


def pairing_errors(policy: Policy, callbacks: Iterable[L.Callback]) -> list[str]:
    """A required callback that is missing, and a driver that cannot drive this policy."""
    callbacks = list(callbacks)
    present = {cls.__name__ for callback in callbacks for cls in type(callback).__mro__}
    errors = [
        f"data.masking={type(policy).__name__} needs callbacks.{name} in trainer.callbacks"
        + (" (it chooses the masked positions with the model)" if policy.needs_model else "")
        for name in policy.required_callbacks
        if name not in present
    ]
    errors += [error for c in callbacks if isinstance(c, PolicyDriver) and (error := c.drive_error(policy))]
    return errors


def compatibility_errors(
    model: L.LightningModule, data: L.LightningDataModule, callbacks: Iterable[L.Callback]
) -> list[str]:
    """Everything about this model, datamodule and callbacks that cannot train together."""
    policy = data.policy
    errors = []
    if policy.objective != model.objective:
        errors.append(
            f"data.masking={type(policy).__name__} builds {policy.objective!r} batches but "
            f"model={type(model).__name__} trains the {model.objective!r} objective"
        )
    return errors + pairing_errors(policy, callbacks)
