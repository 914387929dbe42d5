"""The quota's token bucket, as arithmetic: refill up to a second's worth, take or say how long
to wait, and let a request over a second's worth through a full bucket, into debt."""

from __future__ import annotations

import pytest

from service.security.token_bucket import take


def test_takes_what_there_is_and_refills_at_the_rate() -> None:
    assert take(10.0, 0.0, 0.0, 4, 10.0) == (6.0, 0.0)
    assert take(0.0, 0.0, 0.5, 5, 10.0) == (0.0, 0.0)  # half a second refilled five
    assert take(10.0, 0.0, 99.0, 1, 10.0) == (9.0, 0.0)  # never more than a second's worth


def test_short_of_tokens_it_says_how_long_to_wait_and_takes_none() -> None:
    level, wait = take(2.0, 0.0, 0.0, 6, 10.0)
    assert level == 2.0 and wait == pytest.approx(0.4 + 0.01)


def test_a_request_over_a_seconds_worth_needs_a_full_bucket_and_leaves_debt() -> None:
    assert take(10.0, 0.0, 0.0, 25, 10.0) == (-15.0, 0.0)
    level, wait = take(-15.0, 0.0, 1.0, 1, 10.0)  # a second later: still 5 in debt
    assert level == -5.0 and wait == pytest.approx(0.6 + 0.01)


def test_a_negative_count_gives_tokens_back_up_to_a_full_bucket() -> None:
    assert take(-15.0, 0.0, 0.0, -25, 10.0) == (10.0, 0.0)  # a refused request's 25 back
    assert take(2.0, 0.0, 0.0, -3, 10.0) == (5.0, 0.0)
    assert take(-100.0, 0.0, 0.0, -30, 10.0) == (-70.0, 0.0)  # debt from an applied request


def test_a_clock_before_the_last_update_refills_nothing_and_takes_nothing() -> None:
    """A clock stepped back, or a take that read its clock before another's committed."""
    assert take(10.0, 5.0, 4.0, 1, 10.0) == (9.0, 0.0)  # was -1: refused for 1 s
    assert take(-15.0, 5.0, 4.0, -25, 10.0) == (10.0, 0.0)
