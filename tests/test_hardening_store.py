"""Issue 11, bug 1: subclassing ``Store`` the torch way, or through the hooks, works through
``PrefixStore`` (any depth) and the base-class fallbacks; what a subclass lacks raises
``NotImplementedError`` naming the class and the method."""

from __future__ import annotations

import threading

import pytest

import rdzv_store
from rdzv_store import HashStore, PrefixStore, Store, StoreTimeoutError


class TorchStyle(Store):
    """Overrides public methods only, the way torch documents ``dist.Store`` subclasses."""

    def __init__(self) -> None:
        super().__init__()
        self.d: dict[object, bytes] = {}
        self.cond = threading.Condition()

    def set(self, key, value):
        with self.cond:
            self.d[key] = value
            self.cond.notify_all()

    def get(self, key):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.d, timeout=self.timeout.total_seconds()):
                raise StoreTimeoutError(f"no {key}")
            return self.d[key]


class TorchStyleFull(TorchStyle):
    def add(self, key, amount):
        with self.cond:
            value = int(self.d.get(key, b"0")) + amount
            self.d[key] = str(value).encode()
            self.cond.notify_all()
            return value

    def compare_set(self, key, expected, desired):
        with self.cond:
            current = self.d.get(key)
            if current is None:
                if expected:
                    return expected
                self.d[key] = desired
                self.cond.notify_all()
                return desired
            if current == expected:
                self.d[key] = desired
                self.cond.notify_all()
                return desired
            return current

    def wait(self, keys, timeout=None):
        seconds = self.timeout.total_seconds() if timeout is None else float(timeout)
        with self.cond:
            if not self.cond.wait_for(lambda: all(k in self.d for k in keys), timeout=seconds):
                raise StoreTimeoutError(f"wait timeout, keys: {keys}")

    def check(self, keys):
        with self.cond:
            return all(k in self.d for k in keys)

    def delete_key(self, key):
        with self.cond:
            return self.d.pop(key, None) is not None

    def num_keys(self):
        return len(self.d)

    def list_keys(self):
        return list(self.d)


class HookStyle(Store):
    """Overrides the raw hooks only (what the package's stores do)."""

    def __init__(self) -> None:
        super().__init__()
        self.d: dict[bytes, bytes] = {}

    def _set(self, key, value):
        self.d[key] = value

    def _get(self, key, timeout):
        return self.d[key]

    def _compare_set(self, key, expected, desired):
        current = self.d.get(key)
        if current is None and not expected or current == expected:
            self.d[key] = desired
            return desired
        return expected if current is None else current


def test_issue_example_prefix_store_over_torch_style_subclass():
    inner = TorchStyle()
    PrefixStore("p", inner).set("k", b"v")
    assert inner.d == {"p/k": b"v"}  # torch passes keys as str
    assert PrefixStore("p", inner).get("k") == b"v"


def test_torch_style_keys_arrive_as_str_and_values_as_bytes():
    inner = TorchStyle()
    PrefixStore("p", inner).set(b"k", "text")
    ((key, value),) = inner.d.items()
    assert (key, value) == ("p/k", b"text")
    # A key that is not UTF-8 cannot be a str: it arrives as bytes.
    PrefixStore("p", inner).set(b"\xff", b"x")
    assert inner.d[b"p/\xff"] == b"x"


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_torch_style_through_nested_prefix_stores(depth):
    inner = TorchStyleFull()
    store: Store = inner
    for i in range(depth):
        store = PrefixStore(f"l{i}", store)
    full = "/".join(f"l{i}" for i in range(depth)) + "/"  # the innermost prefix comes first
    store.set("a", "1")
    assert store.get("a") == b"1"
    assert store.add("n", 2) == 2 and store.add("n", 3) == 5
    assert store.compare_set("a", "1", "2") == b"2"
    store.append("a", "+")
    store.append("new", "x")
    assert store.get("a") == b"2+" and store.get("new") == b"x"
    store.multi_set(["m1", "m2"], [b"x", "y"])
    assert store.multi_get(["m1", "m2"]) == [b"x", b"y"]
    assert store.check(["m1", "m2"]) and not store.check(["nope"])
    assert store.delete_key("m2") and not store.delete_key("m2")
    store.wait(["m1"], 0.1)
    with pytest.raises(StoreTimeoutError):
        store.wait(["nope"], 0.01)
    assert store.num_keys() == len(inner.d)
    assert sorted(store.list_keys()) == ["a", "m1", "n", "new"]
    assert set(inner.d) == {full + k for k in ("a", "n", "new", "m1")}


def test_torch_style_base_fallbacks_call_the_public_methods():
    store = TorchStyleFull()
    store.append("k", "a")  # fallback: compare_set loop over the public compare_set
    store.append("k", "b")
    assert store.d == {"k": b"ab"}
    store.multi_set(["x", "y"], ["1", "2"])  # fallback: set loop
    assert store.multi_get(["x", "y"]) == [b"1", b"2"]  # fallback: get loop
    store.barrier("bar", 1, 1.0)  # fallback: add + set + wait
    assert store.d["bar/num_members"] == b"1" and "bar/last_member" in store.d


def test_torch_style_barrier_through_prefix_store_with_threads():
    inner = TorchStyleFull()
    errors = []

    def member():
        try:
            PrefixStore("job", inner).barrier("b", 3, 5.0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=member) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and not any(t.is_alive() for t in threads)
    assert inner.d["job/b/num_members"] == b"3"


def test_hook_style_through_prefix_store_and_fallbacks():
    inner = HookStyle()
    store = PrefixStore("p", PrefixStore("q", inner))
    store.set("k", "v")
    assert inner.d == {b"q/p/k": b"v"}
    store.append("k", "w")  # PrefixStore -> public append -> fallback loop -> _compare_set hook
    store.multi_set(["a"], ["1"])
    assert store.multi_get(["k", "a"]) == [b"vw", b"1"]


def test_mixed_layers_work_together():
    class Mixed(HookStyle):
        def get(self, key):  # public, torch-style
            return self.d[key_bytes(key)].decode()  # returns str: accepted and encoded

    from rdzv_store.args import key_bytes

    inner = Mixed()
    store = PrefixStore("p", inner)
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert store.multi_get(["k"]) == [b"v"]


@pytest.mark.parametrize(
    "call, method",
    [
        (lambda s: s.add("k", 1), "add"),
        (lambda s: s.check(["k"]), "check"),
        (lambda s: s.delete_key("k"), "delete_key"),
        (lambda s: s.num_keys(), "num_keys"),
        (lambda s: s.wait(["k"]), "wait"),
        (lambda s: s.compare_set("k", "", "v"), "compare_set"),
        (lambda s: s.append("k", "v"), "append"),
        (lambda s: s.queue_push("k", "v"), "queue_push"),
        (lambda s: s.queue_len("k"), "queue_len"),
        (lambda s: s.list_keys(), "list_keys"),
    ],
)
@pytest.mark.parametrize("wrapped", [False, True])
def test_missing_method_names_class_and_method(call, method, wrapped):
    inner = TorchStyle()
    store = PrefixStore("p", inner) if wrapped else inner
    with pytest.raises(NotImplementedError) as info:
        call(store)
    message = str(info.value)
    assert "TorchStyle" in message and f"{method}()" in message, message


def test_empty_subclass_names_every_method():
    class Empty(Store):
        pass

    with pytest.raises(NotImplementedError, match=r"Empty does not implement set\(\)"):
        Empty().set("k", "v")
    with pytest.raises(NotImplementedError, match=r"Empty does not implement get\(\)"):
        PrefixStore("p", Empty()).get("k")
    with pytest.raises(NotImplementedError, match=r"Empty does not implement get\(\)"):
        Empty().multi_get(["k"])  # fallback: get loop


def test_subclass_without_super_init_has_the_default_timeout():
    class NoInit(Store):
        def __init__(self) -> None:  # forgets super().__init__()
            self.d: dict[object, bytes] = {}

    assert NoInit().timeout == rdzv_store.DEFAULT_TIMEOUT
    assert PrefixStore("p", NoInit()).timeout == rdzv_store.DEFAULT_TIMEOUT


def test_package_stores_unchanged_through_prefix_store():
    hs = HashStore()
    store = PrefixStore("a", PrefixStore("b", hs))
    store.set("k", "v")
    store.append("k", "w")
    assert hs.get("b/a/k") == b"vw"
    assert store.list_keys() == ["k"]
    store.queue_push("q", "1")
    assert store.queue_len("q") == 1 and store.queue_pop("q") == b"1"
    store.set_timeout(0.05)
    assert hs.timeout.total_seconds() == 0.05
    with pytest.raises(StoreTimeoutError, match="b/a/never"):
        store.get("never")
