"""The main job: host a store, run worker processes through a barrier, print what happened."""

from __future__ import annotations

import subprocess
import sys
import time

from .tcpstore import TCPStore

__all__ = ["run_demo", "run_worker"]


def run_worker(port: int, rank: int, world_size: int) -> int:
    store = TCPStore("127.0.0.1", port, world_size=world_size, timeout=30)
    arrival = store.add("arrivals", 1)
    store.set(f"hello/{rank}", f"rank {rank}, arrival #{arrival}")
    store.barrier("everyone-said-hello", world_size - 1, timeout=30)  # the workers, not the host
    peers = store.multi_get([f"hello/{r}" for r in range(1, world_size)])
    store.set(f"done/{rank}", str(len(peers)))
    store.close()
    return 0


def run_demo(workers: int) -> int:
    world_size = workers + 1  # the host counts as one participant, as torch's rank 0 does
    started = time.monotonic()
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=30, wait_for_workers=False) as store:
        print(f"host: store server listening on 127.0.0.1:{store.port}")
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "rdzv_store", "--log-level", "WARNING", "demo-worker",
                 "--port", str(store.port), "--rank", str(rank), "--world-size", str(world_size)]
            )
            for rank in range(1, world_size)
        ]
        print(f"host: started {workers} worker processes")
        try:
            store.wait([f"done/{rank}" for rank in range(1, world_size)], timeout=60)
            for rank in range(1, world_size):
                print(f"host: worker {rank} said {store.get(f'hello/{rank}').decode()!r} "
                      f"and saw {store.get(f'done/{rank}').decode()} greetings after the barrier")
            print(f"host: arrivals counter = {store.add('arrivals', 0)}, keys on the server = {store.num_keys()}")
        finally:
            codes = [proc.wait(timeout=60) for proc in procs]
    ok = all(code == 0 for code in codes)
    print(f"host: all workers exited {'cleanly' if ok else f'with codes {codes}'} in {time.monotonic() - started:.2f}s")
    return 0 if ok else 1
