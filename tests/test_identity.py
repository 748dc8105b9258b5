"""Names, grants, token buckets and the refusal log: pure rules, no server."""

from __future__ import annotations

import logging

import pytest
import trio

from chatd.identity import Grants, IdentityError, check_user
from chatd.limits import RefusalLog, TokenBucket

RESERVED = ("assistant",)


@pytest.mark.parametrize(
    "name", ["alice", "Ann Lee", "élodie", "李雷", "o'brien", "a" * 64, "user@example.com"]
)
def test_ordinary_names_are_accepted(name):
    assert check_user(name, RESERVED) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "non-empty"),
        (None, "non-empty"),
        ("a" * 65, "at most 64"),
        (" alice", "white space"),
        ("alice ", "white space"),
        ("assistant", "reserved"),
        ("Assistant", "reserved"),
        ("\uff21\uff53\uff53istant", "reserved"),  # full-width letters fold to "Assistant"
        ("alice\u200b", "U+200B"),  # zero-width space
        ("ali\u202ece", "U+202E"),  # right-to-left override
        ("ali\u2066ce", "U+2066"),  # left-to-right isolate
        ("al\x00ice", "U+0000"),
        ("al\nice", "U+000A"),
        ("al\u00a0ice", "U+00A0"),  # no-break space passes for a space
        ("al\ue000ice", "U+E000"),  # private use
    ],
)
def test_names_nobody_may_claim(name, why):
    with pytest.raises(IdentityError, match=why.replace("+", r"\+")):
        check_user(name, RESERVED)


def test_grants_match_ids_and_prefixes_together():
    g = Grants.from_claim({"convs": {"c1": "rw", "team-*": "r", "team-ops": "w", "x*": "w"}})
    assert g.rights("c1") == "rw"
    assert g.rights("team-a") == "r"
    assert g.rights("team-ops") == "rw"  # the id's "w" and the prefix's "r"
    assert g.rights("c2") == ""
    assert g.rights("xyz") == "w"
    assert not g.operator
    assert Grants.from_claim({"operator": True}).operator
    assert Grants.from_claim(None).rights("c1") == ""
    assert Grants(everything=True).rights("anything") == "rw"


@pytest.mark.parametrize(
    "claim",
    [
        "rw",
        {"convs": ["c1"]},
        {"convs": {"c1": "admin"}},
        {"convs": {"c1": 1}},
        {"convs": {"": "r"}},
        {"operator": "yes"},
        {"convs": {f"c{i}": "r" for i in range(1001)}},
    ],
)
def test_malformed_grants_are_refused(claim):
    with pytest.raises(IdentityError):
        Grants.from_claim(claim)


async def test_a_token_bucket_allows_its_burst_then_its_rate(autojump_clock):
    bucket = TokenBucket(rate=10.0, burst=5)
    assert [bucket.take() for _ in range(5)] == [0.0] * 5
    wait = bucket.take()
    assert wait == pytest.approx(0.1)
    await trio.sleep(0.1)
    assert bucket.take() == 0.0
    await trio.sleep(60)
    assert [bucket.take() for _ in range(6)][-1] > 0, "refills to the burst, not beyond"
    assert TokenBucket(rate=0, burst=1).take() == 0.0, "rate 0: no limit"


async def test_reserving_runs_into_debt_and_says_how_long_to_wait(autojump_clock):
    bucket = TokenBucket(rate=10.0, burst=2)
    assert [bucket.reserve() for _ in range(2)] == [0.0, 0.0]
    assert bucket.reserve() == pytest.approx(0.1)
    assert bucket.reserve() == pytest.approx(0.2), "each one queues behind the last"
    await trio.sleep(0.2)
    assert bucket.reserve() == pytest.approx(0.1)


async def test_refusals_are_counted_all_and_logged_at_a_bounded_rate(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="test.refusals")
    refusals = RefusalLog(logging.getLogger("test.refusals"), per_minute=3)
    for i in range(10):
        refusals.refuse("rate_limited", "mallory@1.2.3.4", f"attempt {i}")
    assert refusals.counts["rate_limited"] == 10
    assert len(caplog.records) == 3
    await trio.sleep(61)
    refusals.refuse("forbidden", "mallory@1.2.3.4", "again")
    assert len(caplog.records) == 4
    assert "7 more refusals not logged" in caplog.records[-1].getMessage()
