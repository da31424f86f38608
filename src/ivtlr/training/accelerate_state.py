"""Several runs in one process (the demo's workers, the benchmarks, the tests): each builds its own Accelerator, and
Accelerate keeps process-wide state (mixed precision, the distributed setup, gradient accumulation) that the next
one must not inherit."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def fresh_accelerate_state() -> Iterator[None]:
    """Run the body, then forget the process-wide Accelerate state it left behind (also when it failed)."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
