"""RendezvousParameters and the rendezvous errors (rdzv_backend.api).

The first class ports the parameter tests of torch's ``api_test.py``
(``RendezvousParametersTest``, unchanged but for imports); the rest pins the
finer points of rendezvous.md section 1 and checks the conversions against
a model with hypothesis.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, SupportsInt, cast
from unittest import TestCase

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rdzv_backend
from rdzv_backend import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousParameters,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from rdzv_backend import api

BOOL_MSG = r"^The rendezvous configuration option 'dummy_param' does not represent a valid boolean value.$"
INT_MSG = r"^The rendezvous configuration option 'dummy_param' does not represent a valid integer value.$"


class RendezvousParametersTest(TestCase):
    """torch's ``api_test.RendezvousParametersTest``."""

    def setUp(self) -> None:
        self._backend = "dummy_backend"
        self._endpoint = "dummy_endpoint"
        self._run_id = "dummy_run_id"
        self._min_nodes = 3
        self._max_nodes = 6
        self._kwargs: dict[str, Any] = {}

    def _create_params(self) -> RendezvousParameters:
        return RendezvousParameters(
            backend=self._backend,
            endpoint=self._endpoint,
            run_id=self._run_id,
            min_nodes=self._min_nodes,
            max_nodes=self._max_nodes,
            **self._kwargs,
        )

    def test_init_initializes_params(self) -> None:
        self._kwargs["dummy_param"] = "x"

        params = self._create_params()

        self.assertEqual(params.backend, self._backend)
        self.assertEqual(params.endpoint, self._endpoint)
        self.assertEqual(params.run_id, self._run_id)
        self.assertEqual(params.min_nodes, self._min_nodes)
        self.assertEqual(params.max_nodes, self._max_nodes)

        self.assertEqual(params.get("dummy_param"), "x")

    def test_init_initializes_params_if_min_nodes_equals_to_1(self) -> None:
        self._min_nodes = 1

        params = self._create_params()

        self.assertEqual(params.min_nodes, self._min_nodes)
        self.assertEqual(params.max_nodes, self._max_nodes)

    def test_init_initializes_params_if_min_and_max_nodes_are_equal(self) -> None:
        self._max_nodes = 3

        params = self._create_params()

        self.assertEqual(params.min_nodes, self._min_nodes)
        self.assertEqual(params.max_nodes, self._max_nodes)

    def test_init_raises_error_if_backend_is_none_or_empty(self) -> None:
        for backend in [None, ""]:
            with self.subTest(backend=backend):
                self._backend = backend  # type: ignore[assignment]

                with self.assertRaisesRegex(
                    ValueError,
                    r"^The rendezvous backend name must be a non-empty string.$",
                ):
                    self._create_params()

    def test_init_raises_error_if_min_nodes_is_less_than_1(self) -> None:
        for min_nodes in [0, -1, -5]:
            with self.subTest(min_nodes=min_nodes):
                self._min_nodes = min_nodes

                with self.assertRaisesRegex(
                    ValueError,
                    rf"^The minimum number of rendezvous nodes \({min_nodes}\) must be greater "
                    rf"than zero.$",
                ):
                    self._create_params()

    def test_init_raises_error_if_max_nodes_is_less_than_min_nodes(self) -> None:
        for max_nodes in [2, 1, -2]:
            with self.subTest(max_nodes=max_nodes):
                self._max_nodes = max_nodes

                with self.assertRaisesRegex(
                    ValueError,
                    rf"^The maximum number of rendezvous nodes \({max_nodes}\) must be greater "
                    "than or equal to the minimum number of rendezvous nodes "
                    rf"\({self._min_nodes}\).$",
                ):
                    self._create_params()

    def test_get_returns_none_if_key_does_not_exist(self) -> None:
        params = self._create_params()

        self.assertIsNone(params.get("dummy_param"))

    def test_get_returns_default_if_key_does_not_exist(self) -> None:
        params = self._create_params()

        self.assertEqual(params.get("dummy_param", default="x"), "x")

    def test_get_as_bool_returns_none_if_key_does_not_exist(self) -> None:
        params = self._create_params()

        self.assertIsNone(params.get_as_bool("dummy_param"))

    def test_get_as_bool_returns_default_if_key_does_not_exist(self) -> None:
        params = self._create_params()

        self.assertTrue(params.get_as_bool("dummy_param", default=True))

    def test_get_as_bool_returns_true_if_value_represents_true(self) -> None:
        for value in ["1", "True", "tRue", "T", "t", "yEs", "Y", 1, True]:
            with self.subTest(value=value):
                self._kwargs["dummy_param"] = value

                params = self._create_params()

                self.assertTrue(params.get_as_bool("dummy_param"))

    def test_get_as_bool_returns_false_if_value_represents_false(self) -> None:
        for value in ["0", "False", "faLse", "F", "f", "nO", "N", 0, False]:
            with self.subTest(value=value):
                self._kwargs["dummy_param"] = value

                params = self._create_params()

                self.assertFalse(params.get_as_bool("dummy_param"))

    def test_get_as_bool_raises_error_if_value_is_invalid(self) -> None:
        for value in ["01", "Flse", "Ture", "g", "4", "_", "truefalse", 2, -1]:
            with self.subTest(value=value):
                self._kwargs["dummy_param"] = value

                params = self._create_params()

                with self.assertRaisesRegex(ValueError, BOOL_MSG):
                    params.get_as_bool("dummy_param")

    def test_get_as_int_returns_none_if_key_does_not_exist(self) -> None:
        params = self._create_params()

        self.assertIsNone(params.get_as_int("dummy_param"))

    def test_get_as_int_returns_default_if_key_does_not_exist(self) -> None:
        params = self._create_params()

        self.assertEqual(params.get_as_int("dummy_param", default=5), 5)

    def test_get_as_int_returns_integer_if_value_represents_integer(self) -> None:
        for value in ["0", "-10", "5", "  4", "4  ", " 4 ", 0, -4, 3]:
            with self.subTest(value=value):
                self._kwargs["dummy_param"] = value

                params = self._create_params()

                self.assertEqual(params.get_as_int("dummy_param"), int(cast(SupportsInt, value)))

    def test_get_as_int_raises_error_if_value_is_invalid(self) -> None:
        for value in ["a", "0a", "3b", "abc"]:
            with self.subTest(value=value):
                self._kwargs["dummy_param"] = value

                params = self._create_params()

                with self.assertRaisesRegex(ValueError, INT_MSG):
                    params.get_as_int("dummy_param")


# -- beyond the upstream tests ------------------------------------------------------------------


def make(**config: Any) -> RendezvousParameters:
    return RendezvousParameters("c10d", "localhost:29400", "run", 1, 2, **config)


def test_validation_order_is_backend_then_min_then_max() -> None:
    with pytest.raises(ValueError, match="backend name"):
        RendezvousParameters("", "", "", 0, -1)
    with pytest.raises(ValueError, match=r"^The minimum number of rendezvous nodes \(0\)"):
        RendezvousParameters("b", "", "", 0, -1)


def test_endpoint_and_run_id_are_not_validated() -> None:
    for endpoint in (None, "", "not an endpoint ~"):
        params = RendezvousParameters("b", endpoint, "", 1, 1)  # type: ignore[arg-type]
        assert params.endpoint == endpoint
        assert params.run_id == ""


def test_local_addr_is_an_attribute_not_config() -> None:
    params = RendezvousParameters("b", "e", "r", 1, 1, local_addr="10.0.0.1", x="1")
    assert params.local_addr == "10.0.0.1"
    assert params.config == {"x": "1"}
    assert RendezvousParameters("b", "e", "r", 1, 1).local_addr is None


def test_config_is_the_mutable_kwargs_dict() -> None:
    params = make(store_type="file", read_timeout="5")
    del params.config["store_type"]
    params.config["is_host"] = "yes"
    params.endpoint = "other:1"
    params.backend = "other"
    assert params.get("store_type") is None
    assert params.get_as_bool("is_host") is True
    assert (params.endpoint, params.backend) == ("other:1", "other")


def test_get_present_none_beats_default() -> None:
    params = make(key=None)
    assert params.get("key", "default") is None
    assert params.get_as_bool("key", True) is None
    assert params.get_as_int("key", 5) is None


def test_get_as_bool_converts_the_default_too() -> None:
    params = make()
    assert params.get_as_bool("k", "yes") is True  # type: ignore[arg-type]
    assert params.get_as_bool("k", 0) is False  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^The rendezvous configuration option 'k' does not"):
        params.get_as_bool("k", "maybe")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["", " true", "true ", "01", "yes!", 1.0, b"1", 2, -1, [1], object()])
def test_get_as_bool_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match=BOOL_MSG):
        make(dummy_param=value).get_as_bool("dummy_param")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(" 4 ", 4), ("+5", 5), ("1_000", 1000), (3.9, 3), (b"7", 7), ("-0", 0), (True, 1)],
)
def test_get_as_int_uses_plain_int(value: Any, expected: int) -> None:
    assert make(dummy_param=value).get_as_int("dummy_param") == expected


def test_get_as_int_chains_the_original_value_error() -> None:
    with pytest.raises(ValueError, match=INT_MSG) as info:
        make(dummy_param="").get_as_int("dummy_param")
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("value", [timedelta(seconds=1), [1], object()])
def test_get_as_int_lets_type_errors_through(value: Any) -> None:
    # torch parity: only int()'s ValueError is translated (rendezvous.md 1.2).
    with pytest.raises(TypeError):
        make(dummy_param=value).get_as_int("dummy_param")


_TRUE = {"1", "true", "t", "yes", "y"}
_FALSE = {"0", "false", "f", "no", "n"}


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=8), st.sampled_from(sorted(_TRUE | _FALSE)).map(str.upper)))
def test_get_as_bool_matches_model(text: str) -> None:
    params = make(dummy_param=text)
    if text.lower() in _TRUE:
        assert params.get_as_bool("dummy_param") is True
    elif text.lower() in _FALSE:
        assert params.get_as_bool("dummy_param") is False
    else:
        with pytest.raises(ValueError, match=BOOL_MSG):
            params.get_as_bool("dummy_param")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=10), st.integers().map(str), st.integers()))
def test_get_as_int_matches_model(value: Any) -> None:
    params = make(dummy_param=value)
    try:
        expected = int(value)
    except ValueError:
        with pytest.raises(ValueError, match=INT_MSG):
            params.get_as_int("dummy_param")
    else:
        assert params.get_as_int("dummy_param") == expected


# -- errors -------------------------------------------------------------------------------------

ERRORS = [
    RendezvousClosedError,
    RendezvousTimeoutError,
    RendezvousConnectionError,
    RendezvousStateError,
    RendezvousGracefulExitError,
]


@pytest.mark.parametrize("cls", ERRORS)
def test_errors_derive_from_rendezvous_error_only(cls: type[Exception]) -> None:
    assert issubclass(cls, RendezvousError)
    assert cls.__bases__ == (RendezvousError,)
    # Plain Exceptions, as in torch: not RuntimeError, so "except RuntimeError" around
    # store calls does not swallow them.
    assert not issubclass(cls, RuntimeError)
    assert str(cls()) == ""
    assert str(cls("message")) == "message"


def test_rendezvous_error_is_a_plain_exception() -> None:
    assert RendezvousError.__bases__ == (Exception,)


def test_everything_is_importable_from_the_package() -> None:
    for name in api.__all__:
        assert getattr(rdzv_backend, name) is getattr(api, name)
