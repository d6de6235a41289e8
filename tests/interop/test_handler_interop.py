"""Mixed rendezvous: torch 2.13 agents (torch's handler + c10d backend) and ours, one job.

* on our server and on torch's server: same rounds and ranks for everyone;
* SIGKILL a torch agent or one of ours: the rest re-rendezvous;
* a torch agent or one of ours closes: the others' ``next_rendezvous`` ends with
  ``RendezvousClosedError``;
* ``torchrun --rdzv-backend=c10d`` joins a rendezvous hosted by ``rdzv-store serve`` next to our
  example launcher, their torch workers do a gloo ``all_reduce`` together, and
  ``rdzv-store inspect`` shows the live rendezvous meanwhile.

Marker ``interop``; skipped without torch. Every wait is bounded; every process is stopped.
Run: ``/work/venv-torch/bin/python -m pytest -m interop tests/interop/test_handler_interop.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from handler_helpers import HOST, AgentProcess  # noqa: E402
from tcp_helpers import ServerProcess  # noqa: E402

from rdzv_store import TCPStore  # noqa: E402

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parent.parent.parent
CONF = {
    "keep_alive_interval": "1",
    # Dead after 4 s without a heartbeat: a live agent on a loaded machine may miss 2 or 3.
    "keep_alive_max_attempt": "4",
    "last_call_timeout": "1",
    "join_timeout": "60",
    "read_timeout": "30",
    "is_host": "false",
}
REJOIN_BOUND = 25.0


@pytest.fixture(params=["our-server", "torch-server"])
def endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "our-server":
        server = TCPStore(HOST, 0, is_master=True, timeout=30)
        try:
            yield f"{HOST}:{server.port}"
        finally:
            server.close()
    else:
        from torch.distributed import TCPStore as TorchTCPStore

        server = TorchTCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
        try:
            yield f"{HOST}:{server.port}"
        finally:
            del server


@contextmanager
def mixed(endpoint: str, kinds: str, run_id: str, min_nodes: int, max_nodes: int) -> Iterator[list[AgentProcess]]:
    """Agents of the given kinds ('t' torch, 'o' ours), all on one rendezvous."""
    procs: list[AgentProcess] = []
    try:
        for kind in kinds:
            procs.append(
                AgentProcess(
                    endpoint=endpoint, store_type="tcp", run_id=run_id, min_nodes=min_nodes, max_nodes=max_nodes,
                    conf=CONF, torch_handler=(kind == "t"),
                )
            )
        for p in procs:
            ready = p.expect("ready", 60)
            assert ready["torch"] == (kinds[procs.index(p)] == "t")
        yield procs
    finally:
        for p in procs:
            p.stop()


def _check_round(events: list[dict[str, Any]], pids: set[int], torch_cached: dict[int, Any] | None = None) -> None:
    """One round, ranks 0..N-1 in node order, one MASTER_ADDR/PORT (rank 0's).

    ``torch_cached``: event index -> that torch agent's previous master. torch's non-zero ranks
    keep the bootstrap info they cached in their first round even after rank 0 moved (reference
    §7.2, torch's behaviour, not ours): for them, the cached value is accepted too.
    """
    assert len({e["round"] for e in events}) == 1, events
    assert sorted(e["rank"] for e in events) == list(range(len(events)))
    assert {e["world"] for e in events} == {len(events)}
    parts = events[0]["participants"]
    assert all(e["participants"] == parts for e in events), events
    assert {p[1] for p in parts} == pids
    assert [p[3] for p in sorted(parts)] == list(range(len(parts)))  # sorted node order, both kinds
    by_rank = {e["rank"]: e for e in events}
    for i, e in enumerate(events):  # rank 0's server, whoever it is
        allowed = [by_rank[0]["master"]]
        if torch_cached and i in torch_cached and e["rank"] != 0:
            allowed.append(torch_cached[i])
        assert e["master"] in allowed, (i, e, by_rank[0])


def test_mixed_round_same_ranks(endpoint: str) -> None:
    with mixed(endpoint, "tote", "mixed", 4, 4) as procs:
        for p in procs:
            p.send("next")
        events = [p.expect("round", 60) for p in procs]
        _check_round(events, {p.pid for p in procs})
        # The round's store is shared by both kinds.
        torch_agent, ours = procs[0], procs[1]
        torch_agent.send("putget from-torch from-ours")
        ours.send("putget from-ours from-torch")
        assert torch_agent.expect("putget", 20)["value"] == str(ours.pid)
        assert ours.expect("putget", 20)["value"] == str(torch_agent.pid)


@pytest.mark.parametrize("victim_kind", ["t", "o"])
def test_kill_either_kind_the_rest_rerendezvous(endpoint: str, victim_kind: str) -> None:
    kinds = "toto"
    with mixed(endpoint, kinds, f"kill-{victim_kind}", 2, 4) as procs:
        for p in procs:
            p.send("next")
        first = [p.expect("round", 60) for p in procs]
        _check_round(first, {p.pid for p in procs})
        victim = procs[kinds.index(victim_kind)]
        survivors = [p for p in procs if p is not victim]
        victim.kill()
        t0 = time.monotonic()
        for p in survivors:
            p.send("next")
        second = [p.expect("round", REJOIN_BOUND + 20) for p in survivors]
        took = time.monotonic() - t0
        cached = {i: first[procs.index(p)]["master"] for i, p in enumerate(survivors) if kinds[procs.index(p)] == "t"}
        _check_round(second, {p.pid for p in survivors}, torch_cached=cached)
        # Ours always follow the current rank 0.
        rank0 = next(e for e in second if e["rank"] == 0)
        for i, p in enumerate(survivors):
            if kinds[procs.index(p)] == "o":
                assert second[i]["master"] == rank0["master"]
        assert second[0]["round"] > first[0]["round"]
        assert took < REJOIN_BOUND, took


@pytest.mark.parametrize("closer_kind", ["t", "o"])
def test_either_kind_closes(endpoint: str, closer_kind: str) -> None:
    # Two of each kind wait for a fifth node that never comes; the closer closes the job.
    with mixed(endpoint, "toto" + closer_kind, f"close-{closer_kind}", 5, 5) as procs:
        waiters, closer = procs[:4], procs[4]
        for p in waiters:
            p.send("next")
        # The close may race the joins: either way every waiter ends closed.
        closer.send("close")
        closer.expect("closed", 40)
        for p in waiters:
            err = p.expect("error", 30)
            assert err["kind"] == "RendezvousClosedError", err
        for p in (waiters[0], waiters[1]):
            p.send("closed")
            assert p.expect("is_closed", 20)["value"] is True


TORCH_WORKER = textwrap.dedent(
    """
    import json, os, sys
    from datetime import timedelta
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"]
    out = {k: os.environ.get(k) for k in keys}
    out["sum"] = t.item()
    with open(os.path.join(sys.argv[1], "w%s.json" % dist.get_rank()), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
    """
)


def _torch_bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found next to {sys.executable}")
    return found


def _run_job(tmp_path: Path, endpoint: str, with_torchrun: bool, inspect: bool = False) -> tuple[list[dict], str]:
    worker = tmp_path / "worker.py"
    worker.write_text(TORCH_WORKER)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    conf = ",".join(f"{k}={v}" for k, v in CONF.items())
    ours = [sys.executable, str(REPO / "examples" / "elastic_launcher.py"), "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-endpoint", endpoint, "--rdzv-id", "job", "--rdzv-conf", conf, "--local-addr", HOST,
            "--", sys.executable, str(worker), str(out)]
    other = (
        [_torch_bin("torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", endpoint, "--rdzv-id", "job", "--rdzv-conf", conf, "--local-addr", HOST,
         "--monitor-interval", "0.5", str(worker), str(out)]
        if with_torchrun
        else ours
    )
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = []
    inspected = ""
    try:
        for cmd, log in zip((ours, other), logs):
            procs.append(subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT))
        if inspect:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and procs[0].poll() is None:
                r = subprocess.run([sys.executable, "-m", "rdzv_store", "inspect", endpoint, "--run-id", "job", "--json"],
                                   capture_output=True, text=True, timeout=30, env=env)
                if r.returncode == 0 and '"participants"' in r.stdout and "127.0.0.1" in r.stdout:
                    inspected = r.stdout
                    break
                time.sleep(0.2)  # polling an external tool, bounded by the deadline
        for p in procs:
            p.wait(120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    text = "\n".join(log.read_text(errors="replace")[-3000:] for log in logs)
    assert [p.returncode for p in procs] == [0, 0], text
    return [json.loads((out / f"w{r}.json").read_text()) for r in range(2)], inspected


def test_example_launcher_drives_torch_gloo_workers(tmp_path: Path) -> None:
    server = ServerProcess()
    try:
        results, _ = _run_job(tmp_path, f"{HOST}:{server.port}", with_torchrun=False)
    finally:
        server.kill()
    assert [r["RANK"] for r in results] == ["0", "1"]
    assert {r["sum"] for r in results} == {3.0}
    assert {r["TORCHELASTIC_USE_AGENT_STORE"] for r in results} == {"True"}


def test_torchrun_joins_a_rendezvous_hosted_by_rdzv_store_serve(tmp_path: Path) -> None:
    server = ServerProcess()
    try:
        results, inspected = _run_job(tmp_path, f"{HOST}:{server.port}", with_torchrun=True, inspect=True)
    finally:
        server.kill()
    assert sorted(r["RANK"] for r in results) == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in results} == {"2"}
    assert {r["sum"] for r in results} == {3.0}  # 1 + 2: one gloo all_reduce across both launchers
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in results}) == 1
    assert inspected, "rdzv-store inspect never showed the live rendezvous"
    doc = json.loads(inspected)
    assert "job" in json.dumps(doc)
