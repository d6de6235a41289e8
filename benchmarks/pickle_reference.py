"""C pickle, the reference the codec benchmark measures against (run as a child by bench_codec.py).

This is the one file of the project that imports a pickle module, and the no-pickle rule
(tests/test_security_no_pickle.py) exempts it by name: it only ever loads bytes that
bench_codec.py itself encoded from states it built, read from a temporary file that process
wrote; it never touches a store, a socket or user input. Torch's own pickle is what our codec is
compared with, so measuring anything else would not answer the question.

Reads ``{"path", "reps"}`` as JSON on stdin; prints the timings as JSON.
"""
import json, sys, time, types, dataclasses, hashlib
mod = types.ModuleType("torch.distributed.elastic.rendezvous.dynamic_rendezvous")
@dataclasses.dataclass(eq=True, order=True, frozen=True)
class _NodeDesc:
    addr: str
    pid: int
    local_id: int
class _RendezvousState:
    pass
for cls in (_NodeDesc, _RendezvousState):
    cls.__module__ = mod.__name__
    setattr(mod, cls.__name__, cls)
for name in ("torch", "torch.distributed", "torch.distributed.elastic", "torch.distributed.elastic.rendezvous"):
    sys.modules.setdefault(name, types.ModuleType(name))
sys.modules[mod.__name__] = mod
import _pickle
req = json.load(sys.stdin)
data = open(req["path"], "rb").read()
obj = _pickle.loads(data); _pickle.dumps(obj, 4)
loads, dumps = [], []
for _ in range(req["reps"]):
    t = time.perf_counter(); obj = _pickle.loads(data); loads.append(time.perf_counter() - t)
    t = time.perf_counter(); out = _pickle.dumps(obj, 4); dumps.append(time.perf_counter() - t)
print(json.dumps({"loads": loads, "dumps": dumps, "dumps_len": len(out),
                  "dumps_sha": hashlib.sha256(out).hexdigest(), "python": sys.version.split()[0]}))
