"""The main job: host a store, run worker processes through a barrier, say what that proved.

``rdzv-store demo`` runs ``run_demo``; each worker is ``python -m rdzv_store.demo --port P
--rank R --world-size W`` (``run_worker``), a plain TCPStore client of the host's server.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from .tcpstore import TCPStore

__all__ = ["run_demo", "run_worker", "expected_keys"]

BARRIER = "everyone-said-hello"


def expected_keys(workers: int) -> int:
    """Keys on the server after a clean run, and why (``num_keys`` counts them all, as torch's does)."""
    # init/ (each worker counts itself in, as torch's clients do) + arrivals + the barrier's own
    # counter (the native TCP barrier keeps its count under its key) + hello/<rank> + done/<rank>
    return 3 + 2 * workers


def run_worker(port: int, rank: int, world_size: int) -> int:
    store = TCPStore("127.0.0.1", port, world_size=world_size, timeout=30)
    arrival = store.add("arrivals", 1)
    store.set(f"hello/{rank}", f"rank {rank}, arrival #{arrival}")
    store.barrier(BARRIER, world_size - 1, timeout=30)  # the workers, not the host
    # After the barrier every greeting exists: read them all and report how many were there.
    peers = store.multi_get([f"hello/{r}" for r in range(1, world_size)])
    store.set(f"done/{rank}", str(sum(1 for value in peers if value.startswith(b"rank "))))
    store.close()
    return 0


def run_demo(workers: int) -> int:
    world_size = workers + 1  # the host counts as one participant, as torch's rank 0 does
    started = time.monotonic()
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=30, wait_for_workers=False) as store:
        print(f"host: store server listening on 127.0.0.1:{store.port}")
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "rdzv_store.demo", "--port", str(store.port), "--rank", str(rank),
                 "--world-size", str(world_size)]
            )
            for rank in range(1, world_size)
        ]
        print(f"host: started {workers} worker processes; each counts itself in, greets, passes a barrier, "
              "then reads every greeting")
        try:
            store.wait([f"done/{rank}" for rank in range(1, world_size)], timeout=60)
            seen = []
            for rank in range(1, world_size):
                seen.append(int(store.get(f"done/{rank}")))
                print(f"host: worker {rank} said {store.get(f'hello/{rank}').decode()!r} "
                      f"and saw {seen[-1]} greetings after the barrier")
            arrivals, keys = store.add("arrivals", 0), store.num_keys()
        finally:
            codes = [proc.wait(timeout=60) for proc in procs]
    elapsed = time.monotonic() - started
    ok = all(code == 0 for code in codes)
    proved = ok and arrivals == workers and all(n == workers for n in seen) and keys == expected_keys(workers)
    print(f"host: arrivals counter = {arrivals}: each worker's add counted exactly once")
    verdict = "as expected" if keys == expected_keys(workers) else f"expected {expected_keys(workers)}"
    print(f"host: {keys} keys on the server, {verdict}: init/ (the workers counting themselves in) + arrivals "
          f"+ the barrier's counter + {workers} hello/<rank> + {workers} done/<rank>")
    if proved:
        print(f"host: proved: all {workers} workers passed the barrier and each read all {workers} greetings, "
              "so no worker left the barrier before every greeting was written")
    else:
        print(f"host: NOT proved: exit codes {codes}, greetings seen {seen}, arrivals {arrivals}, keys {keys}")
    print(f"host: all workers exited {'cleanly' if ok else f'with codes {codes}'} in {elapsed:.2f}s")
    return 0 if proved else 1


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdzv_store.demo", description="One worker of rdzv-store demo.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    args = parser.parse_args(argv)
    return run_worker(args.port, args.rank, args.world_size)


if __name__ == "__main__":
    sys.exit(_worker_main())
