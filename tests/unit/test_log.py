"""fanout.log: JSON lines, and the log-amplification guard (LogLimiter) against a fake clock."""

from __future__ import annotations

import io
import json
import logging

import pytest
from prometheus_client import CollectorRegistry, Counter

from fanout import log
from fanout.log import LogLimiter
from fanout.metrics import Metrics


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def lines():
    """Capture fanout's JSON log lines (INFO and up) as parsed dicts."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(log.JsonFormatter())
    old_level = log.logger.level
    log.logger.addHandler(handler)
    log.logger.setLevel(logging.INFO)

    def read() -> list[dict]:
        return [json.loads(line) for line in buf.getvalue().splitlines()]

    yield read
    log.logger.removeHandler(handler)
    log.logger.setLevel(old_level)


def counter() -> Counter:
    return Counter("t_log_suppressed", "test", ["reason"], registry=CollectorRegistry())


def test_event_writes_one_json_line_with_fields(lines):
    log.event(logging.INFO, "hello", client=7, peer="127.0.0.1:1")
    (line,) = lines()
    assert line["msg"] == "hello" and line["client"] == 7 and line["level"] == "info"


def test_one_line_per_key_per_interval_then_the_count_rides_on_the_next(lines):
    clock, c = FakeClock(), counter()
    lim = LogLimiter(clock=clock, counter=c)
    key = ("bad_request", 42)
    written = [lim.event(key, logging.INFO, "client error", client=42) for _ in range(1000)]
    assert written[0] and not any(written[1:])
    assert len(lines()) == 1 and "suppressed" not in lines()[0]
    assert c.labels("bad_request")._value.get() == 999
    clock.t += 9.9
    assert not lim.event(key, logging.INFO, "client error", client=42)
    clock.t += 0.1                       # the 10 s window is over
    assert lim.event(key, logging.INFO, "client error", client=42)
    last = lines()[-1]
    assert last["suppressed"] == 1000 and last["client"] == 42
    assert lim.suppressed_total == 1000
    clock.t += 10
    assert lim.event(key, logging.INFO, "client error", client=42)
    assert "suppressed" not in lines()[-1]   # the count was reported once


def test_keys_are_independent(lines):
    lim = LogLimiter(clock=FakeClock())
    assert lim.event(("bad_request", 1), logging.INFO, "client error")
    assert lim.event(("bad_request", 2), logging.INFO, "client error")
    assert lim.event(("flooding", 1), logging.WARNING, "client flooding: closed")
    assert not lim.event(("flooding", 1), logging.WARNING, "client flooding: closed")
    assert len(lines()) == 3


def test_global_cap_holds_many_clients_together(lines):
    clock, c = FakeClock(), counter()
    lim = LogLimiter(clock=clock, global_lines=50, counter=c)
    written = sum(lim.event(("bad_request", i), logging.INFO, "client error", client=i) for i in range(5000))
    assert written == 50 and len(lines()) == 50
    assert c.labels("bad_request")._value.get() == 4950
    clock.t += 10
    # A client held back by the global cap reports its count on its next line.
    assert lim.event(("bad_request", 4999), logging.INFO, "client error", client=4999)
    assert lines()[-1]["suppressed"] == 1


def test_flood_of_80k_lines_in_3_s_writes_one(lines):
    """The issue's case: "client flooding: closed" for every frame after the strike limit."""
    clock = FakeClock()
    lim = LogLimiter(clock=clock)
    for _ in range(80_000):
        clock.t += 3 / 80_000
        lim.event(("flooding", 9), logging.WARNING, "client flooding: closed", client=9)
    assert len(lines()) == 1


def test_memory_is_bounded_and_old_keys_are_forgotten():
    clock = FakeClock()
    lim = LogLimiter(clock=clock, max_keys=100, global_lines=10**9)
    for i in range(1000):
        lim.allow(("bad_request", i))
    assert len(lim._keys) == 100           # past max_keys: global cap only
    assert lim.allow(("bad_request", 999)) == 0   # an unremembered key still gets out
    clock.t += 10
    lim.allow(("bad_request", "new"))      # a call after an interval sweeps quiet keys
    assert len(lim._keys) == 1


def test_a_held_back_count_survives_a_sweep_for_a_while():
    clock = FakeClock()
    lim = LogLimiter(clock=clock)
    key = ("bad_request", 1)
    assert lim.allow(key) == 0
    assert lim.allow(key) is None
    clock.t += 30                          # swept twice in between
    lim.allow(("other", 0))
    assert lim.allow(key) == 1


def test_disabled_level_is_neither_written_nor_counted(lines):
    c = counter()
    lim = LogLimiter(clock=FakeClock(), counter=c)
    for _ in range(5):
        assert not lim.event(("bad_request", 1), logging.DEBUG, "client error")
    assert lines() == [] and lim.suppressed_total == 0


def test_key_must_start_with_a_reason_string():
    lim = LogLimiter(clock=FakeClock())
    with pytest.raises(TypeError):
        lim.allow((42, "bad_request"))
    with pytest.raises(TypeError):
        lim.allow(())


def test_module_level_limited_event_counts_in_the_bound_node_metric(lines, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(log, "_limiter", LogLimiter(clock=clock))
    m = Metrics()
    log.bind_counter(m.log_suppressed)
    for _ in range(3):
        log.limited_event(("unit_test_reason", 1), logging.INFO, "client error")
    assert len(lines()) == 1
    assert 'fanout_log_suppressed_total{reason="unit_test_reason"} 2.0' in m.render().decode()
    log.bind_counter(None)
