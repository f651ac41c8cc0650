"""Run a test function on several gloo processes on this machine, in bounded time.

``run_ranks(fn, world_size, tmp_path, *args)`` starts `world_size` processes (from a
fork server, see below); each
initialises a gloo process group through a file store in `tmp_path` and calls
``fn(rank, world_size, *args)`` (a module-level function, so the child can import it).
A failure in any rank fails the test with that rank's traceback; a rank that does not
finish within `timeout` seconds fails it too (the processes are terminated), so a
missing collective never hangs the suite.
"""
from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def _worker(rank, fn, world_size, store, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        torch.manual_seed(0)
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, tmp_path, *args, timeout: float = 150.0) -> None:
    # A fork server that imported torch and skipfast once (no threads started) forks the
    # ranks: each rank skips the seconds of imports a spawned interpreter would pay.
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "skipfast", "distributed",
                                                         fn.__module__])
    store = os.path.join(str(tmp_path), f"store_{fn.__name__}_{world_size}")
    ctx = mp.start_processes(_worker, args=(fn, world_size, store, args), nprocs=world_size, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
            pytest.fail(f"{fn.__name__} on {world_size} processes did not finish within {timeout:.0f} s")
