"""The masking policies, one module per family; `datamodules` exports every class."""
