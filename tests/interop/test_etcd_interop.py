"""etcd-v3 with real torch 2.13 (marker ``interop``; needs torch, torchrun and an etcd binary).

* ``torchrun --rdzv-backend=etcd-v3``: 2 nodes x 2 workers rendezvous through etcd (our
  plug-in, loaded by torch's registry from the ``torchrun.handlers`` entry point) and do a
  gloo ``all_reduce``;
* a torch agent (torch's handler over the plug-in) and one of ours
  (``rdzv_backend.dynamic``) in the same etcd-v3 rendezvous;
* torch's registry resolves ``etcd-v3`` through the entry point.

Run: ``/work/venv-torch/bin/python -m pytest -m interop tests/interop/test_etcd_interop.py``
(the entry point needs ``pip install -e .`` in that venv).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the etcd helpers

from etcd_helpers import etcd_cluster  # noqa: E402
from torch.distributed.elastic.rendezvous import RendezvousParameters as TorchParams  # noqa: E402
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler  # noqa: E402

from rdzv_backend import RendezvousParameters  # noqa: E402
from rdzv_backend.dynamic import create_handler as create_our_handler  # noqa: E402
from rdzv_backend.etcd import create_backend  # noqa: E402

pytestmark = pytest.mark.interop

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# Each worker writes its result to a file of its own: the workers of one node share torchrun's
# stdout, and unbuffered ``print`` writes the text and the newline apart, so lines printed by two
# workers at once can interleave (seen in CI: "rank=0 ... sum=10rank=1 ... sum=10").
_TRAIN = r"""
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
line = f"rank={dist.get_rank()} world={dist.get_world_size()} sum={int(t.item())}"
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.txt"), "w") as f:
    f.write(line)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def etcd():
    with etcd_cluster(1) as c:
        yield c


def test_registry_finds_the_plugin(etcd):
    params = TorchParams("etcd-v3", etcd.endpoints[0].replace("http://", ""), "reg-" + uuid.uuid4().hex, 1, 1)
    handler = get_rendezvous_handler(params)
    assert handler.get_backend() == "etcd-v3"
    handler.shutdown()


def test_torchrun_two_nodes_two_workers_all_reduce(etcd, tmp_path):
    if not os.path.exists(TORCHRUN):
        pytest.skip("torchrun not found next to the interpreter")
    script = tmp_path / "train.py"
    script.write_text(_TRAIN)
    results = tmp_path / "results"
    results.mkdir()
    endpoint = etcd.endpoints[0].replace("http://", "")
    run_id = "job-" + uuid.uuid4().hex[:8]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        TORCHRUN,
        "--nnodes=2",
        "--nproc-per-node=2",
        "--rdzv-backend=etcd-v3",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        "--rdzv-conf=read_timeout=30,last_call_timeout=1,join_timeout=90",
        "--local-addr=127.0.0.1",
        "--max-restarts=0",
        "--monitor-interval=0.2",
        str(script),
        str(results),
    ]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=180)
            outputs.append((node.returncode, out, err))
    finally:
        for node in nodes:
            node.kill()
            node.wait(10)
    for code, out, err in outputs:
        assert code == 0, err[-3000:]
    lines = sorted(p.read_text() for p in results.iterdir())
    assert lines == [f"rank={r} world=4 sum=10" for r in range(4)], lines


def test_torch_agent_and_ours_share_one_etcd_v3_rendezvous(etcd):
    endpoint = etcd.endpoints[0].replace("http://", "")
    run_id = "mixed-" + uuid.uuid4().hex[:8]
    conf: dict[str, Any] = {"read_timeout": "30", "last_call_timeout": "1", "join_timeout": "60"}
    results: dict[str, Any] = {}
    errors: list[BaseException] = []
    done = threading.Barrier(2)

    def torch_agent() -> None:
        try:
            handler = get_rendezvous_handler(TorchParams("etcd-v3", endpoint, run_id, 2, 2, local_addr="127.0.0.1", **conf))
            info = handler.next_rendezvous()
            results["torch"] = (info.rank, info.world_size, info.bootstrap_store_info.master_addr, info.bootstrap_store_info.master_port)
            done.wait(60)
            handler.shutdown()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def our_agent() -> None:
        try:
            params = RendezvousParameters("etcd-v3", endpoint, run_id, 2, 2, local_addr="127.0.0.1", **conf)
            backend, store = create_backend(params)
            handler = create_our_handler(store, backend, params)
            info = handler.next_rendezvous()
            results["ours"] = (info.rank, info.world_size, info.bootstrap_store_info.master_addr, info.bootstrap_store_info.master_port)
            done.wait(60)
            handler.shutdown()
            store.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=torch_agent), threading.Thread(target=our_agent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted([results["torch"][0], results["ours"][0]]) == [0, 1]
    assert results["torch"][1] == results["ours"][1] == 2
    assert results["torch"][2:] == results["ours"][2:]  # one master address and port for both
