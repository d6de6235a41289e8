"""Helper processes started by the benchmarks (run as a script, never imported by the runner).

``torch-serve``: torch's libuv TCPStore server, prints ``port N`` and serves until SIGTERM.
``torch-master PORT WORLD`` / ``ours-master PORT WORLD``: a torch-style master,
``TCPStore(host, PORT, world_size=WORLD, is_master=True, wait_for_workers=True)``;
prints ``returned <time.monotonic()>`` when the constructor returns, then
serves until SIGTERM (the clocks of all processes on one Linux host agree).
"""

from __future__ import annotations

import signal
import sys
import time
from datetime import timedelta

HOST = "127.0.0.1"


def _serve_until_term() -> None:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    deadline = time.monotonic() + 3600  # bounded even if nobody ever stops us
    while not stop and time.monotonic() < deadline:
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "torch-serve":
        from torch.distributed import TCPStore

        store = TCPStore(HOST, 0, is_master=True, wait_for_workers=False, use_libuv=True)
        print(f"port {store.port}", flush=True)
        _serve_until_term()
        return 0
    if mode in ("torch-master", "ours-master"):
        port, world = int(argv[1]), int(argv[2])
        if mode == "torch-master":
            from torch.distributed import TCPStore
        else:
            from rdzv_store import TCPStore
        store = TCPStore(HOST, port, world_size=world, is_master=True, wait_for_workers=True,
                         timeout=timedelta(seconds=150))
        print(f"returned {time.monotonic()!r}", flush=True)
        _serve_until_term()
        del store
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
