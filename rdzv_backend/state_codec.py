"""Sans-I/O codec for torch 2.13's rendezvous state bytes, without pickle.

torch's ``DynamicRendezvousHandler`` stores ``pickle.dumps(_RendezvousState)`` (base64-encoded by
the c10d backend) in the store; every torch agent ``pickle.loads`` whatever it finds there, so
anyone who can reach the store port can run code in every torch agent. This module reads and
writes those bytes for exactly the classes torch stores
(``../shared/reference/dynamic-rendezvous.md`` §4) and for nothing else:

* :func:`decode_state` interprets an allowlisted subset of pickle opcodes (:data:`ALLOWED_OPCODES`)
  and exactly eight ``(module, name)`` globals (:data:`ALLOWED_GLOBALS`) into the plain dataclasses
  of :mod:`rdzv_backend.state`. Globals are tokens compared against the allowlist, never imported
  or called; nothing read is ever executed. It works on ``bytes`` only (no I/O), in time linear in
  the input and memory bounded by the limits below. Every failure is a
  :class:`~rdzv_backend.api.RendezvousStateError`.
* :func:`encode_state` writes bytes that torch 2.13's ``pickle.loads`` turns back into the same
  state, in CPython's exact protocol-4 layout (the reference's P4 vectors re-encode byte for byte).
* :func:`state_to_json` / :func:`state_from_json`: the JSON view used by the samples file's
  ``decoded`` fields, ``rdzv-store inspect --json`` and users.

This module must never import ``pickle``, ``_pickle``, ``copyreg``, ``marshal`` or ``pickletools``
(``tests/test_security_no_pickle.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Callable

from .api import RendezvousStateError
from .state import NodeDesc, RendezvousState

__all__ = [
    "ALLOWED_GLOBALS",
    "ALLOWED_OPCODES",
    "CORRUPT_STATE_MESSAGE",
    "MAX_ADDR_BYTES",
    "MAX_GLOBAL_LINE",
    "MAX_LONG1_BYTES",
    "MAX_MARK_DEPTH",
    "MAX_MEMO_ENTRIES",
    "MAX_NODES",
    "MAX_STACK_DEPTH",
    "MAX_STATE_BYTES",
    "MAX_WORK_PER_BYTE",
    "StateDecodeError",
    "TORCH_MODULE",
    "decode_state",
    "encode_state",
    "state_from_json",
    "state_to_json",
]

#: torch's verbatim message (``_BackendRendezvousStateHolder._sync``); ours adds the detail after it.
CORRUPT_STATE_MESSAGE = "The rendezvous state is corrupt. See inner exception for details."

#: The module torch's two classes live in (the exact path every writer must name).
TORCH_MODULE = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"

# ---------------------------------------------------------------------------------------------
# Limits. Each bounds time or memory against a hostile value; each is far above what torch writes.
# ---------------------------------------------------------------------------------------------

#: Largest decoded (raw, not base64) state accepted. A 4096-node state with 38-byte host names is
#: 405 KB in P4 and 626 KB in P2 (reference §6.1; about 60 + len(addr) bytes a node), so 8 MiB
#: holds about 50 000 such nodes in P4 (30 000 in P2), several times the largest jobs known, while
#: bounding everything below (every object we build costs at least one input byte).
MAX_STATE_BYTES = 8 * 1024 * 1024

#: Longest node address, in UTF-8 bytes. A DNS name is at most 253 bytes and an IPv6 literal with
#: a zone about 60; 1024 leaves room for odd ``local_addr`` values. It also bounds how much one
#: shared (memoized) address string can be amplified by views that print it once per node.
MAX_ADDR_BYTES = 1024

#: Most distinct ``_NodeDesc`` objects in one state (each costs at least ~25 input bytes, so this
#: is also implied by MAX_STATE_BYTES; being explicit bounds views that list every node).
MAX_NODES = 1 << 17

#: Deepest MARK nesting. torch's state needs 3 (state dict, a container, a node dict); anything
#: deeper is not a state.
MAX_MARK_DEPTH = 16

#: Most stack entries at any moment. CPython batches container items by 1000 (2000 stack entries
#: for a dict batch); this also admits an unbatched writer's dict of 65 000 entries.
MAX_STACK_DEPTH = 1 << 17

#: Most memo entries. CPython memoizes about 8 objects per node with a heartbeat (2^20 entries is
#: 130 000 nodes); each entry costs at least one input byte too, this bounds a sparse BINPUT memo.
MAX_MEMO_ENTRIES = 1 << 20

#: Longest int accepted in LONG1, in bytes. Every int in a state fits in a signed 64-bit value (9
#: bytes as LONG1 at most); 16 keeps int conversion and hashing O(1).
MAX_LONG1_BYTES = 16

#: Longest ``module\\nname\\n`` line of the GLOBAL opcode we scan for (the longest allowed module
#: name has 55 characters): the scan for the newline stops here, keeping it O(1) per opcode.
MAX_GLOBAL_LINE = 128

#: Work budget: the only opcode whose cost is not proportional to its own bytes is building a set
#: from a list (P2/P3 sets are ``REDUCE(set, ([items],))`` and the list may be a memo reference).
#: Each member copied costs one unit; the total may not exceed this many units per input byte.
MAX_WORK_PER_BYTE = 4

#: Most str keys in one dict: only attribute dicts have str keys (8 in torch's state, 3 in a
#: node), so a dict stuffed with strings (a hash-collision flood, should the hash seed be known) stops here.
_MAX_STR_KEYS = 8

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1

#: The eight ``(module, name)`` pairs torch 2.13's state pickles name (protocols 2-5), and what each
#: becomes here. Nothing is imported: a GLOBAL is compared with these tuples and turned into a token.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (TORCH_MODULE, "_RendezvousState"),
        (TORCH_MODULE, "_NodeDesc"),
        ("datetime", "datetime"),
        ("datetime", "timezone"),
        ("datetime", "timedelta"),
        ("__builtin__", "set"),  # protocol 2 (fix_imports); refused in 3+ as torch's loads would
        ("builtins", "set"),
        ("_codecs", "encode"),  # protocol 2 writes bytes as _codecs.encode(latin-1 text, "latin1")
    }
)

# Opcodes (pickletools names). Only these are ever interpreted.
_MARK = 0x28  # (
_STOP = 0x2E  # .
_BININT = 0x4A  # J
_BININT1 = 0x4B  # K
_BININT2 = 0x4D  # M
_NONE = 0x4E  # N
_REDUCE = 0x52  # R
_BINUNICODE = 0x58  # X
_APPEND = 0x61  # a
_BUILD = 0x62  # b
_GLOBAL = 0x63  # c
_APPENDS = 0x65  # e
_BINGET = 0x68  # h
_LONG_BINGET = 0x6A  # j
_BINPUT = 0x71  # q
_LONG_BINPUT = 0x72  # r
_SETITEM = 0x73  # s
_SETITEMS = 0x75  # u
_EMPTY_DICT = 0x7D  # }
_EMPTY_LIST = 0x5D  # ]
_EMPTY_TUPLE = 0x29  # )
_SHORT_BINBYTES = 0x43  # C
_PROTO = 0x80
_NEWOBJ = 0x81
_TUPLE1 = 0x85
_TUPLE2 = 0x86
_TUPLE3 = 0x87
_NEWTRUE = 0x88
_NEWFALSE = 0x89
_LONG1 = 0x8A
_SHORT_BINUNICODE = 0x8C
_EMPTY_SET = 0x8F
_ADDITEMS = 0x90
_STACK_GLOBAL = 0x93
_MEMOIZE = 0x94
_FRAME = 0x95

#: Opcode byte -> pickletools name: every opcode torch 2.13 writes for a state in protocols 2-5
#: (reference §4.4). Any other byte in opcode position is refused.
ALLOWED_OPCODES: dict[int, str] = {
    _PROTO: "PROTO",
    _FRAME: "FRAME",
    _GLOBAL: "GLOBAL",
    _STACK_GLOBAL: "STACK_GLOBAL",
    _BINPUT: "BINPUT",
    _LONG_BINPUT: "LONG_BINPUT",
    _MEMOIZE: "MEMOIZE",
    _BINGET: "BINGET",
    _LONG_BINGET: "LONG_BINGET",
    _MARK: "MARK",
    _EMPTY_TUPLE: "EMPTY_TUPLE",
    _TUPLE1: "TUPLE1",
    _TUPLE2: "TUPLE2",
    _TUPLE3: "TUPLE3",
    _NEWOBJ: "NEWOBJ",
    _BUILD: "BUILD",
    _REDUCE: "REDUCE",
    _EMPTY_DICT: "EMPTY_DICT",
    _SETITEM: "SETITEM",
    _SETITEMS: "SETITEMS",
    _EMPTY_LIST: "EMPTY_LIST",
    _APPEND: "APPEND",
    _APPENDS: "APPENDS",
    _EMPTY_SET: "EMPTY_SET",
    _ADDITEMS: "ADDITEMS",
    _BINUNICODE: "BINUNICODE",
    _SHORT_BINUNICODE: "SHORT_BINUNICODE",
    _SHORT_BINBYTES: "SHORT_BINBYTES",
    _BININT: "BININT",
    _BININT1: "BININT1",
    _BININT2: "BININT2",
    _LONG1: "LONG1",
    _NEWTRUE: "NEWTRUE",
    _NEWFALSE: "NEWFALSE",
    _NONE: "NONE",
    _STOP: "STOP",
}

#: Names of the pickle opcodes we refuse, for error messages only (never interpreted).
_REFUSED_OPCODE_NAMES: dict[int, str] = {
    0x30: "POP", 0x31: "POP_MARK", 0x32: "DUP", 0x46: "FLOAT", 0x49: "INT", 0x4C: "LONG",
    0x50: "PERSID", 0x51: "BINPERSID", 0x53: "STRING", 0x54: "BINSTRING", 0x55: "SHORT_BINSTRING",
    0x56: "UNICODE", 0x64: "DICT", 0x67: "GET", 0x69: "INST", 0x6C: "LIST", 0x6F: "OBJ", 0x70: "PUT",
    0x74: "TUPLE", 0x47: "BINFLOAT", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4", 0x8B: "LONG4",
    0x42: "BINBYTES", 0x8D: "BINUNICODE8", 0x8E: "BINBYTES8", 0x91: "FROZENSET", 0x92: "NEWOBJ_EX",
    0x96: "BYTEARRAY8", 0x97: "NEXT_BUFFER", 0x98: "READONLY_BUFFER",
}

_STATE_FIELDS = (
    "round",
    "complete",
    "deadline",
    "closed",
    "participants",
    "wait_list",
    "redundancy_list",
    "last_heartbeats",
)
_STATE_FIELDS_OLD = frozenset(_STATE_FIELDS) - {"redundancy_list"}
_STATE_FIELDS_SET = frozenset(_STATE_FIELDS)
_NODE_FIELDS = frozenset({"addr", "pid", "local_id"})
_NODE_FIELDS_OLD = frozenset({"fqdn", "pid", "local_id"})


class StateDecodeError(ValueError):
    """What :func:`decode_state` refused, and where: the ``__cause__`` of its RendezvousStateError.

    Attributes:
        reason: What was refused, in words (``"GLOBAL os.system is not allowed"``).
        offset: Byte offset in the raw (not base64) state of the opcode being interpreted, or
            ``None`` for a failure of the state as a whole (a wrong type of an attribute).
    """

    def __init__(self, reason: str, offset: int | None) -> None:
        self.reason = reason
        self.offset = offset
        where = f" at byte offset {offset}" if offset is not None else ""
        super().__init__(f"{reason}{where}")


# Tokens for the allowlisted globals (plain strings: never callables).
_G_STATE = "rendezvous_state"
_G_NODE = "node_desc"
_G_DATETIME = "datetime"
_G_TIMEZONE = "timezone"
_G_TIMEDELTA = "timedelta"
_G_SET = "set"
_G_ENCODE = "codecs_encode"

_GLOBAL_TOKENS: dict[tuple[str, str], str] = {
    (TORCH_MODULE, "_RendezvousState"): _G_STATE,
    (TORCH_MODULE, "_NodeDesc"): _G_NODE,
    ("datetime", "datetime"): _G_DATETIME,
    ("datetime", "timezone"): _G_TIMEZONE,
    ("datetime", "timedelta"): _G_TIMEDELTA,
    ("__builtin__", "set"): _G_SET,
    ("builtins", "set"): _G_SET,
    ("_codecs", "encode"): _G_ENCODE,
}
assert frozenset(_GLOBAL_TOKENS) == ALLOWED_GLOBALS


class _Global:
    """A resolved allowlisted global on the stack: a token, never the real object."""

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token


class _Obj:
    """A NEWOBJ result before and after its BUILD (memoized before BUILD, so it must be mutable).

    For a node, ``value`` becomes the finished :class:`NodeDesc` at BUILD; for the state, the
    snapshot of its attribute dict (BUILD copies the dict, as ``__dict__.update`` does).
    """

    __slots__ = ("kind", "value", "offset")

    def __init__(self, kind: str, offset: int) -> None:
        self.kind = kind
        self.value: Any = None
        self.offset = offset


def _type_name(value: Any) -> str:
    if isinstance(value, _Obj):
        return "_NodeDesc" if value.kind == _G_NODE else "_RendezvousState"
    if isinstance(value, _Global):
        return f"global {value.token}"
    return type(value).__name__


def _valid_int64(value: Any) -> bool:
    return type(value) is int and _INT64_MIN <= value <= _INT64_MAX


class _Decoder:
    """One decode: a single forward pass over ``data``; no recursion anywhere."""

    def __init__(self, data: bytes, max_bytes: int) -> None:
        if len(data) > max_bytes:
            raise StateDecodeError(f"state of {len(data)} bytes exceeds the limit of {max_bytes} bytes", 0)
        self.data = data
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.proto = 0
        self.nodes = 0
        self.work_left = MAX_WORK_PER_BYTE * len(data) + 1024
        self.steps = 0  # opcodes interpreted; exposed for the linear-time test

    # -- helpers -------------------------------------------------------------------------------

    def _need(self, pos: int, n: int, what: str, at: int) -> None:
        if pos + n > len(self.data):
            raise StateDecodeError(f"truncated state: {what} needs {n} bytes, {len(self.data) - pos} left", at)

    def _pop(self, at: int, name: str) -> Any:
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) <= floor:
            raise StateDecodeError(f"{name} on an empty stack", at)
        return self.stack.pop()

    def _pop_n(self, n: int, at: int, name: str) -> list[Any]:
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) - floor < n:
            raise StateDecodeError(f"{name} needs {n} stack items", at)
        items = self.stack[-n:]
        del self.stack[-n:]
        return items

    def _pop_mark(self, at: int, name: str) -> list[Any]:
        if not self.marks:
            raise StateDecodeError(f"{name} without a MARK", at)
        floor = self.marks.pop()
        items = self.stack[floor:]
        del self.stack[floor:]
        return items

    def _push(self, value: Any, at: int) -> None:
        if len(self.stack) >= MAX_STACK_DEPTH:
            raise StateDecodeError(f"stack deeper than {MAX_STACK_DEPTH}", at)
        self.stack.append(value)

    def _top(self, at: int, name: str) -> Any:
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) <= floor:
            raise StateDecodeError(f"{name} on an empty stack", at)
        return self.stack[-1]

    def _memo_put(self, index: int, at: int, name: str) -> None:
        value = self._top(at, name)
        if index not in self.memo and len(self.memo) >= MAX_MEMO_ENTRIES:
            raise StateDecodeError(f"memo larger than {MAX_MEMO_ENTRIES} entries", at)
        self.memo[index] = value

    def _memo_get(self, index: int, at: int, name: str) -> None:
        try:
            value = self.memo[index]
        except KeyError:
            raise StateDecodeError(f"{name} {index} of a memo entry never stored", at) from None
        self._push(value, at)

    def _hashable(self, value: Any, at: int, what: str, keys_ok: bool) -> Any:
        """A dict key (str or finished node) or set member (finished node), resolved."""
        if isinstance(value, _Obj):
            if value.kind != _G_NODE:
                raise StateDecodeError(f"{what} is a _RendezvousState", at)
            if value.value is None:
                # torch fails here too: hashing a node before BUILD raises AttributeError.
                raise StateDecodeError(f"{what} is a _NodeDesc used before its BUILD", at)
            return value.value
        if keys_ok and type(value) is str:
            return value
        raise StateDecodeError(f"{what} of type {_type_name(value)} is not allowed", at)

    def _string(self, pos: int, n: int, at: int, name: str) -> str:
        self._need(pos, n, name, at)
        try:
            return self.data[pos : pos + n].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            raise StateDecodeError(f"{name} is not UTF-8 ({exc.reason})", at) from None

    def _resolve_global(self, module: Any, name: Any, at: int) -> _Global:
        if type(module) is not str or type(name) is not str:
            raise StateDecodeError("STACK_GLOBAL arguments are not two strings", at)
        token = _GLOBAL_TOKENS.get((module, name))
        if token is None or (module == "__builtin__" and self.proto >= 3):
            shown = f"{module[:80]!r}, {name[:80]!r}"
            raise StateDecodeError(f"GLOBAL ({shown}) is not allowed", at)
        return _Global(token)

    # -- REDUCE, NEWOBJ, BUILD -----------------------------------------------------------------

    def _reduce(self, func: Any, args: Any, at: int) -> Any:
        if not isinstance(func, _Global):
            raise StateDecodeError(f"REDUCE of a {_type_name(func)}", at)
        if type(args) is not tuple:
            raise StateDecodeError(f"REDUCE arguments are a {_type_name(args)}, not a tuple", at)
        token = func.token
        n = len(args)
        if token == _G_DATETIME:
            if n not in (1, 2) or type(args[0]) is not bytes or len(args[0]) != 10:
                raise StateDecodeError("datetime() takes (10 bytes[, tzinfo])", at)
            tz = args[1] if n == 2 else None
            if n == 2 and not isinstance(tz, timezone):
                raise StateDecodeError(f"datetime tzinfo is a {_type_name(tz)}, not a timezone", at)
            return _datetime_from_state(args[0], tz, at)
        if token == _G_TIMEZONE:
            if n not in (1, 2) or type(args[0]) is not timedelta or (n == 2 and type(args[1]) is not str):
                raise StateDecodeError("timezone() takes (timedelta[, name])", at)
            try:
                return timezone(*args)
            except (ValueError, TypeError) as exc:
                raise StateDecodeError(f"invalid timezone: {exc}", at) from None
        if token == _G_TIMEDELTA:
            if n != 3 or not all(type(a) is int for a in args):
                raise StateDecodeError("timedelta() takes (days, seconds, microseconds) ints", at)
            days, seconds, micros = args
            if not (-999999999 <= days <= 999999999 and 0 <= seconds < 86400 and 0 <= micros < 1000000):
                raise StateDecodeError("timedelta() arguments out of range", at)
            return timedelta(days, seconds, micros)
        if token == _G_SET:
            if n != 1 or type(args[0]) is not list:
                raise StateDecodeError("set() takes ([items],)", at)
            items = args[0]
            self.work_left -= len(items)
            if self.work_left < 0:
                raise StateDecodeError("too much work for the input size (a list reused as set contents)", at)
            return {self._hashable(item, at, "set member", keys_ok=False) for item in items}
        if token == _G_ENCODE:
            if n != 2 or type(args[0]) is not str or args[1] != "latin1" or type(args[1]) is not str:
                raise StateDecodeError('_codecs.encode() takes (text, "latin1")', at)
            try:
                return args[0].encode("latin-1")
            except UnicodeEncodeError:
                raise StateDecodeError("_codecs.encode() text is not latin-1", at) from None
        raise StateDecodeError(f"REDUCE of {token} is not allowed", at)

    def _build(self, obj: Any, state: Any, at: int) -> None:
        if not isinstance(obj, _Obj):
            raise StateDecodeError(f"BUILD of a {_type_name(obj)}", at)
        if obj.value is not None:
            raise StateDecodeError("BUILD of an object already built", at)
        if type(state) is not dict:
            raise StateDecodeError(f"BUILD state is a {_type_name(state)}, not a dict", at)
        if obj.kind == _G_NODE:
            if len(state) != 3 or (state.keys() != _NODE_FIELDS and state.keys() != _NODE_FIELDS_OLD):
                raise StateDecodeError(f"_NodeDesc attributes {_names(state)} are not addr, pid, local_id", at)
            addr = state["addr"] if "addr" in state else state["fqdn"]
            pid, local_id = state["pid"], state["local_id"]
            if type(addr) is not str:
                raise StateDecodeError(f"_NodeDesc.addr is a {_type_name(addr)}, not a str", at)
            if len(addr) > MAX_ADDR_BYTES or len(addr.encode("utf-8", "surrogatepass")) > MAX_ADDR_BYTES:
                raise StateDecodeError(f"_NodeDesc.addr longer than {MAX_ADDR_BYTES} bytes", at)
            if not _valid_int64(pid) or not _valid_int64(local_id):
                raise StateDecodeError("_NodeDesc.pid and local_id must be signed 64-bit ints", at)
            obj.value = NodeDesc(addr, pid, local_id)
        else:
            if len(state) > len(_STATE_FIELDS) or not (state.keys() == _STATE_FIELDS_SET or state.keys() == _STATE_FIELDS_OLD):
                raise StateDecodeError(f"_RendezvousState attributes {_names(state)} are not torch 2.13's", at)
            obj.value = dict(state)

    # -- the interpreter -----------------------------------------------------------------------

    def run(self) -> Any:
        data = self.data
        size = len(data)
        stack = self.stack
        if size < 2 or data[0] != _PROTO:
            raise StateDecodeError("not a pickle: the first opcode is not PROTO" if size else "empty state", 0)
        memo = self.memo
        marks = self.marks
        pos = 0
        steps = 0
        try:
            while True:
                if pos >= size:
                    raise StateDecodeError("truncated state: no STOP", pos)
                if len(stack) > MAX_STACK_DEPTH:  # every opcode pushes at most one item
                    raise StateDecodeError(f"stack deeper than {MAX_STACK_DEPTH}", pos)
                at = pos
                op = data[pos]
                pos += 1
                steps += 1
                if op == _BINGET:
                    try:
                        stack.append(memo[data[pos]])
                    except (KeyError, IndexError):
                        self._need(pos, 1, "BINGET", at)
                        self._memo_get(data[pos], at, "BINGET")
                    pos += 1
                elif op == _MEMOIZE:
                    if len(stack) > (marks[-1] if marks else 0) and len(memo) < MAX_MEMO_ENTRIES:
                        memo[len(memo)] = stack[-1]
                    else:
                        self._memo_put(len(memo), at, "MEMOIZE")
                elif op == _SHORT_BINUNICODE:
                    if pos + 1 > size:
                        self._need(pos, 1, "SHORT_BINUNICODE", at)
                    n = data[pos]
                    stack.append(self._string(pos + 1, n, at, "SHORT_BINUNICODE"))
                    pos += 1 + n
                elif op == _BININT1:
                    if pos + 1 > size:
                        self._need(pos, 1, "BININT1", at)
                    stack.append(data[pos])
                    pos += 1
                elif op == _BININT2:
                    if pos + 2 > size:
                        self._need(pos, 2, "BININT2", at)
                    stack.append(data[pos] | (data[pos + 1] << 8))
                    pos += 2
                elif op == _BININT:
                    if pos + 4 > size:
                        self._need(pos, 4, "BININT", at)
                    stack.append(int.from_bytes(data[pos : pos + 4], "little", signed=True))
                    pos += 4
                elif op == _LONG1:
                    if pos + 1 > size:
                        self._need(pos, 1, "LONG1", at)
                    n = data[pos]
                    if n > MAX_LONG1_BYTES:
                        raise StateDecodeError(f"LONG1 of {n} bytes exceeds {MAX_LONG1_BYTES}", at)
                    self._need(pos + 1, n, "LONG1", at)
                    stack.append(int.from_bytes(data[pos + 1 : pos + 1 + n], "little", signed=True))
                    pos += 1 + n
                elif op == _EMPTY_TUPLE:
                    stack.append(())
                elif op == _NEWOBJ:
                    args = self._pop(at, "NEWOBJ")
                    cls = self._pop(at, "NEWOBJ")
                    if not isinstance(cls, _Global) or cls.token not in (_G_STATE, _G_NODE):
                        raise StateDecodeError(f"NEWOBJ of {_type_name(cls)} (only the two torch classes)", at)
                    if args != () or type(args) is not tuple:
                        raise StateDecodeError("NEWOBJ arguments are not ()", at)
                    if cls.token == _G_NODE:
                        self.nodes += 1
                        if self.nodes > MAX_NODES:
                            raise StateDecodeError(f"more than {MAX_NODES} nodes", at)
                    stack.append(_Obj(cls.token, at))
                elif op == _EMPTY_DICT:
                    stack.append({})
                elif op == _MARK:
                    if len(self.marks) >= MAX_MARK_DEPTH:
                        raise StateDecodeError(f"MARK nesting deeper than {MAX_MARK_DEPTH}", at)
                    self.marks.append(len(stack))
                elif op == _SETITEMS or op == _SETITEM:
                    name = ALLOWED_OPCODES[op]
                    items = self._pop_mark(at, name) if op == _SETITEMS else self._pop_n(2, at, name)
                    if len(items) % 2:
                        raise StateDecodeError(f"{name} with an odd number of items", at)
                    target = self._top(at, name)
                    if type(target) is not dict:
                        raise StateDecodeError(f"{name} on a {_type_name(target)}", at)
                    for i in range(0, len(items), 2):
                        key = self._hashable(items[i], at, "dict key", keys_ok=True)
                        if type(key) is str and len(target) >= _MAX_STR_KEYS and key not in target:
                            # only attribute dicts have str keys (8 at most): no flood of str keys
                            raise StateDecodeError(f"a dict with more than {_MAX_STR_KEYS} str keys", at)
                        target[key] = items[i + 1]
                elif op == _BUILD:
                    state = self._pop(at, "BUILD")
                    self._build(self._top(at, "BUILD"), state, at)
                elif op == _TUPLE1 or op == _TUPLE2 or op == _TUPLE3:
                    n = op - _TUPLE1 + 1
                    items = self._pop_n(n, at, ALLOWED_OPCODES[op])
                    for item in items:
                        if type(item) is tuple:
                            raise StateDecodeError("nested tuple (no state needs one)", at)
                    stack.append(tuple(items))
                elif op == _REDUCE:
                    args = self._pop(at, "REDUCE")
                    func = self._pop(at, "REDUCE")
                    stack.append(self._reduce(func, args, at))
                elif op == _STACK_GLOBAL:
                    name_ = self._pop(at, "STACK_GLOBAL")
                    module = self._pop(at, "STACK_GLOBAL")
                    stack.append(self._resolve_global(module, name_, at))
                elif op == _SHORT_BINBYTES:
                    if pos + 1 > size:
                        self._need(pos, 1, "SHORT_BINBYTES", at)
                    n = data[pos]
                    self._need(pos + 1, n, "SHORT_BINBYTES", at)
                    stack.append(bytes(data[pos + 1 : pos + 1 + n]))
                    pos += 1 + n
                elif op == _NEWTRUE:
                    stack.append(True)
                elif op == _NEWFALSE:
                    stack.append(False)
                elif op == _NONE:
                    stack.append(None)
                elif op == _EMPTY_SET:
                    stack.append(set())
                elif op == _ADDITEMS:
                    items = self._pop_mark(at, "ADDITEMS")
                    target = self._top(at, "ADDITEMS")
                    if type(target) is not set:
                        raise StateDecodeError(f"ADDITEMS on a {_type_name(target)}", at)
                    for item in items:
                        target.add(self._hashable(item, at, "set member", keys_ok=False))
                elif op == _EMPTY_LIST:
                    stack.append([])
                elif op == _APPEND or op == _APPENDS:
                    name = ALLOWED_OPCODES[op]
                    items = self._pop_mark(at, name) if op == _APPENDS else [self._pop(at, name)]
                    target = self._top(at, name)
                    if type(target) is not list:
                        raise StateDecodeError(f"{name} on a {_type_name(target)}", at)
                    target.extend(items)
                elif op == _LONG_BINGET:
                    if pos + 4 > size:
                        self._need(pos, 4, "LONG_BINGET", at)
                    self._memo_get(int.from_bytes(data[pos : pos + 4], "little"), at, "LONG_BINGET")
                    pos += 4
                elif op == _BINPUT:
                    if pos + 1 > size:
                        self._need(pos, 1, "BINPUT", at)
                    self._memo_put(data[pos], at, "BINPUT")
                    pos += 1
                elif op == _LONG_BINPUT:
                    if pos + 4 > size:
                        self._need(pos, 4, "LONG_BINPUT", at)
                    self._memo_put(int.from_bytes(data[pos : pos + 4], "little"), at, "LONG_BINPUT")
                    pos += 4
                elif op == _BINUNICODE:
                    if pos + 4 > size:
                        self._need(pos, 4, "BINUNICODE", at)
                    n = int.from_bytes(data[pos : pos + 4], "little")
                    stack.append(self._string(pos + 4, n, at, "BINUNICODE"))
                    pos += 4 + n
                elif op == _GLOBAL:
                    end1 = data.find(b"\n", pos, pos + MAX_GLOBAL_LINE)
                    end2 = data.find(b"\n", end1 + 1, end1 + 1 + MAX_GLOBAL_LINE) if end1 >= 0 else -1
                    if end2 < 0:
                        if size - pos < 2 * MAX_GLOBAL_LINE and data.count(b"\n", pos) < 2:
                            raise StateDecodeError("truncated state: GLOBAL without two lines", at)
                        raise StateDecodeError(f"GLOBAL names longer than {MAX_GLOBAL_LINE} bytes", at)
                    module = self._string(pos, end1 - pos, at, "GLOBAL module")
                    name_ = self._string(end1 + 1, end2 - end1 - 1, at, "GLOBAL name")
                    stack.append(self._resolve_global(module, name_, at))
                    pos = end2 + 1
                elif op == _FRAME:
                    if pos + 8 > size:
                        self._need(pos, 8, "FRAME", at)
                    frame = int.from_bytes(data[pos : pos + 8], "little")
                    pos += 8
                    if frame > size - pos:
                        raise StateDecodeError(f"truncated state: FRAME of {frame} bytes, {size - pos} left", at)
                elif op == _PROTO:
                    if at != 0:
                        raise StateDecodeError("PROTO after the start", at)
                    if pos + 1 > size:
                        self._need(pos, 1, "PROTO", at)
                    self.proto = data[pos]
                    if not 2 <= self.proto <= 5:
                        raise StateDecodeError(f"pickle protocol {self.proto} (only 2-5 are read)", at)
                    pos += 1
                elif op == _STOP:
                    if self.marks:
                        raise StateDecodeError("STOP with an open MARK", at)
                    if len(stack) != 1:
                        raise StateDecodeError(f"STOP with {len(stack)} objects on the stack (want 1)", at)
                    if pos != size:
                        raise StateDecodeError(f"{size - pos} bytes after STOP", at)
                    return stack.pop()
                else:
                    refused_name = _REFUSED_OPCODE_NAMES.get(op)
                    shown = f"{refused_name} (0x{op:02x})" if refused_name else f"0x{op:02x}"
                    raise StateDecodeError(f"opcode {shown} is not allowed", at)
        finally:
            self.steps = steps

def _names(state: Mapping[Any, Any]) -> str:
    shown = sorted(str(k)[:40] for k in list(state)[:12])
    return "[" + ", ".join(shown) + (", ...]" if len(state) > 12 else "]")


def _datetime_from_state(raw: bytes, tz: timezone | None, at: int) -> datetime:
    month = raw[2] & 0x7F
    fold = raw[2] >> 7
    try:
        return datetime(
            (raw[0] << 8) | raw[1],
            month,
            raw[3],
            raw[4],
            raw[5],
            raw[6],
            (raw[7] << 16) | (raw[8] << 8) | raw[9],
            tz,
            fold=fold,
        )
    except ValueError as exc:
        raise StateDecodeError(f"invalid datetime: {exc}", at) from None


def _finish(top: Any) -> RendezvousState:
    """Check the decoded object graph is a torch 2.13 state (types and ranges) and convert it."""
    if not isinstance(top, _Obj) or top.kind != _G_STATE:
        raise StateDecodeError(f"the pickled object is a {_type_name(top)}, not a _RendezvousState", None)
    attrs = top.value
    if attrs is None:
        raise StateDecodeError("the _RendezvousState was never built (no BUILD)", top.offset)

    def fail(name: str, want: str) -> StateDecodeError:
        return StateDecodeError(f"_RendezvousState.{name} is a {_type_name(attrs[name])}, not {want}", None)

    rnd = attrs["round"]
    if type(rnd) is not int or not 0 <= rnd <= _INT64_MAX:
        raise fail("round", "an int in 0..2**63-1")
    for name in ("complete", "closed"):
        if type(attrs[name]) is not bool:
            raise fail(name, "a bool")
    deadline = attrs["deadline"]
    if deadline is not None and type(deadline) is not datetime:
        raise fail("deadline", "a datetime or None")
    participants = attrs["participants"]
    if type(participants) is not dict:
        raise fail("participants", "a dict")
    for node, rank in participants.items():
        if type(node) is not NodeDesc:
            raise StateDecodeError(f"_RendezvousState.participants has a key of type {_type_name(node)}", None)
        if type(rank) is not int or not 0 <= rank <= _INT64_MAX:
            raise StateDecodeError(f"_RendezvousState.participants[{node}] is not an int in 0..2**63-1", None)
    sets: dict[str, set[NodeDesc] | None] = {}
    for name in ("wait_list", "redundancy_list"):
        if name not in attrs:
            sets[name] = None
            continue
        value = attrs[name]
        if type(value) is not set:  # members are NodeDesc by construction (_hashable)
            raise fail(name, "a set")
        sets[name] = set(value)  # copies: memo sharing must not alias two fields
    if sets["wait_list"] is None:
        raise StateDecodeError("_RendezvousState.wait_list is missing", None)
    heartbeats = attrs["last_heartbeats"]
    if type(heartbeats) is not dict:
        raise fail("last_heartbeats", "a dict")
    for node, beat in heartbeats.items():
        if type(node) is not NodeDesc:
            raise StateDecodeError(f"_RendezvousState.last_heartbeats has a key of type {_type_name(node)}", None)
        if type(beat) is not datetime:
            raise StateDecodeError(f"_RendezvousState.last_heartbeats[{node}] is not a datetime", None)
    return RendezvousState(
        round=rnd,
        complete=attrs["complete"],
        deadline=deadline,
        closed=attrs["closed"],
        participants=dict(participants),
        wait_list=sets["wait_list"],  # type: ignore[arg-type]
        redundancy_list=sets["redundancy_list"],
        last_heartbeats=dict(heartbeats),
    )


def decode_state(data: bytes, *, key: str | None = None, max_bytes: int = MAX_STATE_BYTES) -> RendezvousState:
    """Decode the raw (already base64-decoded) bytes torch stores for a rendezvous state.

    Reads pickle protocols 2-5 as torch 2.13 writes them (and older torch's naive datetimes, states
    without ``redundancy_list`` and nodes with ``fqdn`` instead of ``addr``, read as ``addr``),
    interpreting only :data:`ALLOWED_OPCODES` and :data:`ALLOWED_GLOBALS` into plain data. Runs in
    time linear in ``len(data)``, without recursion, in memory bounded by the module's limits.

    Args:
        data: The pickle bytes (for the c10d backend's base64 value, base64-decode first).
        key: The store key the bytes came from; named in the error message when given.
        max_bytes: Largest input accepted (default :data:`MAX_STATE_BYTES`).

    Returns:
        A new :class:`RendezvousState` (its sets and dicts are fresh; datetimes keep their tzinfo).

    Raises:
        RendezvousStateError: For anything else: an opcode or global outside the allowlist, a
            truncated stream, input over a limit, deep nesting, memo abuse, wrong shapes, types or
            ranges, bytes after STOP. The message starts with torch's verbatim
            ``The rendezvous state is corrupt. See inner exception for details.``, then names the
            key and what was refused at which byte offset; ``__cause__`` is a
            :class:`StateDecodeError` with ``reason`` and ``offset``.
    """
    try:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StateDecodeError(f"state is a {type(data).__name__}, not bytes", None)
        decoder = _Decoder(bytes(data), max_bytes)
        state = _finish(decoder.run())
    except StateDecodeError as exc:
        where = f" Key {key!r}:" if key is not None else ""
        raise RendezvousStateError(f"{CORRUPT_STATE_MESSAGE}{where} {exc}") from exc
    except (RecursionError, MemoryError) as exc:  # defensive: the decoder neither recurses nor grows unbounded
        where = f" Key {key!r}:" if key is not None else ""
        raise RendezvousStateError(f"{CORRUPT_STATE_MESSAGE}{where} {type(exc).__name__}") from StateDecodeError(
            type(exc).__name__, None
        )
    return state


def _decode_steps(data: bytes) -> int:
    """How many opcodes a decode of ``data`` interprets before it ends (for the linear-time test)."""
    decoder = _Decoder(bytes(data), MAX_STATE_BYTES)
    try:
        _finish(decoder.run())
    except StateDecodeError:
        pass
    return decoder.steps


# ---------------------------------------------------------------------------------------------
# Encoder: CPython's C pickler layout (protocol 4/5), or protocols 2/3 as CPython writes them.
# ---------------------------------------------------------------------------------------------

_FRAME_SIZE_TARGET = 64 * 1024
_BATCHSIZE = 1000
_UTC = timezone.utc

# Memo keys for objects the writer shares by identity in torch's process: interned attribute
# names, the class objects, the class-name strings and the module-name strings.
_K_TORCH_MODULE = ("str", "module:torch")
_K_DT_MODULE = ("str", "module:datetime")


class _Encoder:
    def __init__(self, protocol: int) -> None:
        self.proto = protocol
        self.out = bytearray()
        self.memo: dict[Any, int] = {}
        self.frame_start = -1  # offset of the current frame's contents, or -1 when not framing

    # -- framing and memo ----------------------------------------------------------------------

    def boundary(self) -> None:
        """Where CPython may end a frame: before an object is saved, once the frame is >= 64 KiB."""
        if self.frame_start >= 0 and len(self.out) - self.frame_start >= _FRAME_SIZE_TARGET:
            self._commit_frame()
            self.frame_start = len(self.out) + 9
            self.out += b"\x95" + bytes(8)

    def _commit_frame(self) -> None:
        length = len(self.out) - self.frame_start
        if length >= 4:
            self.out[self.frame_start - 8 : self.frame_start] = length.to_bytes(8, "little")
        else:  # CPython drops the header of a frame shorter than 4 bytes
            del self.out[self.frame_start - 9 : self.frame_start]

    def put(self, key: Any) -> None:
        idx = len(self.memo)
        self.memo[key] = idx
        if self.proto >= 4:
            self.out.append(_MEMOIZE)
        elif idx < 256:
            self.out += bytes((_BINPUT, idx))
        else:
            self.out.append(_LONG_BINPUT)
            self.out += idx.to_bytes(4, "little")

    def get(self, key: Any) -> bool:
        idx = self.memo.get(key)
        if idx is None:
            return False
        if idx < 256:
            self.out += bytes((_BINGET, idx))
        else:
            self.out.append(_LONG_BINGET)
            self.out += idx.to_bytes(4, "little")
        return True

    # -- values --------------------------------------------------------------------------------

    def save_str(self, text: str, key: Any = None) -> None:
        self.boundary()
        if key is None:
            key = ("id", id(text))
        if self.get(key):
            return
        raw = text.encode("utf-8", "surrogatepass")
        if self.proto >= 4 and len(raw) < 256:
            self.out += bytes((_SHORT_BINUNICODE, len(raw)))
        else:
            self.out.append(_BINUNICODE)
            self.out += len(raw).to_bytes(4, "little")
        self.out += raw
        self.put(key)

    def save_int(self, value: int) -> None:
        self.boundary()
        out = self.out
        if 0 <= value < 256:
            out += bytes((_BININT1, value))
        elif 0 <= value < 65536:
            out += bytes((_BININT2, value & 0xFF, value >> 8))
        elif -(1 << 31) <= value < (1 << 31):
            out.append(_BININT)
            out += value.to_bytes(4, "little", signed=True)
        else:
            # LONG1: minimal little-endian two's complement (CPython's encode_long).
            n = (value.bit_length() >> 3) + 1
            raw = value.to_bytes(n, "little", signed=True)
            if value < 0 and n > 1 and raw[-1] == 0xFF and raw[-2] & 0x80:
                raw = raw[:-1]
            out += bytes((_LONG1, len(raw)))
            out += raw

    def save_bool(self, value: bool) -> None:
        self.boundary()
        self.out.append(_NEWTRUE if value else _NEWFALSE)

    def save_none(self) -> None:
        self.boundary()
        self.out.append(_NONE)

    def save_global(self, key: str, module: str, module_key: Any, name: str) -> None:
        self.boundary()
        gkey = ("global", key)
        if self.get(gkey):
            return
        if self.proto >= 4:
            self.save_str(module, module_key)
            self.save_str(name, ("str", "name:" + key))
            self.out.append(_STACK_GLOBAL)
        else:
            self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        self.put(gkey)

    def save_bytes(self, raw: bytes) -> None:
        self.boundary()
        if self.proto >= 3:
            self.out += bytes((_SHORT_BINBYTES, len(raw)))
            self.out += raw
            self.put(("tmp", len(self.memo)))
        else:
            # bytes in protocol 2: _codecs.encode(raw.decode("latin1"), "latin1"), as CPython writes.
            self.save_global("encode", "_codecs", None, "encode")
            self.save_str(raw.decode("latin-1"), ("tmp", len(self.memo)))
            self.save_str("latin1", ("str", "latin1"))
            self.tuple_end(2)
            self.out.append(_REDUCE)
            self.put(("tmp", len(self.memo)))

    def tuple_end(self, n: int) -> None:
        self.out.append(_TUPLE1 + n - 1)
        self.put(("tmp", len(self.memo)))

    def save_timedelta(self, delta: timedelta) -> None:
        self.boundary()
        self.save_global("timedelta", "datetime", _K_DT_MODULE, "timedelta")
        self.boundary()
        self.save_int(delta.days)
        self.save_int(delta.seconds)
        self.save_int(delta.microseconds)
        self.tuple_end(3)
        self.out.append(_REDUCE)
        self.put(("tmp", len(self.memo)))

    def save_tz(self, tz: tzinfo) -> None:
        self.boundary()
        if not isinstance(tz, timezone):
            raise TypeError(f"tzinfo {tz!r} is not a datetime.timezone (torch's loads needs a fixed offset)")
        key = ("tz", "utc") if tz is _UTC else ("id", id(tz))
        if self.get(key):
            return
        self.save_global("timezone", "datetime", _K_DT_MODULE, "timezone")
        initargs = tz.__getinitargs__()  # type: ignore[attr-defined]
        self.boundary()
        self.save_timedelta(initargs[0])
        if len(initargs) > 1:
            self.save_str(initargs[1], ("tmp", len(self.memo)))
        self.tuple_end(len(initargs))
        self.out.append(_REDUCE)
        self.put(key)

    def save_datetime(self, value: datetime) -> None:
        self.boundary()
        if type(value) is not datetime:
            raise TypeError(f"{value!r} is not a datetime.datetime")
        key = ("id", id(value))
        if self.get(key):
            return
        self.save_global("datetime", "datetime", _K_DT_MODULE, "datetime")
        month = value.month | (0x80 if value.fold and self.proto > 3 else 0)
        us = value.microsecond
        raw = bytes(
            (value.year >> 8, value.year & 0xFF, month, value.day, value.hour, value.minute, value.second,
             us >> 16, (us >> 8) & 0xFF, us & 0xFF)
        )
        self.boundary()  # saving the args tuple
        self.save_bytes(raw)
        if value.tzinfo is not None:
            self.save_tz(value.tzinfo)
            self.tuple_end(2)
        else:
            self.tuple_end(1)
        self.out.append(_REDUCE)
        self.put(key)

    def save_node(self, node: NodeDesc) -> None:
        self.boundary()
        if type(node) is not NodeDesc:
            raise TypeError(f"{node!r} is not a NodeDesc")
        key = ("node", node)
        if self.get(key):
            return
        addr, pid, local_id = node.addr, node.pid, node.local_id
        if type(addr) is not str:
            raise TypeError(f"NodeDesc.addr {addr!r} is not a str")
        if len(addr.encode("utf-8", "surrogatepass")) > MAX_ADDR_BYTES:
            raise ValueError(f"NodeDesc.addr longer than {MAX_ADDR_BYTES} bytes")
        if not _valid_int64(pid) or not _valid_int64(local_id):
            raise ValueError(f"NodeDesc {node!r}: pid and local_id must be signed 64-bit ints")
        self.save_global("node", TORCH_MODULE, _K_TORCH_MODULE, "_NodeDesc")
        self.boundary()
        self.out.append(_EMPTY_TUPLE)
        self.out.append(_NEWOBJ)
        self.put(key)
        self.boundary()
        self.out.append(_EMPTY_DICT)
        self.put(("tmp", len(self.memo)))
        self.out.append(_MARK)
        self.save_str("addr", ("str", "addr"))
        self.save_str(addr)
        self.save_str("pid", ("str", "pid"))
        self.save_int(pid)
        self.save_str("local_id", ("str", "local_id"))
        self.save_int(local_id)
        self.out.append(_SETITEMS)
        self.out.append(_BUILD)

    def save_items(self, items: list[Any], save_item: Callable[[Any], None], pairs: bool, end_op: int) -> None:
        """CPython's batch_dict_exact / batch_set: MARK ... end_op per 1000 (and a final empty batch
        when the size is a multiple of 1000); a one-item dict is SETITEM without MARK."""
        if not items:
            return
        if pairs and len(items) == 1:
            save_item(items[0])
            self.out.append(_SETITEM)
            return
        i = 0
        while True:
            self.out.append(_MARK)
            batch = items[i : i + _BATCHSIZE]
            for item in batch:
                save_item(item)
            self.out.append(end_op)
            i += len(batch)
            if len(batch) < _BATCHSIZE:
                return

    def save_list_items(self, items: list[Any], save_item: Callable[[Any], None]) -> None:
        """CPython's batch_list_exact (protocol 2/3 set contents): one item APPEND, else MARK ... APPENDS."""
        if len(items) == 1:
            save_item(items[0])
            self.out.append(_APPEND)
            return
        i = 0
        total = len(items)
        while i < total:
            self.out.append(_MARK)
            batch = items[i : i + _BATCHSIZE]
            for item in batch:
                save_item(item)
            self.out.append(_APPENDS)
            i += len(batch)

    def save_set(self, members: set[NodeDesc]) -> None:
        self.boundary()
        if type(members) is not set:
            raise TypeError(f"{type(members).__name__} is not a set (torch calls .add/.remove on it)")
        items = list(members)
        if self.proto >= 4:
            self.out.append(_EMPTY_SET)
            self.put(("tmp", len(self.memo)))
            self.save_items(items, self.save_node, False, _ADDITEMS)
        else:
            module = "__builtin__" if self.proto < 3 else "builtins"
            self.save_global("set", module, None, "set")
            self.boundary()
            self.boundary()
            self.out.append(_EMPTY_LIST)
            self.put(("tmp", len(self.memo)))
            self.save_list_items(items, self.save_node)
            self.tuple_end(1)
            self.out.append(_REDUCE)
            self.put(("tmp", len(self.memo)))

    def save_dict(self, mapping: dict[Any, Any], save_pair: Callable[[Any], None]) -> None:
        self.boundary()
        if type(mapping) is not dict:
            raise TypeError(f"{type(mapping).__name__} is not a dict")
        self.out.append(_EMPTY_DICT)
        self.put(("tmp", len(self.memo)))
        self.save_items(list(mapping.items()), save_pair, True, _SETITEMS)

    def save_state(self, state: RendezvousState) -> None:
        if not isinstance(state, RendezvousState):
            raise TypeError(f"{type(state).__name__} is not a RendezvousState")
        self.save_global("state", TORCH_MODULE, _K_TORCH_MODULE, "_RendezvousState")
        self.boundary()
        self.out.append(_EMPTY_TUPLE)
        self.out.append(_NEWOBJ)
        self.put(("state",))
        self.boundary()
        self.out.append(_EMPTY_DICT)
        self.put(("tmp", len(self.memo)))
        self.out.append(_MARK)

        def rank_pair(item: tuple[Any, Any]) -> None:
            node, rank = item
            self.save_node(node)
            if type(rank) is not int or not 0 <= rank <= _INT64_MAX:
                raise ValueError(f"rank {rank!r} of {node!r} is not an int in 0..2**63-1")
            self.save_int(rank)

        def beat_pair(item: tuple[Any, Any]) -> None:
            node, beat = item
            self.save_node(node)
            self.save_datetime(beat)

        for name in _STATE_FIELDS:
            value = getattr(state, name)
            if name == "redundancy_list" and value is None:
                continue  # a state read from torch before redundancy_list: written back the same
            self.save_str(name, ("str", "attr:" + name))
            if name == "round":
                if type(value) is not int or not 0 <= value <= _INT64_MAX:
                    raise ValueError(f"round {value!r} is not an int in 0..2**63-1")
                self.save_int(value)
            elif name in ("complete", "closed"):
                if type(value) is not bool:
                    raise TypeError(f"{name} {value!r} is not a bool")
                self.save_bool(value)
            elif name == "deadline":
                if value is None:
                    self.save_none()
                else:
                    self.save_datetime(value)
            elif name == "participants":
                self.save_dict(value, rank_pair)
            elif name == "last_heartbeats":
                self.save_dict(value, beat_pair)
            else:
                self.save_set(value)
        self.out.append(_SETITEMS)
        self.out.append(_BUILD)


def encode_state(state: RendezvousState, protocol: int = 4) -> bytes:
    """Encode ``state`` as the pickle bytes torch 2.13 stores (raw: base64 is the backend's job).

    Protocol 4 (torch's default) follows CPython's C pickler layout exactly: the same opcodes,
    memo order and sharing (nodes, class globals, attribute-name strings, the UTC tzinfo, and any
    string or datetime object used twice), one FRAME per 64 KiB. Every node is built (NEWOBJ ...
    BUILD) before it is used as a key or set member, as torch's ``pickle.loads`` needs. Set order
    is this process's iteration order (as torch's, it depends on ``PYTHONHASHSEED``). Protocol 5 is
    protocol 4 with a different PROTO byte; protocols 2 and 3 are written as CPython writes them.

    torch 2.13 agents need aware UTC datetimes and a ``redundancy_list`` set: a state decoded from
    older torch (naive datetimes, ``redundancy_list`` None) is written back as it was read, which
    2.13 agents cannot use (reference §4.9).

    Raises:
        TypeError: A field has a type torch's state cannot hold (a list instead of a set, a tzinfo
            other than ``datetime.timezone``, a non-NodeDesc key, ...).
        ValueError: ``protocol`` is not 2-5, or a value is out of range (negative round or rank,
            pid/local_id outside signed 64-bit, an address over :data:`MAX_ADDR_BYTES`).
    """
    if protocol not in (2, 3, 4, 5):
        raise ValueError(f"protocol {protocol!r}: only 2-5 are written")
    enc = _Encoder(protocol)
    enc.out += bytes((_PROTO, protocol))
    if protocol >= 4:
        enc.out += b"\x95" + bytes(8)
        enc.frame_start = len(enc.out)
    enc.save_state(state)
    enc.out.append(_STOP)
    if protocol >= 4:
        enc._commit_frame()
    return bytes(enc.out)


# ---------------------------------------------------------------------------------------------
# JSON view (the samples file's ``decoded`` format)
# ---------------------------------------------------------------------------------------------


def _node_json(node: NodeDesc) -> list[Any]:
    return [node.addr, node.pid, node.local_id]


def state_to_json(state: RendezvousState) -> dict[str, Any]:
    """The JSON-ready view of ``state``, as in the samples file's ``decoded`` fields.

    Nodes are ``[addr, pid, local_id]``; datetimes ISO 8601 (``+00:00`` when aware, no offset when
    naive); ``participants`` and ``last_heartbeats`` are ``[[node, value], ...]`` and the sets are
    lists, all sorted by node (torch's rank order), since pickle order carries no meaning.
    ``redundancy_list`` is ``None`` for a state from torch before it existed. Raises nothing for a
    state made by :func:`decode_state`; ``AttributeError``/``TypeError`` for malformed objects.
    """

    def iso(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "round": state.round,
        "complete": state.complete,
        "deadline": iso(state.deadline),
        "closed": state.closed,
        "participants": [[_node_json(n), state.participants[n]] for n in sorted(state.participants)],
        "wait_list": [_node_json(n) for n in sorted(state.wait_list)],
        "redundancy_list": None
        if state.redundancy_list is None
        else [_node_json(n) for n in sorted(state.redundancy_list)],
        "last_heartbeats": [[_node_json(n), iso(state.last_heartbeats[n])] for n in sorted(state.last_heartbeats)],
    }


def state_from_json(obj: Mapping[str, Any]) -> RendezvousState:
    """The inverse of :func:`state_to_json` (also reads the samples file's ``decoded`` fields).

    ``redundancy_list`` may be missing or ``None`` (an older state). Datetimes keep their offset
    (aware) or lack of one (naive); a zero offset becomes ``timezone.utc``. Offsets with a
    sub-second part do not survive the ISO text on every Python (3.11's ``fromisoformat`` drops
    it); whole-minute offsets, which every real zone has, round-trip exactly.

    Raises:
        ValueError: A key is missing or unknown, or a value has the wrong type or range (the
            message names the field).
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"a state is a JSON object, not {type(obj).__name__}")
    unknown = set(obj) - set(_STATE_FIELDS)
    if unknown:
        raise ValueError(f"unknown state fields {sorted(unknown)}")
    missing = [n for n in _STATE_FIELDS if n not in obj and n != "redundancy_list"]
    if missing:
        raise ValueError(f"missing state fields {missing}")

    def node(value: Any, where: str) -> NodeDesc:
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise ValueError(f"{where}: a node is [addr, pid, local_id], not {value!r}")
        addr, pid, local_id = value
        if type(addr) is not str or not _valid_int64(pid) or not _valid_int64(local_id):
            raise ValueError(f"{where}: a node is [str, int64, int64], not {value!r}")
        return NodeDesc(addr, pid, local_id)

    def when(value: Any, where: str) -> datetime:
        if type(value) is not str:
            raise ValueError(f"{where}: a datetime is an ISO 8601 string, not {value!r}")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if parsed.tzinfo is not None and parsed.utcoffset() == timedelta(0):
            parsed = parsed.replace(tzinfo=_UTC)
        return parsed

    def pairs(value: Any, where: str) -> list[tuple[Any, Any]]:
        if not isinstance(value, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            raise ValueError(f"{where}: want a list of [node, value] pairs")
        return [(p[0], p[1]) for p in value]

    def node_set(value: Any, where: str) -> set[NodeDesc]:
        if not isinstance(value, list):
            raise ValueError(f"{where}: want a list of nodes")
        return {node(v, where) for v in value}

    rnd = obj["round"]
    if type(rnd) is not int or not 0 <= rnd <= _INT64_MAX:
        raise ValueError(f"round: want an int in 0..2**63-1, not {rnd!r}")
    for name in ("complete", "closed"):
        if type(obj[name]) is not bool:
            raise ValueError(f"{name}: want a bool, not {obj[name]!r}")
    participants: dict[NodeDesc, int] = {}
    for n, rank in pairs(obj["participants"], "participants"):
        if type(rank) is not int or not 0 <= rank <= _INT64_MAX:
            raise ValueError(f"participants: rank {rank!r} is not an int in 0..2**63-1")
        participants[node(n, "participants")] = rank
    heartbeats = {node(n, "last_heartbeats"): when(t, "last_heartbeats") for n, t in pairs(obj["last_heartbeats"], "last_heartbeats")}
    redundancy = obj.get("redundancy_list")
    return RendezvousState(
        round=rnd,
        complete=obj["complete"],
        deadline=None if obj["deadline"] is None else when(obj["deadline"], "deadline"),
        closed=obj["closed"],
        participants=participants,
        wait_list=node_set(obj["wait_list"], "wait_list"),
        redundancy_list=None if redundancy is None else node_set(redundancy, "redundancy_list"),
        last_heartbeats=heartbeats,
    )
