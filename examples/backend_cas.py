"""Two processes agree on one shared state through ``create_backend``, with compare-and-set retries.

Each process builds its backend from launcher-style parameters, adds its name
to a shared JSON document with a read/modify/compare-and-set loop (retrying
on the winner's state when it loses a race), waits for the other, and prints
the state it ends up with. Both print the same document.

    python examples/backend_cas.py          # over tcp, then over file
    python examples/backend_cas.py tcp      # or just one of them

Over tcp, the first process hosts the store on an ephemeral port; the second
is given that port and left to guess ``is_host``: its endpoint is a loopback
address, so it guesses "host", finds the port taken and connects as a client.
Over file, both open the same store file.

The state is JSON, never pickle: store contents are network data.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from rdzv_backend import C10dRendezvousBackend, RendezvousParameters, create_backend
from rdzv_store import Store

RUN_ID = "backend-cas-example"
MEMBERS = 2
TIMEOUT = timedelta(seconds=30)


def join(backend: C10dRendezvousBackend, name: str, max_attempts: int = 100) -> dict[str, Any]:
    """Add ``name`` to the shared member list: read, modify, compare-and-set, retry."""
    current = backend.get_state()
    state, token = current if current is not None else (None, None)
    for _ in range(max_attempts):
        doc = json.loads(state) if state else {"members": []}
        if name in doc["members"]:
            return doc
        doc["members"].append(name)
        # With token None this only succeeds if there is no state yet.
        reply = backend.set_state(json.dumps(doc).encode(), token)
        if reply is None:
            raise RuntimeError("the rendezvous state was deleted")
        state, token, has_set = reply
        if has_set:
            return json.loads(state)
        # Lost the race: state and token are now the winner's; decide again on them.
        # (has_set compares bytes, so writes must differ per writer: here, by name.)
    raise RuntimeError(f"{name} could not update the state in {max_attempts} attempts")


def agree(endpoint: str, store_type: str, name: str) -> dict[str, Any]:
    """Join the shared state, wait for every member, and return the agreed state."""
    params = RendezvousParameters(
        backend="c10d",
        endpoint=endpoint,
        run_id=RUN_ID,
        min_nodes=MEMBERS,
        max_nodes=MEMBERS,
        store_type=store_type,
        read_timeout=str(int(TIMEOUT.total_seconds())),
    )
    backend, store = create_backend(params)
    with store:
        return _agree(backend, store, name)


def _agree(backend: C10dRendezvousBackend, store: Store, name: str) -> dict[str, Any]:
    doc = join(backend, name)
    # The store that comes with the backend is for the job's own keys: a barrier here.
    slot = doc["members"].index(name)
    store.set(f"{RUN_ID}/joined/{slot}", name)
    store.wait([f"{RUN_ID}/joined/{i}" for i in range(MEMBERS)], TIMEOUT)
    final = backend.get_state()
    assert final is not None
    return json.loads(final[0])


def run(store_type: str) -> dict[str, Any]:
    """Process A here, process B as a child; check that both agree."""
    with tempfile.TemporaryDirectory() as directory:
        if store_type == "file":
            endpoint = str(Path(directory) / "store")
            host_params: dict[str, Any] = {}
        else:
            endpoint = "127.0.0.1:0"  # port 0: the host picks a free port
            host_params = {"is_host": "true"}

        params = RendezvousParameters(
            "c10d", endpoint, RUN_ID, MEMBERS, MEMBERS, store_type=store_type, **host_params
        )
        backend, store = create_backend(params)
        with store:
            if store_type == "tcp":
                endpoint = f"127.0.0.1:{store.port}"  # type: ignore[attr-defined]
            child = subprocess.Popen(
                [sys.executable, __file__, "--member", store_type, endpoint, "B"],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                mine = _agree(backend, store, "A")
                out, _ = child.communicate(timeout=TIMEOUT.total_seconds() * 2)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            # The store (and, over tcp, its server) stays up until B is done with it.
        if child.returncode != 0:
            raise RuntimeError(f"member B failed with exit code {child.returncode}")
        theirs = json.loads(out)
        if mine != theirs or sorted(mine["members"]) != ["A", "B"]:
            raise RuntimeError(f"no agreement: A saw {mine}, B saw {theirs}")
        return mine


def main(argv: list[str]) -> int:
    if argv[:1] == ["--member"]:
        store_type, endpoint, name = argv[1:4]
        print(json.dumps(agree(endpoint, store_type, name)))
        return 0
    for store_type in argv or ["tcp", "file"]:
        state = run(store_type)
        print(f"{store_type}: both processes agree on {json.dumps(state)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
