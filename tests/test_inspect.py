"""``rdzv-store inspect`` and rdzv_backend.inspect, torch-free: our TCP server and a FileStore file
holding states from the samples file, a corrupt one, the backend's sentinel and other keys."""

from __future__ import annotations

import base64
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from rdzv_backend.inspect import FileSnapshot, inspect_store, render_text
from rdzv_backend.state import NodeDesc, RendezvousState
from rdzv_backend.state_codec import encode_state
from rdzv_store import FileStore, TCPStore
from rdzv_store.cli import main

from test_state_codec import VECTORS

pytestmark = pytest.mark.skipif(not VECTORS, reason="samples/rendezvous-states.json not found")

NOW = datetime(2026, 12, 1, 12, 0, 20, tzinfo=timezone.utc)
HOSTILE = base64.b64encode(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x01\x85R.")


def vector(name: str, protocol: int = 4) -> str:
    return next(v["value_b64"] for v in VECTORS if v["name"] == name and v["protocol"] == protocol)


def fill(store: Any) -> None:
    store.set("torch.rendezvous.job", vector("two_participants_one_waiting"))
    store.set("torch.rendezvous.job.3/MASTER_ADDR", "node-a.example")
    store.set("torch.rendezvous.job.3/MASTER_PORT", "29501")
    store.set("torch.rendezvous.big", vector("sixty_four_participants", 2))
    store.set("torch.rendezvous.old", vector("naive_datetimes_unicode_big_ints", 3))
    store.set("torch.rendezvous.evil", HOSTILE)
    store.set("torch.rendezvous.new", "Y2FuaW1hZGFt")
    store.set("torch.rendezvous.notb64", "abcde")  # incorrect padding, even leniently
    store.set("worker/0", b"\xff" * 1000)


def check_report(report: dict[str, Any]) -> None:
    sizes = {row["key"]: row.get("size") for row in report["keys"]}
    assert sizes["worker/0"] == 1000 and sizes["torch.rendezvous.job"] == 656
    by_id = {r["run_id"]: r for r in report["rendezvous"]}
    assert set(by_id) == {"job", "big", "old", "evil", "new", "notb64"}  # the round keys are not states

    job = by_id["job"]
    assert job["status"] == "ok" and job["pickle_protocol"] == 4 and job["state_bytes"] == 491
    assert (job["round"], job["complete"], job["closed"]) == (3, True, False)
    assert job["deadline"] == "2026-12-01T12:00:00.123456+00:00" and job["deadline_in_s"] == pytest.approx(-19.877, abs=1e-3)
    assert [(p["node"], p["rank"], p["heartbeat_age_s"], p["overdue"]) for p in job["participants"]] == [
        ("node-a.example_101_0", 0, 19.0, True),
        ("node-b.example_202_0", 1, 18.0, True),
    ]
    assert [n["node"] for n in job["wait_list"]] == ["node-c_303_1"] and job["wait_list"][0]["heartbeat_age_s"] is None
    assert job["redundancy_list"] == [] and job["overdue"] == ["node-a.example_101_0", "node-b.example_202_0"]
    assert job["bootstrap"] == {"MASTER_ADDR": "node-a.example", "MASTER_PORT": "29501"} and job["round_keys"] == 2
    assert any("without any heartbeat: node-c_303_1" in w for w in job["warnings"])

    big = by_id["big"]
    assert big["pickle_protocol"] == 2 and len(big["participants"]) == 64
    assert [p["rank"] for p in big["participants"]] == list(range(64))
    assert [n["node"] for n in big["redundancy_list"]] == ["10.9.9.9_9_0"]
    assert by_id["old"]["warnings"][0].startswith("naive datetimes")
    assert by_id["new"]["status"] == "no_state"
    evil = by_id["evil"]
    assert evil["status"] == "corrupt"
    assert evil["error"].startswith("The rendezvous state is corrupt. See inner exception for details. Key 'torch.rendezvous.evil': GLOBAL ('os', 'system') is not allowed at byte offset 2")
    assert by_id["notb64"]["status"] == "corrupt" and "The state object is corrupt" in by_id["notb64"]["error"]


@pytest.fixture
def server() -> Any:
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=10)
    fill(master)
    yield master
    master.close()


def test_inspect_our_tcp_server(server: TCPStore) -> None:
    client = TCPStore("127.0.0.1", server.port, timeout=10)
    try:
        report = inspect_store(client, now=NOW)
    finally:
        client.close()
    check_report(report)
    text = render_text(report)
    assert "rank 0     node-a.example_101_0" in text and "OVERDUE" in text
    assert "CORRUPT" in text and "('os', 'system')" in text
    assert "created, no state written yet" in text


def test_overdue_threshold_follows_the_keep_alive_settings(server: TCPStore) -> None:
    report = inspect_store(server, run_id="job", now=NOW, keep_alive_interval=10, keep_alive_max_attempt=2)
    (job,) = report["rendezvous"]
    assert report["heartbeat_timeout_s"] == 20 and job["overdue"] == []
    report = inspect_store(server, run_id="job", now=NOW, keep_alive_interval=6, keep_alive_max_attempt=3)
    assert report["rendezvous"][0]["overdue"] == ["node-a.example_101_0"]  # 19 s > 18 s, 18 s is not


def test_missing_run_id_is_reported(server: TCPStore) -> None:
    (entry,) = inspect_store(server, run_id="nope", now=NOW)["rendezvous"]
    assert entry == {"run_id": "nope", "key": "torch.rendezvous.nope", "status": "missing"}


def test_filestore_file_is_read_without_being_changed(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with FileStore(str(path), world_size=-1) as store:
        fill(store)
        before = path.read_bytes()
        snapshot = FileSnapshot(str(path))
        check_report(inspect_store(snapshot, now=NOW))
        assert path.read_bytes() == before  # no refcount/ or cleanup/ record: torch's counts untouched
        store.delete_key("worker/0")
        assert "worker/0" not in {row["key"] for row in inspect_store(FileSnapshot(str(path)), now=NOW)["keys"]}
        check_report_via_store = inspect_store(store, now=NOW)
        assert len(check_report_via_store["rendezvous"]) == 6


def test_a_torn_tail_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with FileStore(str(path), world_size=-1) as store:
        store.set("torch.rendezvous.job", vector("closed"))
    with open(path, "ab") as f:
        f.write(b"\x10\x00\x00\x00/torch")  # a record cut short by a killed writer
    (rdzv,) = inspect_store(FileSnapshot(str(path)), now=NOW)["rendezvous"]
    assert rdzv["closed"] is True and rdzv["round"] == 7


def test_cli_text_and_json(server: TCPStore, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", f"127.0.0.1:{server.port}"])
    out = capsys.readouterr().out
    assert code == 1  # a corrupt state: scripts can tell
    assert out.startswith(f"TCPStore 127.0.0.1:{server.port}: 9 key(s)")
    assert "rendezvous 'job'" in out and "rendezvous 'evil'" in out
    assert main(["inspect", f"127.0.0.1:{server.port}", "--run-id", "job", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["store"] == f"TCPStore 127.0.0.1:{server.port}"
    (job,) = doc["rendezvous"]
    assert job["state"]["wait_list"] == [["node-c", 303, 1]] and job["participants"][1]["rank"] == 1
    assert main(["inspect", f"127.0.0.1:{server.port}", "--run-id", "nope"]) == 1
    assert "no such key" in capsys.readouterr().out


def test_cli_on_a_filestore_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "store"
    utc = timezone.utc
    node = NodeDesc("127.0.0.1", os.getpid(), 0)
    fresh = RendezvousState(round=1, complete=True, participants={node: 0}, last_heartbeats={node: datetime.now(utc)})
    with FileStore(str(path), world_size=-1) as store:
        store.set("torch.rendezvous.live", base64.b64encode(encode_state(fresh)))
    assert main(["inspect", str(path), "--json"]) == 0
    (live,) = json.loads(capsys.readouterr().out)["rendezvous"]
    assert live["overdue"] == [] and 0 <= live["participants"][0]["heartbeat_age_s"] < 60
    assert main(["inspect", f"file://{path}"]) == 0
    assert "no overdue heartbeats (limit 15 s)" in capsys.readouterr().out


def test_cli_failures_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing" / "file")]) == 1
    assert "cannot read the FileStore file" in capsys.readouterr().err
    assert main(["inspect", "127.0.0.1:1", "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rdzv-store: error: ") and err.count("\n") == 1


def test_deadline_in_the_future_and_naive_now(server: TCPStore) -> None:
    early = datetime(2026, 12, 1, 11, 59, 50)  # naive: taken as UTC
    (job,) = inspect_store(server, run_id="job", now=early)["rendezvous"]
    assert job["deadline_in_s"] == pytest.approx(10.123456, abs=1e-3)
    assert all(p["heartbeat_age_s"] < 0 for p in job["participants"])  # beats "in the future": skew shown
    assert "in the future (clock skew?)" in render_text(inspect_store(server, run_id="job", now=early))
