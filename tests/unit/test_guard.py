"""The resource guard's decisions (fanout/guard.py), fed samples by hand: no
process, no clock, milliseconds each. The node tests (tests/server/test_guard.py)
drive the same guard with real load."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from fanout.config import load
from fanout.guard import SHED_COOLDOWN, Guard, LagProbe, Sample, Sampler, memory_limit, usable_cores
from fanout.metrics import Metrics

GIB = 1 << 30


def make(**env: str) -> tuple[Guard, Metrics]:
    m = Metrics()
    return Guard(load({k: str(v) for k, v in env.items()}), m, rng=random.Random(1)), m


def s(cpu: float = 0.0, lag: float = 0.0, mem: float = 10.0) -> Sample:
    return Sample(cpu, lag, int(mem / 100 * GIB), GIB)


def metric(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    v = m.registry.get_sample_value(name, labels or {})
    return 0.0 if v is None else v


def test_cpu_brake_needs_two_samples_and_releases_below_resume():
    g, m = make(WS_CPU_REJECT_THRESHOLD=75, WS_CPU_RESUME_THRESHOLD=65, WS_CPU_THROTTLE_THRESHOLD=0)
    assert g.update(s(cpu=90)).changed == []          # one busy second is no overload
    assert g.update(s(cpu=20)).changed == []          # and the count restarts
    g.update(s(cpu=80))
    a = g.update(s(cpu=80))
    assert a.changed == ["brake cpu on", "throttle on"] and g.braking and g.reasons == ["cpu"]
    assert metric(m, "fanout_guard_braking", {"reason": "cpu"}) == 1 and metric(m, "fanout_braking") == 1
    refusal = g.refusal()
    assert refusal is not None and refusal[:2] == (503, "overload") and 5 <= refusal[3] <= 10
    assert g.update(s(cpu=70)).changed == []          # between resume and reject: still braking
    a = g.update(s(cpu=60))
    assert a.changed == ["brake cpu off", "throttle off"] and not g.braking and g.refusal() is None
    assert metric(m, "fanout_braking") == 0


def test_retry_after_is_jittered():
    g, _ = make(WS_CPU_REJECT_THRESHOLD=50, WS_CPU_RESUME_THRESHOLD=40, WS_CPU_THROTTLE_THRESHOLD=0)
    g.update(s(cpu=99))
    g.update(s(cpu=99))
    values = set()
    for _ in range(50):
        r = g.refusal()
        assert r is not None
        values.add(r[3])
    assert len(values) > 1 and min(values) >= 5 and max(values) <= 10


def test_throttle_comes_before_the_brake_with_hysteresis():
    g, m = make(WS_CPU_REJECT_THRESHOLD=75, WS_CPU_RESUME_THRESHOLD=65, WS_CPU_THROTTLE_THRESHOLD=60)
    g.update(s(cpu=62))
    a = g.update(s(cpu=62))
    assert a.throttle is True and not g.braking and metric(m, "fanout_guard_throttling") == 1
    assert g.update(s(cpu=55)).throttle is None       # above 60 - (75 - 65) = 50: stays on
    a = g.update(s(cpu=45))
    assert a.throttle is False and metric(m, "fanout_guard_throttling") == 0


def test_any_brake_throttles():
    g, _ = make(WS_CPU_THROTTLE_THRESHOLD=0, WS_MEMORY_REJECT_PERCENT=75, WS_MEMORY_SHED_PERCENT=90)
    a = g.update(s(mem=80))
    assert a.changed == ["brake memory on", "throttle on"]
    a = g.update(s(mem=72))                           # within the 5-point hysteresis
    assert a.changed == []
    a = g.update(s(mem=69))
    assert a.changed == ["brake memory off", "throttle off"]


def test_loop_lag_brakes_and_paces_ingest():
    g, m = make(WS_MAX_LOOP_LAG_MS=200, WS_CPU_REJECT_THRESHOLD=0, WS_CPU_THROTTLE_THRESHOLD=0, WS_GUARD_INTERVAL=1)
    a = g.update(s(lag=0.05))
    assert a.pause == 0 and a.changed == []
    a = g.update(s(lag=0.15))                          # half the limit: ingest slows, no brake yet
    assert a.pause == pytest.approx(0.15) and not g.braking
    a = g.update(s(lag=0.9))
    assert a.pause == pytest.approx(0.5)               # at most half an interval per sample
    a = g.update(s(lag=0.3))
    assert a.changed == ["brake loop_lag on", "throttle on"] and g.reasons == ["loop_lag"]
    assert g.update(s(lag=0.12)).changed == []         # above half the limit
    assert g.update(s(lag=0.05)).changed == ["brake loop_lag off", "throttle off"]
    assert metric(m, "fanout_guard_ingest_paused_seconds_total") == pytest.approx(0.15 + 0.5 + 0.3 + 0.12)
    assert metric(m, "fanout_loop_lag_seconds_count") == 6


def test_memory_shed_frees_down_to_the_reject_level_then_cools_down():
    g, _ = make(WS_MEMORY_REJECT_PERCENT=75, WS_MEMORY_SHED_PERCENT=90)
    a = g.update(s(mem=95))
    assert a.shed_bytes == pytest.approx(0.20 * GIB, rel=1e-6) and g.braking
    for _ in range(SHED_COOLDOWN):
        assert g.update(s(mem=95)).shed_bytes == 0     # let the freed memory show first
    assert g.update(s(mem=95)).shed_bytes > 0
    g.note_shed(2)
    assert g.status()["shed_total"] == 2


def test_zero_turns_each_check_off():
    g, _ = make(WS_CPU_REJECT_THRESHOLD=0, WS_CPU_THROTTLE_THRESHOLD=0, WS_MAX_LOOP_LAG_MS=0,
                WS_MEMORY_REJECT_PERCENT=0, WS_MEMORY_SHED_PERCENT=0)
    for _ in range(5):
        a = g.update(s(cpu=100, lag=10, mem=99))
        assert a.changed == [] and a.shed_bytes == 0 and a.pause == 0
    assert not g.braking


def test_status_reports_every_state():
    g, _ = make()
    g.update(s(cpu=12.34, lag=0.0123, mem=40))
    st = g.status()
    assert st["braking"] is False and st["reasons"] == [] and st["throttling"] is False
    assert st["cpu_percent"] == 12.3 and st["loop_lag_ms"] == 12.3 and st["memory_percent"] == 40.0
    assert st["thresholds"]["cpu_reject"] == 75 and st["thresholds"]["memory_shed"] == 90


@pytest.mark.parametrize("env, problem", [
    ({"WS_CPU_REJECT_THRESHOLD": "50"}, "WS_CPU_RESUME_THRESHOLD"),        # default resume 65 >= 50
    ({"WS_CPU_THROTTLE_THRESHOLD": "80"}, "WS_CPU_THROTTLE_THRESHOLD"),
    ({"WS_MEMORY_REJECT_PERCENT": "95"}, "WS_MEMORY_REJECT_PERCENT"),
    ({"WS_USER_LIMIT_POLICY": "kick"}, "WS_USER_LIMIT_POLICY"),
])
def test_bad_settings_name_the_variable(env, problem):
    from fanout.config import ConfigError

    with pytest.raises(ConfigError, match=problem):
        load(env)


# ------------------------------------------------------------ the readings
def test_sampler_cpu_is_percent_of_usable_cores():
    t = [100.0]
    sampler = Sampler(clock=lambda: t[0])
    t[0] += 1.0
    busy = sampler._cpu_seconds() + 0.2
    while sampler._cpu_seconds() < busy:      # really burn 0.2 s of CPU on this thread
        pass
    pct = sampler.cpu_percent()
    # 0.2 s CPU in 1 s of (fake) wall time: 20 % of one core, spread over the usable cores.
    assert pct == pytest.approx(20.0 / sampler.cores, rel=0.25)
    assert sampler.sample(0.01).loop_lag == 0.01


def test_sampler_memory_limit_setting_measures_rss():
    sampler = Sampler(limit_bytes=8 * GIB)
    smp = sampler.sample(0.0)
    assert sampler.memory_source == "setting" and smp.memory_limit == 8 * GIB
    assert 10 << 20 < smp.memory_used < 8 * GIB


def _cgroup(tmp: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp


def test_cgroup_v2_limits(tmp_path, monkeypatch):
    monkeypatch.setattr("fanout.guard._own_cgroups", lambda: {"": "/"})
    root = _cgroup(tmp_path, {"memory.max": "1073741824\n", "memory.current": "600000000\n",
                              "memory.stat": "anon 1\ninactive_file 100000000\n", "cpu.max": "150000 100000\n"})
    limit, used = memory_limit(root) or (0, lambda: 0)
    assert limit == GIB and used() == 500_000_000
    assert usable_cores(root) == pytest.approx(min(1.5, float(len(__import__("os").sched_getaffinity(0)))))
    (root / "memory.max").write_text("max\n")
    (root / "cpu.max").write_text("max 100000\n")
    assert memory_limit(root) is None


def test_cgroup_v1_limits(tmp_path, monkeypatch):
    monkeypatch.setattr("fanout.guard._own_cgroups", lambda: {"memory": "/pod", "cpu": "/pod", "cpuacct": "/pod"})
    root = _cgroup(tmp_path, {"memory/pod/memory.limit_in_bytes": "2147483648\n",
                              "memory/pod/memory.usage_in_bytes": "1000\n",
                              "memory/pod/memory.stat": "total_inactive_file 400\n",
                              "cpu,cpuacct/pod/cpu.cfs_quota_us": "50000\n",
                              "cpu,cpuacct/pod/cpu.cfs_period_us": "100000\n"})
    limit, used = memory_limit(root) or (0, lambda: 0)
    assert limit == 2 * GIB and used() == 600
    assert usable_cores(root) == 0.5
    (root / "memory/pod/memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_limit(root) is None


async def test_lag_probe_sees_a_blocked_loop():
    loop = asyncio.get_running_loop()
    probe = LagProbe(loop, interval=0.01)
    probe.start()
    try:
        await asyncio.sleep(0.05)
        assert probe.take() < 0.05
        # Block the loop for 0.15 s (a stand-in for a long callback), then let the probe run.
        import time

        end = time.monotonic() + 0.15
        while time.monotonic() < end:
            pass
        await asyncio.sleep(0.02)
        assert probe.take() >= 0.1
        assert probe.take() < 0.05                      # taken: reset
    finally:
        probe.stop()
