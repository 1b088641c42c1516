"""Downstream evaluation suites (needle, retrieval, BLiMP, perplexity, GLUE, attention).

Each suite is a module with an `Options` dataclass (its fields' docstrings are the CLI help of
`python -m experiments.evaluate`) and `run(model: LoadedModel, options) -> SuiteResult`.
"""
