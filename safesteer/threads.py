"""PyTorch's CPU threads and the Python threads that call them.

PyTorch computes on a CPU with OpenMP, and every Python thread that runs a parallel operation gets
a team of OpenMP threads of its own. Once more of those threads exist than cores, libgomp stops them
from spinning while they wait, and every operation then pays for waking them. Measured on 2 cores:
a decode step of the embedded model took 95 ms in the server's worker thread after the main thread
had loaded the model with 2 threads, and 42 ms with the main thread kept to one. A process whose
model work runs in a worker thread (the server's batcher) therefore keeps its main thread serial
from the start, and the worker asks for the cores.
"""

from __future__ import annotations

import torch


def serial_main_thread() -> int:
    """Keep this thread's PyTorch work on one core (call before loading); returns the cores workers should use."""
    cores = torch.get_num_threads()
    torch.set_num_threads(1)
    return cores


def use_cores(cores: int | None) -> None:
    """Called first in a worker thread: its PyTorch work uses `cores` threads (None: leave as it is)."""
    if cores:
        torch.set_num_threads(cores)
