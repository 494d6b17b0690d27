from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket

import pytest

from proxygate.config import GatewaySettings, parse_networks
from proxygate.errors import BadGateway, DestinationDenied
from proxygate.policy.destinations import DestinationPolicy
from proxygate.proxy.dial import Dialer


def policy(**kw: object) -> DestinationPolicy:
    return DestinationPolicy.from_settings(GatewaySettings(**kw), bound_port=8080)  # type: ignore[arg-type]


def addrs(*ips: str) -> list:
    return [(ipaddress.ip_address(ip), (ip, 443)) for ip in ips]


def test_connect_ports() -> None:
    p = policy()
    p.check_connect_port(443)
    with pytest.raises(DestinationDenied, match="connect-ports 443"):
        p.check_connect_port(22)
    policy(connect_ports=None).check_connect_port(22)


@pytest.mark.parametrize(
    "ip", ["127.0.0.1", "127.9.9.9", "::1", "0.0.0.0", "169.254.169.254", "fe80::1", "::ffff:127.0.0.1"]
)
def test_default_denials(ip: str) -> None:
    with pytest.raises(DestinationDenied, match="deny-destinations"):
        policy().allowed_addresses("h", 443, addrs(ip))


@pytest.mark.parametrize(
    "spelling",
    [
        "::",
        "::0",
        "0:0:0:0:0:0:0:0",
        "0000:0000:0000:0000:0000:0000:0000:0000",
        "::ffff:0.0.0.0",
        "::ffff:7f00:1",  # IPv4-mapped loopback, hex
        "::ffff:169.254.169.254",  # cloud metadata, mapped
        "::127.0.0.1",  # IPv4-compatible
        "::7f00:1",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "64:ff9b::127.0.0.1",  # NAT64
        "64:ff9b::a9fe:a9fe",
    ],
)
def test_every_spelling_of_a_denied_address_is_denied(spelling: str) -> None:
    with pytest.raises(DestinationDenied, match="deny-destinations"):
        policy().allowed_addresses("h", 443, addrs(spelling))


@pytest.mark.parametrize("host", ["::", "0:0:0:0:0:0:0:0", "0", "0.0.0.0", "2130706433", "0177.0.0.1", "127.1"])
def test_resolved_spellings_are_denied(host: str) -> None:
    """What a resolver turns into a local address is checked after resolving."""
    dialer = Dialer(policy(), 1.0)

    async def dial() -> None:
        await dialer.open(host, 8081, asyncio.Protocol)

    with pytest.raises(DestinationDenied):
        asyncio.run(dial())


def test_public_ipv6_and_embedded_public_ipv4_pass() -> None:
    assert policy().allowed_addresses("h", 443, addrs("2606:4700::1111", "::ffff:93.184.216.34", "64:ff9b::5db8:d822"))


def test_http_ports() -> None:
    p = policy()
    for port in (80, 443, 8080, 1025, 65535):
        p.check_http_port(port)
    for port in (22, 25, 110, 1024):
        with pytest.raises(DestinationDenied, match="http-ports"):
            p.check_http_port(port)
    policy(http_ports=None).check_http_port(25)


def test_denied_addresses_filtered_not_all() -> None:
    allowed = policy().allowed_addresses("h", 443, addrs("127.0.0.1", "93.184.216.34"))
    assert [str(ip) for ip, _ in allowed] == ["93.184.216.34"]
    assert policy(deny_destinations=()).allowed_addresses("h", 443, addrs("127.0.0.1"))
    custom = policy(deny_destinations=parse_networks("10.0.0.0/8"))
    with pytest.raises(DestinationDenied, match="10.0.0.0/8"):
        custom.allowed_addresses("h", 443, addrs("10.2.3.4"))


def test_loop_to_own_listener() -> None:
    p = policy(deny_destinations=())
    with pytest.raises(DestinationDenied, match="loop"):
        p.allowed_addresses("h", 8080, [(ipaddress.ip_address("127.0.0.1"), ("127.0.0.1", 8080))])
    assert p.allowed_addresses("h", 8081, [(ipaddress.ip_address("127.0.0.1"), ("127.0.0.1", 8081))])
    assert p.names_own_listener("localhost", 8080) and not p.names_own_listener("example.com", 8080)


def test_dns_failure_is_502() -> None:
    async def failing_getaddrinfo(*args: object, **kw: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    dialer = Dialer(policy(), 1.0, getaddrinfo=failing_getaddrinfo)
    with pytest.raises(BadGateway, match="cannot resolve nowhere.test"):
        asyncio.run(dialer.resolve("nowhere.test", 80))


def test_remembered_denials_stay_right_past_the_bound() -> None:
    p = policy()
    for round_ in range(2):  # the second round is answered from the remembered verdicts
        for i in range(5000):  # more addresses than are remembered: the memo is cleared on the way
            denied = ipaddress.ip_address(f"169.254.{i // 256}.{i % 256}")
            with pytest.raises(DestinationDenied, match="169.254.0.0/16"):
                p.allowed_addresses("h", 443, [(denied, (str(denied), 443))])
            public = f"93.184.{i // 256}.{i % 256}"
            assert p.allowed_addresses("h", 443, addrs(public)) == addrs(public), (round_, i)


def test_a_changed_copy_does_not_inherit_remembered_denials() -> None:
    p = policy()
    loopback = ipaddress.ip_address("127.0.0.1")
    assert p.denied_by(loopback) is not None
    assert dataclasses.replace(p, deny=()).denied_by(loopback) is None
