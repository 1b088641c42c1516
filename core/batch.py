"""The batch convention between a collate and a LightningModule."""

IGNORE_INDEX = -100  # a label that carries no loss (PyTorch's cross-entropy default)
