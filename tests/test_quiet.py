"""experiments.quiet drops exactly the messages a user cannot act on, and nothing else."""

from __future__ import annotations

import importlib
import logging
import warnings

import experiments.quiet


def test_the_pytree_deprecation_is_dropped_and_other_warnings_still_show():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        importlib.reload(experiments.quiet)  # its filters go in front of the test's own
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("something the user should see", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the user should see"]


def test_lightnings_advertising_tip_is_dropped_and_its_other_info_kept():
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    # Other tests' libraries may disable loggers (logging.config with disable_existing_loggers, or
    # logging.disable); this test is about our filter only, so it switches logging back on around it.
    level, disabled, disabled_below = logger.level, logger.disabled, logging.root.manager.disable
    logger.setLevel(logging.INFO)
    logger.disabled = False
    logging.disable(logging.NOTSET)
    try:
        logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")
        logger.info("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled
        logging.disable(disabled_below)
    assert records == ["GPU available: False, used: False"]
