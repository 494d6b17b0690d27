from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from proxygate.policy.blocklist import Blocklist, BlocklistError, BlocklistFile, normalize_host, parse_blocklist

LIST = Blocklist.from_entries(["example.com", "*.ads.com", "*.Tracker.IO.", "2001:db8::1", "10.1.2.3", ".squid.org"])


@pytest.mark.parametrize(
    "host, blocked",
    [
        ("example.com", True),
        ("EXAMPLE.COM", True),
        ("example.com.", True),
        ("example.com:443", True),
        ("www.example.com", False),  # exact entries do not cover subdomains
        ("notexample.com", False),
        ("x.ads.com", True),
        ("a.b.c.ads.com", True),
        ("X.ADS.COM:8080", True),
        ("x.ads.com.", True),
        ("ads.com", False),  # *.ads.com is for subdomains only
        ("badads.com", False),  # label boundary
        ("x.badads.com", False),
        ("ads.com.evil.net", False),
        ("t.tracker.io", True),
        ("tracker.io", False),
        ("[2001:db8::1]", True),
        ("[2001:DB8:0::0001]:443", True),
        ("2001:db8::1", True),
        ("[2001:db8::2]", False),
        ("10.1.2.3", True),
        ("10.1.2.3:80", True),
        ("10.1.2.4", False),
        ("squid.org", True),
        ("www.squid.org", True),
        ("", False),
    ],
)
def test_matching(host: str, blocked: bool) -> None:
    assert LIST.is_blocked(host) is blocked


def test_remembered_verdicts_stay_right_past_the_bound() -> None:
    blocklist = Blocklist.from_entries(["example.com", "*.ads.com"])
    for round_ in range(2):  # the second round is answered from the remembered verdicts
        for i in range(5000):  # more hosts than are remembered: the memo is cleared on the way
            assert blocklist.is_blocked(f"h{i}.ads.com") is True, (round_, i)
            assert blocklist.is_blocked(f"h{i}.example.com") is False, (round_, i)
        assert blocklist.is_blocked("EXAMPLE.com.") is True
    assert Blocklist.from_entries(["example.com"]) == Blocklist.from_entries(["example.com"])


def test_normalize_host() -> None:
    assert normalize_host("Example.COM.:443") == "example.com"
    assert normalize_host("[::1]:8080") == "::1"
    assert normalize_host("bücher.de") == "xn--bcher-kva.de"


def test_parse_errors() -> None:
    with pytest.raises(BlocklistError):
        parse_blocklist("{not json")
    with pytest.raises(BlocklistError):
        parse_blocklist('{"blocked_domains": "example.com"}')
    with pytest.raises(BlocklistError):
        parse_blocklist('{"blocked_domains": [1, 2]}')
    assert len(parse_blocklist("{}")) == 0


def test_file_reload_keeps_old_list_on_error(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    missing = BlocklistFile(str(path))
    missing.load_initial()  # missing at start: empty list, no error
    assert len(missing.current) == 0
    path.write_text(json.dumps({"blocked_domains": ["a.com"]}))
    assert missing.changed_on_disk()
    assert missing.reload() and missing.current.is_blocked("a.com")
    assert not missing.changed_on_disk()
    path.write_text("{broken")
    assert not missing.reload()
    assert missing.current.is_blocked("a.com")


def test_a_changed_copy_does_not_inherit_remembered_verdicts() -> None:
    blocklist = Blocklist.from_entries(["example.com"])
    assert blocklist.is_blocked("example.com")
    assert not dataclasses.replace(blocklist, exact=frozenset()).is_blocked("example.com")
