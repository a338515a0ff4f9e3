"""What the command line says under torchrun (issue 23): an error or the resume hint once, by
rank 0, and again at the end of torchrun's own failure summary, where a reader looks.

torchrun ends a failed job with its own traceback and a summary of the failed ranks; for each it
shows the message the rank wrote to ``$TORCHELASTIC_ERROR_FILE``, and the first rank to fail is
the "root cause" at the very end. So rank 0 prints the line and writes it there; the other ranks
print nothing and wait a moment before they fail, so that rank 0's failure comes first (torchrun
stops them meanwhile). A rank that is still alive after the wait failed on its own: it then
prints and records its message, with its rank.
"""
from __future__ import annotations

import json
import os
import sys
import time

OTHER_RANKS_WAIT_S = 3.0


def rank() -> int | None:
    """This process's rank under torchrun with more than one process, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ.get("RANK", "0"))


def record(message: str) -> None:
    """Write ``message`` where torchrun's failure summary shows it (nothing outside torchrun)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            # the layout torch.distributed.elastic's own @record writes (no format warning)
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    except OSError:  # the summary then says less; the line on stderr stands
        pass


def say_error(line: str) -> None:
    """Print ``line`` (``dynsparse: error: ...``) once per job: see the module docstring."""
    r = rank()
    if r not in (None, 0):
        time.sleep(OTHER_RANKS_WAIT_S)  # torchrun stops this rank here when rank 0 failed too
        line = line.replace("dynsparse: ", f"dynsparse (rank {r}): ", 1)
    print(line, file=sys.stderr)
    record(line)


def is_quiet_rank() -> bool:
    """Ranks other than 0 say nothing when they are interrupted: rank 0 says it for the job."""
    return rank() not in (None, 0)
