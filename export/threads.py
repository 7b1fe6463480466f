"""Training on every core the process may run on, whatever OMP_NUM_THREADS says.

Serving sets OMP_NUM_THREADS=1 for its model processes, and the tests set it for theirs (so that
numpy sums floats in the order the server's model processes do); torch inherits it. At one thread
a fine-tuning step took 3.6 s here against 2.1 s at two, and a ranker epoch on 2,000 lists 0.85 s
against 0.62 s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def every_core() -> Iterator[int]:
    """Torch's threads set to every usable core for the block (yields the count), then restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
