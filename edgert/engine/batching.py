"""Pure dynamic-batching policy: which queued requests form the next batch, and how to join/split them.

The policy follows Triton's dynamic batcher. Requests are taken in FIFO order while their rows fit
in ``max_batch_size``. A batch runs at once when it is full, when it reaches a preferred size (the
largest reachable one), or when the next request would not fit; otherwise it waits until the oldest
request has waited ``max_queue_delay``, then runs with what it has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgert.errors import BackendError

__all__ = ["WAIT", "join_inputs", "plan_batch", "split_outputs"]

#: ``plan_batch`` result meaning "do not run yet, wait for more requests or for the deadline".
WAIT = 0


def plan_batch(rows: Sequence[int], max_batch_size: int, preferred: Sequence[int], expired: bool) -> int:
    """Return how many requests to take from the head of the queue (``WAIT`` = none yet).

    ``rows`` holds the row counts of queued requests, oldest first (only the first
    ``max_batch_size`` entries matter). ``expired`` says the oldest request has waited its full
    queue delay. A request larger than ``max_batch_size`` runs alone.
    """
    if not rows:
        return WAIT
    if rows[0] >= max_batch_size:
        return 1
    total = 0
    taken = 0
    best_preferred = 0
    preferred_set = set(preferred)
    for n in rows:
        if total + n > max_batch_size:
            return taken  # the batch cannot grow: the next request does not fit
        total += n
        taken += 1
        if total in preferred_set:
            best_preferred = taken
        if total == max_batch_size:
            return taken
    if best_preferred:
        return best_preferred
    return taken if expired else WAIT


def batch_rows(inputs: Mapping[str, np.ndarray]) -> int:
    """Return the batch (axis 0) size of a validated request (all inputs share it)."""
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 1


def join_inputs(requests: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate requests' inputs along axis 0 (a single request is passed through untouched)."""
    if len(requests) == 1:
        return dict(requests[0])
    names = requests[0].keys()
    return {name: np.concatenate([r[name] for r in requests], axis=0) for name in names}


def split_outputs(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Split batched outputs back along axis 0 into one dict per request with ``rows[i]`` rows each."""
    if len(rows) == 1:
        return [dict(outputs)]
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise BackendError(
                f"output {name!r} has shape {array.shape}, expected {total} rows on axis 0 for a batch",
                hint="disable dynamic batching for this model (max_batch_size = 0)",
            )
    bounds = np.cumsum(rows)[:-1]
    pieces = {name: np.split(array, bounds, axis=0) for name, array in outputs.items()}
    return [{name: parts[i] for name, parts in pieces.items()} for i in range(len(rows))]
