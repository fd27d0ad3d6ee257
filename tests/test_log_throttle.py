"""LogThrottle: each key once per interval (or once), within a bound on the keys kept."""

from __future__ import annotations

from cascadeinfer.log_throttle import LogThrottle


def test_a_key_is_logged_once_per_interval() -> None:
    t = LogThrottle(60.0)
    assert t.should_log("a", 0.0) and not t.should_log("a", 59.0)
    assert t.should_log("b", 59.0) and t.should_log("a", 60.0)


def test_without_an_interval_a_key_is_logged_once_and_the_keys_kept_are_bounded() -> None:
    t = LogThrottle(max_keys=2)
    assert t.should_log("a", 0.0) and not t.should_log("a", 1e9)
    assert t.should_log("b", 1.0)
    assert t.should_log("c", 2.0)  # past the bound: the keys are forgotten
    assert t.should_log("a", 3.0)
