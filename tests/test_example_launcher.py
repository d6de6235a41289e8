"""examples/elastic_launcher.py, torch-free: two launchers (nodes) x two plain-Python workers.

The workers record their environment and meet through the store rank 0's launcher hosts
(MASTER_ADDR/MASTER_PORT, our TCPStore protocol): each adds itself to a counter and waits for
all of them. On our TCP server and on a FileStore. Every process is bounded and reaped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rdzv_store import TCPStore

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "examples" / "elastic_launcher.py"
CONF = "keep_alive_interval=1,last_call_timeout=1,join_timeout=40,read_timeout=30,is_host=false"

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from rdzv_store import TCPStore
    keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"]
    env = {k: os.environ[k] for k in keys}
    store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), timeout=30)
    store.add("arrived", 1)
    store.barrier("all", int(env["WORLD_SIZE"]))
    env["arrived"] = int(store.get("arrived"))
    with open(os.path.join(sys.argv[1], env["RANK"] + ".json"), "w") as f:
        json.dump(env, f)
    """
)


def _run_launchers(tmp_path: Path, endpoint: str, store_type: str) -> list[dict]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(LAUNCHER), "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", endpoint,
           "--rdzv-id", "launch", "--store-type", store_type, "--rdzv-conf", CONF, "--local-addr", "127.0.0.1",
           "--", sys.executable, str(worker), str(out)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=90)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert [p.returncode for p in procs] == [0, 0], outputs
    return [json.loads((out / f"{r}.json").read_text()) for r in range(4)]


@pytest.mark.parametrize("store_type", ["tcp", "file"])
def test_launcher_starts_ranked_workers(tmp_path: Path, store_type: str) -> None:
    if store_type == "tcp":
        server = TCPStore("127.0.0.1", 0, is_master=True, timeout=30)
        endpoint = f"127.0.0.1:{server.port}"
    else:
        server, endpoint = None, str(tmp_path / "rdzv.store")
    try:
        envs = _run_launchers(tmp_path, endpoint, store_type)
    finally:
        if server is not None:
            server.close()
    assert [int(e["RANK"]) for e in envs] == [0, 1, 2, 3]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"} and {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
    # Node g's workers are ranks 2g and 2g+1 with local ranks 0 and 1.
    assert [(e["GROUP_RANK"], e["LOCAL_RANK"]) for e in envs] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
    assert envs[0]["MASTER_ADDR"] == "127.0.0.1" and envs[0]["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    assert {e["arrived"] for e in envs} == {4}
