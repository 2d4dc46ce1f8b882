"""Torch on one thread for a block, where a test compares two runs bit for bit: with several
threads some CPU kernels add partial sums in whichever order the threads finish."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
