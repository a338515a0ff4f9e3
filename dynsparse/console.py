"""What a run prints above its epoch rows: the column heads and what each column means, so that
no number's meaning depends on a flag the reader has to remember (issue 23)."""
from __future__ import annotations

from dynsparse.config import TrainConfig

COLUMNS = ("epoch", "lr", "loss", "train%", "test%", "top5%", "val%", "nonzero", "updates", "img/s", "time")
WIDTHS = (5, 8, 7, 7, 7, 7, 7, 10, 7, 7, 6)


def epoch_header(cfg: TrainConfig) -> list[str]:
    """The legend and the heads of the per-epoch table."""
    train = ("train%: accuracy on the same steps, running (--no-validate-train)" if cfg.no_validate_train else
             "train%: a full evaluation pass over the training set after the epoch")
    legend = ("columns: loss: mean training loss over the epoch's steps, as trained (the progress lines show "
              f"the mean so far); {train}; test%/top5%/val%: top-1/top-5 on the test set and top-1 on the "
              "validation split; nonzero: weights not zero; updates: topology updates (reallocations) "
              "in the epoch; time: seconds, evaluation included")
    return [legend, " ".join(f"{c:>{w}}" for c, w in zip(COLUMNS, WIDTHS))]
