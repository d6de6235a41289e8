"""Endpoint and config parsing, and the is_host guess (rdzv_backend.utils).

``UtilsTest`` ports the parsing and hostname tests of torch's ``utils_test.py``
(imports swapped; ``_delay``/``_PeriodicTimer`` belong to the dynamic handler
and are not part of this package). The rest pins rendezvous.md section 2,
our two "beyond torch" rules for the hostname guess (never raises, never
reverse-resolves the endpoint), and uses hypothesis for the parsers.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import string
from typing import Any
from unittest import TestCase
from unittest.mock import patch

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rdzv_backend import (
    _matches_machine_hostname,
    _parse_rendezvous_config,
    _try_parse_port,
    parse_rendezvous_endpoint,
)

FORMAT_MSG = (
    r"^The rendezvous configuration string must be in format <key1>=<value1>,...,<keyN>=<valueN>.$"
)


class UtilsTest(TestCase):
    """torch's ``utils_test.UtilsTest`` (parsing and hostname tests)."""

    def test_parse_rendezvous_config_returns_dict(self) -> None:
        expected_config = {
            "a": "dummy1",
            "b": "dummy2",
            "c": "dummy3=dummy4",
            "d": "dummy5/dummy6",
        }

        config = _parse_rendezvous_config(
            " b= dummy2  ,c=dummy3=dummy4,  a =dummy1,d=dummy5/dummy6"
        )

        self.assertEqual(config, expected_config)

    def test_parse_rendezvous_returns_empty_dict_if_str_is_empty(self) -> None:
        config_strs = ["", "   "]

        for config_str in config_strs:
            with self.subTest(config_str=config_str):
                config = _parse_rendezvous_config(config_str)

                self.assertEqual(config, {})

    def test_parse_rendezvous_raises_error_if_str_is_invalid(self) -> None:
        config_strs = [
            "a=dummy1,",
            "a=dummy1,,c=dummy2",
            "a=dummy1,   ,c=dummy2",
            "a=dummy1,=  ,c=dummy2",
            "a=dummy1, = ,c=dummy2",
            "a=dummy1,  =,c=dummy2",
            " ,  ",
        ]

        for config_str in config_strs:
            with self.subTest(config_str=config_str):
                with self.assertRaisesRegex(ValueError, FORMAT_MSG):
                    _parse_rendezvous_config(config_str)

    def test_parse_rendezvous_raises_error_if_value_is_empty(self) -> None:
        config_strs = [
            "b=dummy1,a,c=dummy2",
            "b=dummy1,c=dummy2,a",
            "b=dummy1,a=,c=dummy2",
            "  a ",
        ]

        for config_str in config_strs:
            with self.subTest(config_str=config_str):
                with self.assertRaisesRegex(
                    ValueError,
                    r"^The rendezvous configuration option 'a' must have a value specified.$",
                ):
                    _parse_rendezvous_config(config_str)

    def test_try_parse_port_returns_port(self) -> None:
        port = _try_parse_port("123")

        self.assertEqual(port, 123)

    def test_try_parse_port_returns_none_if_str_is_invalid(self) -> None:
        port_strs = [
            "",
            "   ",
            "  1",
            "1  ",
            " 1 ",
            "abc",
        ]

        for port_str in port_strs:
            with self.subTest(port_str=port_str):
                port = _try_parse_port(port_str)

                self.assertIsNone(port)

    def test_parse_rendezvous_endpoint_returns_tuple(self) -> None:
        endpoints = [
            "dummy.com:0",
            "dummy.com:123",
            "dummy.com:65535",
            "dummy-1.com:0",
            "dummy-1.com:123",
            "dummy-1.com:65535",
            "123.123.123.123:0",
            "123.123.123.123:123",
            "123.123.123.123:65535",
            "[2001:db8::1]:0",
            "[2001:db8::1]:123",
            "[2001:db8::1]:65535",
        ]

        for endpoint in endpoints:
            with self.subTest(endpoint=endpoint):
                host, port = parse_rendezvous_endpoint(endpoint, default_port=123)

                expected_host, expected_port = endpoint.rsplit(":", 1)

                if expected_host[0] == "[" and expected_host[-1] == "]":
                    expected_host = expected_host[1:-1]

                self.assertEqual(host, expected_host)
                self.assertEqual(port, int(expected_port))

    def test_parse_rendezvous_endpoint_returns_tuple_if_endpoint_has_no_port(self) -> None:
        endpoints = ["dummy.com", "dummy-1.com", "123.123.123.123", "[2001:db8::1]"]

        for endpoint in endpoints:
            with self.subTest(endpoint=endpoint):
                host, port = parse_rendezvous_endpoint(endpoint, default_port=123)

                expected_host = endpoint

                if expected_host[0] == "[" and expected_host[-1] == "]":
                    expected_host = expected_host[1:-1]

                self.assertEqual(host, expected_host)
                self.assertEqual(port, 123)

    def test_parse_rendezvous_endpoint_returns_tuple_if_endpoint_is_empty(self) -> None:
        endpoints = ["", "  "]

        for endpoint in endpoints:
            with self.subTest(endpoint=endpoint):
                host, port = parse_rendezvous_endpoint("", default_port=123)

                self.assertEqual(host, "localhost")
                self.assertEqual(port, 123)

    def test_parse_rendezvous_endpoint_raises_error_if_hostname_is_invalid(self) -> None:
        endpoints = ["~", "dummy.com :123", "~:123", ":123"]

        for endpoint in endpoints:
            with self.subTest(endpoint=endpoint):
                with self.assertRaisesRegex(
                    ValueError,
                    rf"^The hostname of the rendezvous endpoint '{endpoint}' must be a "
                    r"dot-separated list of labels, an IPv4 address, or an IPv6 address.$",
                ):
                    parse_rendezvous_endpoint(endpoint, default_port=123)

    def test_parse_rendezvous_endpoint_raises_error_if_port_is_invalid(self) -> None:
        endpoints = ["dummy.com:", "dummy.com:abc", "dummy.com:-123", "dummy.com:-"]

        for endpoint in endpoints:
            with self.subTest(endpoint=endpoint):
                with self.assertRaisesRegex(
                    ValueError,
                    rf"^The port number of the rendezvous endpoint '{endpoint}' must be an integer "
                    r"between 0 and 65536.$",
                ):
                    parse_rendezvous_endpoint(endpoint, default_port=123)

    def test_parse_rendezvous_endpoint_raises_error_if_port_is_too_big(self) -> None:
        endpoints = ["dummy.com:65536", "dummy.com:70000"]

        for endpoint in endpoints:
            with self.subTest(endpoint=endpoint):
                with self.assertRaisesRegex(
                    ValueError,
                    rf"^The port number of the rendezvous endpoint '{endpoint}' must be an integer "
                    r"between 0 and 65536.$",
                ):
                    parse_rendezvous_endpoint(endpoint, default_port=123)

    def test_matches_machine_hostname_returns_true_if_hostname_is_loopback(self) -> None:
        hosts = [
            "localhost",
            "127.0.0.1",
            "::1",
            "0000:0000:0000:0000:0000:0000:0000:0001",
        ]

        for host in hosts:
            with self.subTest(host=host):
                self.assertTrue(_matches_machine_hostname(host))

    def test_matches_machine_hostname_returns_true_if_hostname_is_machine_hostname(self) -> None:
        host = socket.gethostname()

        self.assertTrue(_matches_machine_hostname(host))

    def test_matches_machine_hostname_returns_true_if_hostname_is_machine_fqdn(self) -> None:
        host = socket.getfqdn()

        self.assertTrue(_matches_machine_hostname(host))

    def test_matches_machine_hostname_returns_true_if_hostname_is_machine_address(self) -> None:
        addr_list = socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)

        for addr in (addr_info[4][0] for addr_info in addr_list):
            with self.subTest(addr=addr):
                self.assertTrue(_matches_machine_hostname(addr))

    def test_matches_machine_hostname_returns_false_if_hostname_does_not_match(self) -> None:
        hosts = ["dummy", "0.0.0.0", "::2"]

        for host in hosts:
            with self.subTest(host=host):
                self.assertFalse(_matches_machine_hostname(host))

    @patch(
        "socket.getaddrinfo",
        side_effect=[
            [(None, None, 0, "a_host", ("1.2.3.4", 0))],
            [(None, None, 0, "a_different_host", ("1.2.3.4", 0))],
        ],
    )
    def test_matches_machine_hostname_returns_true_if_ip_address_match_between_hosts(
        self,
        _0: Any,
    ) -> None:
        self.assertTrue(_matches_machine_hostname("a_host"))

    @patch(
        "socket.getaddrinfo",
        side_effect=[
            [(None, None, 0, "a_host", ("1.2.3.4", 0))],
            [(None, None, 0, "another_host_with_different_ip", ("1.2.3.5", 0))],
        ],
    )
    def test_matches_machine_hostname_returns_false_if_ip_address_not_match_between_hosts(
        self,
        _0: Any,
    ) -> None:
        self.assertFalse(_matches_machine_hostname("a_host"))


# -- parse_rendezvous_endpoint: the quirks of rendezvous.md 2.2 --------------------------------

PORT_MSG = "The port number of the rendezvous endpoint '{}' must be an integer between 0 and 65536."
HOST_MSG = (
    "The hostname of the rendezvous endpoint '{}' must be a dot-separated list of labels, "
    "an IPv4 address, or an IPv6 address."
)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        (None, ("localhost", 7)),
        (" \t\n", ("localhost", 7)),
        ("::1", (":", 1)),  # unbracketed IPv6 is split at its last colon, as in torch
        ("2001:db8::1", ("2001:db8:", 1)),
        ("host:00080", ("host", 80)),
        ("  host:80  ", ("host", 80)),
        ("[::1]", ("::1", 7)),
        ("[::1]:0", ("::1", 0)),
        ("dummy_endpoint", ("dummy_endpoint", 7)),
        ("héllo.example:5", ("héllo.example", 5)),  # \w is Unicode-aware
    ],
)
def test_endpoint_quirks(endpoint: str | None, expected: tuple[str, int]) -> None:
    assert parse_rendezvous_endpoint(endpoint, default_port=7) == expected


@pytest.mark.parametrize(
    "endpoint", ["host:", "host:-1", "host:+5", "a:b:c", "[::1]:", "host:123456", "host: 80", "~:abc"]
)
def test_endpoint_bad_port(endpoint: str) -> None:
    # The port is checked before the host ("~:abc" reports the port).
    with pytest.raises(ValueError, match=f"^{re.escape(PORT_MSG.format(endpoint.strip()))}$"):
        parse_rendezvous_endpoint(endpoint, default_port=7)


@pytest.mark.parametrize("endpoint", ["~", "a b", ":123", "[]", "[::1", "[", "host\n:80", " a/b "])
def test_endpoint_bad_host(endpoint: str) -> None:
    # The message quotes the stripped endpoint.
    with pytest.raises(ValueError, match=f"^{re.escape(HOST_MSG.format(endpoint.strip()))}$"):
        parse_rendezvous_endpoint(endpoint, default_port=7)


def test_try_parse_port_rejects_trailing_newline() -> None:
    # Deliberate difference: torch's re.match(...$) accepts "123\n".
    assert _try_parse_port("123\n") is None
    assert _try_parse_port("00080") == 80
    assert _try_parse_port("99999") == 99999  # range is the caller's business
    assert _try_parse_port("123456") is None
    assert _try_parse_port("٣") is None  # non-ASCII digits


LABEL = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=10)
HOSTNAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
PORT = st.integers(0, 65535)
BLANK = st.text(" \t\n", max_size=2)


@settings(max_examples=200, deadline=None)
@given(st.one_of(HOSTNAME, IPV4), PORT, BLANK, BLANK)
def test_endpoint_roundtrip(host: str, port: int, before: str, after: str) -> None:
    assert parse_rendezvous_endpoint(f"{before}{host}:{port}{after}", 1) == (host, port)
    assert parse_rendezvous_endpoint(f"{before}{host}{after}", 1) == (host, 1)


@settings(max_examples=200, deadline=None)
@given(IPV6, PORT)
def test_endpoint_roundtrip_bracketed_ipv6(host: str, port: int) -> None:
    assert parse_rendezvous_endpoint(f"[{host}]:{port}", 1) == (host, port)
    assert parse_rendezvous_endpoint(f"[{host}]", 1) == (host, 1)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=20), st.text("[]:.-_ a1~\n", max_size=12)), PORT)
def test_endpoint_arbitrary_text(text: str, default_port: int) -> None:
    """Any text gives a well-formed (host, port) or one of the two ValueErrors, never anything else."""
    try:
        host, port = parse_rendezvous_endpoint(text, default_port)
    except ValueError as exc:
        stripped = text.strip()
        assert str(exc) in (PORT_MSG.format(stripped), HOST_MSG.format(stripped))
        return
    assert 0 <= port <= 65535 or port == default_port
    assert host == "localhost" or re.fullmatch(r"[\w.:-]+", host)
    assert host in text or host == "localhost"


# -- _parse_rendezvous_config -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" a = x y ", {"a": "x y"}),
        ("c=d=e", {"c": "d=e"}),
        ("a=1,a=2", {"a": "2"}),
        ("a==", {"a": "="}),
        ("k=v/w:x", {"k": "v/w:x"}),
    ],
)
def test_config_examples(text: str, expected: dict[str, str]) -> None:
    assert _parse_rendezvous_config(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("=x", FORMAT_MSG),
        (",,", FORMAT_MSG),
        ("a=1,", FORMAT_MSG),
        ("a", r"^The rendezvous configuration option 'a' must have a value specified.$"),
        ("a= ", r"^The rendezvous configuration option 'a' must have a value specified.$"),
        # The first bad item wins, left to right.
        ("b,=x", r"^The rendezvous configuration option 'b' must have a value specified.$"),
        ("=x,b", FORMAT_MSG),
    ],
)
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _parse_rendezvous_config(text)


KEY = st.text(string.ascii_letters + string.digits + "_-./ ", min_size=1, max_size=8).filter(str.strip)
VALUE = st.text(string.printable.replace(",", ""), min_size=1, max_size=12).filter(str.strip)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(KEY, VALUE), min_size=1, max_size=6))
def test_config_roundtrip(items: list[tuple[str, str]]) -> None:
    assume(all("=" not in k for k, _ in items))
    text = ",".join(f"{k}={v}" for k, v in items)
    expected: dict[str, str] = {}
    for k, v in items:
        expected[k.strip()] = v.strip()  # the last duplicate wins
    assert _parse_rendezvous_config(text) == expected


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=20), st.text("a=, \t", max_size=12)))
def test_config_arbitrary_text(text: str) -> None:
    """Any text gives a dict of stripped, non-empty strings, or one of the two ValueErrors."""
    try:
        config = _parse_rendezvous_config(text)
    except ValueError as exc:
        assert re.fullmatch(FORMAT_MSG[1:-1], str(exc)) or re.fullmatch(
            r"The rendezvous configuration option '.+' must have a value specified\.",
            str(exc),
            re.DOTALL,
        )
        return
    for key, value in config.items():
        assert key and key == key.strip() and "," not in key and "=" not in key
        assert value and value == value.strip() and "," not in value


# -- _matches_machine_hostname: never raises, never reverse-resolves ----------------------------


def _info(ip: str, canon: str = "") -> tuple[Any, ...]:
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, canon, (ip, 0))


def test_hostname_loopback_needs_no_lookup() -> None:
    with patch("socket.getaddrinfo", side_effect=AssertionError("no lookup expected")):
        for host in ("localhost", "127.0.0.1", "127.1.2.3", "::1"):
            assert _matches_machine_hostname(host)


def test_hostname_guess_survives_an_unresolvable_own_name() -> None:
    # torch lets this gaierror escape from create_backend; we answer "no match".
    with patch(
        "socket.getaddrinfo",
        side_effect=[[_info("10.1.2.3")], socket.gaierror(socket.EAI_NONAME, "not known")],
    ):
        assert _matches_machine_hostname("some-host") is False


@pytest.mark.parametrize(
    "error", [socket.gaierror(socket.EAI_AGAIN, "again"), OSError("x"), UnicodeError("idna")]
)
def test_hostname_guess_never_raises(error: Exception) -> None:
    with patch("socket.getaddrinfo", side_effect=error):
        assert _matches_machine_hostname("some-host") is False
    with patch("socket.gethostname", side_effect=OSError("no name")):
        assert _matches_machine_hostname("some-host") is False


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "bad\x00name", "", "x" * 300])
def test_hostname_guess_with_names_idna_refuses(host: str) -> None:
    assert _matches_machine_hostname(host) is False


def test_hostname_lookups_are_forward_only_and_in_order() -> None:
    calls: list[tuple[str, int]] = []

    def fake_getaddrinfo(host: str, port: Any, *args: Any, flags: int = 0, **kw: Any) -> Any:
        calls.append((host, flags))
        if host == "10.9.8.7":
            return [_info("10.9.8.7")]
        return [_info("10.9.8.7", canon="me.example")]

    forbidden = AssertionError("reverse lookup")
    with (
        patch("socket.getaddrinfo", side_effect=fake_getaddrinfo),
        patch("socket.gethostname", return_value="me"),
        patch("socket.gethostbyaddr", side_effect=forbidden),
        patch("socket.getnameinfo", side_effect=forbidden),
        patch("socket.getfqdn", side_effect=forbidden),
    ):
        assert _matches_machine_hostname("10.9.8.7") is True

    assert [host for host, _ in calls] == ["10.9.8.7", "me"]
    endpoint_flags, own_flags = calls[0][1], calls[1][1]
    # An address is looked up numerically: no DNS, so no PTR query for its canonical name.
    assert endpoint_flags & socket.AI_NUMERICHOST
    assert not endpoint_flags & socket.AI_CANONNAME
    assert own_flags & socket.AI_CANONNAME


@pytest.mark.parametrize(
    ("host", "own", "expected"),
    [
        ("me.example", [_info("10.0.0.5", canon="me.example")], True),  # canonical name
        ("10.0.0.5", [_info("10.0.0.5", canon="me.example")], True),  # own address
        ("10.0.0.6", [_info("10.0.0.5", canon="me.example")], False),
        ("other", [_info("10.0.0.5", canon="")], False),
    ],
)
def test_hostname_decisions(host: str, own: list[Any], expected: bool) -> None:
    def fake_getaddrinfo(name: str, *args: Any, **kw: Any) -> Any:
        if name == "me":
            return own
        if name == "other":
            raise socket.gaierror(socket.EAI_NONAME, "not known")
        return [_info(name)] if ipaddress.ip_address(name) else []

    with patch("socket.getaddrinfo", side_effect=fake_getaddrinfo), patch(
        "socket.gethostname", return_value="me"
    ):
        assert _matches_machine_hostname(host) is expected


def test_hostname_equal_to_own_name_matches_without_second_lookup() -> None:
    with patch("socket.getaddrinfo", side_effect=[[]]) as lookup, patch(
        "socket.gethostname", return_value="me"
    ):
        assert _matches_machine_hostname("me")
    assert lookup.call_count == 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_hostname_guess_is_total(host: str) -> None:
    """Whatever the text, the answer is a bool (DNS is stubbed: unresolvable)."""
    with patch("socket.getaddrinfo", side_effect=socket.gaierror(socket.EAI_NONAME, "no")):
        assert _matches_machine_hostname(host) in (True, False)
