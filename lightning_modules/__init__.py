"""LightningModules: objectives, their losses and metrics, and the optimiser set-up."""

from lightning_modules.base import LanguageModelModule, OptimizerConfig
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.masked_lm import MaskedLMModule

__all__ = ["CausalLMModule", "LanguageModelModule", "MaskedLMModule", "OptimizerConfig"]
