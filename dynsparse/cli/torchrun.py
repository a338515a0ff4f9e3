"""What the command line says under torchrun (issue 23): an error or the resume hint once, by
rank 0, and again at the end of torchrun's own failure summary, where a reader looks.

torchrun ends a failed job with its own traceback and a summary of the failed ranks; for each it
shows the message the rank wrote to ``$TORCHELASTIC_ERROR_FILE``, and the first rank to fail is
the "root cause" at the very end. So rank 0 prints the line and writes it there; the other ranks
print nothing and wait before they fail, so that rank 0's failure comes first (torchrun stops
them meanwhile). A fixed wait is not enough on a loaded machine (torchrun took 4 s to stop the
other rank at a load of 9), so a rank first watches for the error file of the local rank 0 (its
sibling under torchrun's log folder): once that exists, rank 0 has said it, and this rank stays
quiet. A rank that sees no such file within the wait failed on its own: it then prints and
records its message, with its rank.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

OTHER_RANKS_WAIT_S = 3.0  # without torchrun's error files (another launcher): a fixed wait
RANK0_ERROR_WAIT_S = 30.0  # the longest a rank waits for rank 0 to say the error


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
        if _local_rank0_said_it():
            time.sleep(OTHER_RANKS_WAIT_S)  # torchrun stops this rank here: rank 0 stays the first failure
            return
        line = line.replace("dynsparse: ", f"dynsparse (rank {r}): ", 1)
    print(line, file=sys.stderr)
    record(line)


def _local_rank0_said_it(poll: float = 0.1) -> bool:
    """Whether local rank 0 wrote its error file within ``RANK0_ERROR_WAIT_S`` (read at the call,
    so that tests can shorten it; it does so just before it exits with the same error); without
    torchrun's error files, a fixed wait and False."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    local = os.environ.get("LOCAL_RANK")
    # the error file to watch is global rank 0's, on this node only when its ranks start at 0
    on_rank0_node = local is not None and local.isdigit() and int(os.environ.get("RANK", "0")) - int(local) == 0
    if not path or not on_rank0_node or Path(path).parent.name != local:
        time.sleep(OTHER_RANKS_WAIT_S)  # torchrun stops this rank here when rank 0 failed too
        return False
    rank0_file = Path(path).parent.parent / "0" / Path(path).name
    deadline = time.monotonic() + RANK0_ERROR_WAIT_S
    while time.monotonic() < deadline:
        if rank0_file.exists():
            return True
        time.sleep(poll)
    return False


def is_quiet_rank() -> bool:
    """Ranks other than 0 say nothing when they are interrupted: rank 0 says it for the job."""
    return rank() not in (None, 0)
