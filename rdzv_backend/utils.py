"""Parsing of rendezvous endpoints and ``--rdzv-conf`` strings, and the ``is_host`` heuristic.

These follow torch 2.13's ``rendezvous/utils.py`` (same results, same
messages) with two deliberate differences, both about never failing in
surprising ways:

* :func:`_matches_machine_hostname` never raises and never asks DNS to
  reverse-resolve the endpoint (see its docstring);
* the endpoint regexes match the whole string, so a host or port with a
  trailing newline (``"host\\n:80"``) is rejected; torch's ``re.match(...$)``
  lets a newline slip through before ``$``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any

__all__ = ["parse_rendezvous_endpoint"]

_PORT_RE = re.compile(r"[0-9]{1,5}")
_HOST_RE = re.compile(r"[\w\.:-]+")


def _parse_rendezvous_config(config_str: str) -> dict[str, str]:
    """Parse ``<key1>=<value1>,...,<keyN>=<valueN>`` (torchrun's ``--rdzv-conf``).

    Items are split on every comma (there is no escaping), each item on its
    first ``=``; keys and values are stripped and values stay strings (typed
    access goes through ``RendezvousParameters.get_as_*``). A blank string
    gives ``{}``; a repeated key keeps its last value.

    Raises:
        ValueError: At the first bad item, left to right: an empty key, or a
            key without a (non-blank) value.
    """
    config: dict[str, str] = {}

    config_str = config_str.strip()
    if not config_str:
        return config

    for item in config_str.split(","):
        key, *rest = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(
                "The rendezvous configuration string must be in format "
                "<key1>=<value1>,...,<keyN>=<valueN>."
            )
        value = rest[0].strip() if rest else ""
        if not value:
            raise ValueError(
                f"The rendezvous configuration option '{key}' must have a value specified."
            )
        config[key] = value
    return config


def _try_parse_port(port_str: str) -> int | None:
    """Return ``port_str`` as an int if it is 1-5 ASCII digits (no sign, no spaces), else None."""
    if port_str and _PORT_RE.fullmatch(port_str):
        return int(port_str)
    return None


def parse_rendezvous_endpoint(endpoint: str | None, default_port: int) -> tuple[str, int]:
    """Split ``<host>[:<port>]`` into ``(host, port)``.

    A blank or ``None`` endpoint means ``("localhost", default_port)``. An
    IPv6 host must be bracketed: ``"[::1]:29400"`` or ``"[::1]"``. As in
    torch, an unbracketed IPv6 literal is split at its last colon
    (``"::1"`` gives ``(":", 1)``), and leading zeros in the port are fine.

    Raises:
        ValueError: The port is not 0-65535 (checked first), or the host is
            not made of word characters, dots, colons and dashes. The
            message quotes the stripped endpoint.
    """
    if endpoint is not None:
        endpoint = endpoint.strip()
    if not endpoint:
        return ("localhost", default_port)

    rest: list[str]
    if endpoint[0] == "[" and endpoint[-1] == "]":
        # A bracketed IPv6 address without a port: its colons are not separators.
        host, rest = endpoint, []
    else:
        host, *rest = endpoint.rsplit(":", 1)

    if len(host) > 1 and host[0] == "[" and host[-1] == "]":
        host = host[1:-1]

    if rest:
        port = _try_parse_port(rest[0])
        if port is None or port >= 2**16:
            raise ValueError(
                f"The port number of the rendezvous endpoint '{endpoint}' must be an integer "
                "between 0 and 65536."
            )
    else:
        port = default_port

    if not _HOST_RE.fullmatch(host):
        raise ValueError(
            f"The hostname of the rendezvous endpoint '{endpoint}' must be a dot-separated list of "
            "labels, an IPv4 address, or an IPv6 address."
        )

    return host, port


def _resolve(host: str, flags: int) -> list[tuple[Any, ...]]:
    """``socket.getaddrinfo`` over TCP, or ``[]`` when the name does not resolve.

    Looked up through the ``socket`` module attribute at call time so that
    tests can patch ``socket.getaddrinfo``. ``OSError`` covers ``gaierror``
    and ``herror``; ``ValueError`` covers embedded NULs and names IDNA cannot
    encode (``UnicodeError``).
    """
    try:
        return list(socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP, flags=flags))
    except (OSError, ValueError):
        return []


def _matches_machine_hostname(host: str) -> bool:
    """Tell whether ``host`` names this machine: the ``is_host`` guess of the c10d backend.

    True for ``"localhost"``, any loopback address, this machine's host name,
    a canonical name of this machine, or a name/address that resolves to one
    of this machine's addresses. It can give false negatives (CNAMEs,
    secondary NICs), which is why ``is_host`` can be set explicitly.

    Same decisions and the same two ``socket.getaddrinfo`` calls, in the same
    order, as torch (first the endpoint, then this machine's name), with two
    differences:

    * it never raises: if this machine's own name does not resolve (a
      container with no entry for its host name) the answer is simply
      "no match" from that step, where torch lets ``gaierror`` escape and
      aborts ``create_backend``;
    * it never reverse-resolves the endpoint: an IP address is looked up
      with ``AI_NUMERICHOST`` (no DNS traffic at all), and the endpoint's
      canonical name, which nothing here uses, is not requested. Only this
      machine's own name is asked for its canonical name, a forward lookup.
    """
    if host == "localhost":
        return True

    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        addr = None

    if addr is not None and addr.is_loopback:
        return True

    flags = socket.AI_NUMERICHOST if addr is not None else 0
    host_ips = [info[4][0] for info in _resolve(host, flags)]

    try:
        this_host = socket.gethostname()
    except OSError:
        this_host = ""
    if host == this_host:
        return True
    if not this_host:
        return False

    for info in _resolve(this_host, socket.AI_CANONNAME):
        canon_name, ip = info[3], info[4][0]
        if canon_name and canon_name == host:
            return True
        if addr is not None and ip == str(addr):
            return True
        if ip in host_ips:
            return True

    return False
