"""Silence what a user of an entry point cannot act on; importing this module installs the filters.

Each filter names the one message it drops, so a new warning from the same library still shows.
Imported first by every entry point (`experiments.run`, `experiments.evaluate`, ...).
"""

from __future__ import annotations

import logging
import warnings

# Lightning's own code uses a torch API that torch has deprecated; nothing in a run can change that.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

ADVERTISING = "💡 Tip:"  # Lightning suggests installing its cloud logger at every Trainer start


class DropAdvertising(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERTISING)


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(DropAdvertising())
