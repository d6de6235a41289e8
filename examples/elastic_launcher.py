"""A torch-free elastic launcher: rendezvous with DynamicRendezvousHandler, then start workers.

    python examples/elastic_launcher.py --nnodes 2 --nproc-per-node 2 \\
        --rdzv-endpoint 10.0.0.5:29400 --rdzv-id job42 [--store-type file] -- python train.py

Each launcher is one node of the rendezvous (torch's c10d backend format, so ``torchrun
--rdzv-backend=c10d`` nodes can join the same job). It assigns global ranks with torchelastic's
store protocol (``role_info``/``assigned_ranks``), starts its workers with RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT (and
TORCHELASTIC_USE_AGENT_STORE: rank 0's launcher hosts the workers' store), waits for them, meets
the other nodes at torchelastic's exit barrier and exits with the first failing worker's code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from rdzv_backend import RendezvousParameters, create_backend, create_handler
from rdzv_backend.utils import _parse_rendezvous_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nnodes", default="1", help="N or MIN:MAX")
    ap.add_argument("--nproc-per-node", type=int, default=1)
    ap.add_argument("--rdzv-endpoint", required=True)
    ap.add_argument("--rdzv-id", required=True)
    ap.add_argument("--store-type", default="tcp", choices=["tcp", "file"])
    ap.add_argument("--rdzv-conf", default="", help="k=v,... (torch's handler keys)")
    ap.add_argument("--local-addr", default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the worker command")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    lo, _, hi = args.nnodes.partition(":")
    params = RendezvousParameters(
        "c10d", args.rdzv_endpoint, args.rdzv_id, int(lo), int(hi or lo), args.local_addr,
        store_type=args.store_type, **_parse_rendezvous_config(args.rdzv_conf),
    )
    backend, store = create_backend(params)
    handler = create_handler(store, backend, params)
    try:
        info = handler.next_rendezvous()
        rstore, group_rank, nnodes = info.store, info.rank, info.world_size
        # torchelastic's rank assignment: every agent publishes its size, group rank 0 assigns.
        rstore.set(f"torchelastic/role_info/{group_rank}", json.dumps(
            {"role": "default", "rank": group_rank, "local_world_size": args.nproc_per_node}))
        if group_rank == 0:
            infos = [json.loads(v) for v in rstore.multi_get([f"torchelastic/role_info/{i}" for i in range(nnodes)])]
            total, base, keys, values = sum(i["local_world_size"] for i in infos), 0, [], []
            for i, role in enumerate(infos):
                keys.append(f"torchelastic/assigned_ranks/{i}")
                values.append(json.dumps([base, total, base, total]))
                base += role["local_world_size"]
            rstore.multi_set(keys, values)
        base_rank, world_size, _, _ = json.loads(rstore.get(f"torchelastic/assigned_ranks/{group_rank}"))
        boot = info.bootstrap_store_info
        assert boot is not None
        procs = []
        for local_rank in range(args.nproc_per_node):
            env = dict(os.environ, RANK=str(base_rank + local_rank), WORLD_SIZE=str(world_size),
                       LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(args.nproc_per_node),
                       GROUP_RANK=str(group_rank), MASTER_ADDR=boot.master_addr, MASTER_PORT=str(boot.master_port),
                       TORCHELASTIC_USE_AGENT_STORE=str(handler.use_agent_store), TORCHELASTIC_RUN_ID=args.rdzv_id)
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in procs]
        # torchelastic's exit barrier: rank 0's launcher hosts the workers' store, so no node
        # leaves before every node's workers are done.
        if rstore.add("torchelastic/agent/terminal_state/num_members", 1) == nnodes:
            rstore.set("torchelastic/agent/terminal_state/last_member", "<val_ignored>")
        rstore.wait(["torchelastic/agent/terminal_state/last_member"], 300)
        return next((c for c in codes if c), 0)
    finally:
        handler.shutdown()  # like torch's agent: the job is over for everyone
        store.close()


if __name__ == "__main__":
    sys.exit(main())
