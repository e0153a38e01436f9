"""The retry policy shared by everything that tries again: respawning a crashed child
(``engine.runner``) and reconnecting a dropped client (``client.connection``).

Policy apart from mechanism (websockets ``client.backoff``): a pure generator of delays; the
caller owns the clock and decides when to reset it (a new generator after a stable run).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator


def backoff(
    initial_s: float,
    maximum_s: float,
    factor: float = 2.0,
    rng: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Delays growing exponentially from ``initial_s`` to a cap, with full jitter.

    Full jitter (a uniform draw in ``[0, delay]``) keeps many peers that failed together (a
    bad deploy, an OOM kill, a proxy restart that drops every client at once) from retrying
    in lockstep.
    """
    delay = initial_s
    while True:
        yield rng() * delay
        delay = min(maximum_s, delay * factor if delay > 0 else maximum_s)
