"""The resource guard: CPU, event-loop lag and memory, sampled about once a second.

The plan's ``resource_guard.go`` in one module: it measures (:class:`Sampler`,
:class:`LagProbe`), decides (:class:`Guard`, a state machine fed one
:class:`Sample` per ``WS_GUARD_INTERVAL``) and reports (metrics, ``/health``,
one log line per state change). The server applies what it decides
(:class:`Actions`): it refuses handshakes while braking, turns load shedding
on and off in the hub, closes the clients with the most queued bytes, and
pauses NATS consumption.

What is measured
----------------
- **CPU %**: process CPU time (user + system, all threads) over wall time
  since the previous sample, as a percent of the cores the process may use:
  the smaller of its CPU affinity and its cgroup quota (``cpu.max``, or
  ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` on cgroup v1). So 75 % means
  three quarters of the CPU this process can get, whether the work runs on the
  one event-loop thread or on several flush threads. One event loop cannot
  use more than one core: on a machine with more cores than the node has
  threads, its saturation shows as loop lag (below) before CPU % gets high.
  Give a node one core per busy thread (a Kubernetes limit of 1 CPU for one
  loop) and CPU % is the loop's. The usable cores are read once, at start.
- **Loop lag**: a timer every :data:`PROBE_INTERVAL` notes how late it runs;
  a sample holds the largest lateness since the previous one. That is how long
  any ready callback (a client's frame, a NATS message) waited for the loop.
- **Memory**: with ``WS_MEMORY_LIMIT_BYTES`` set, the process RSS against it;
  else, with a cgroup memory limit (v2 ``memory.max``, v1
  ``memory.limit_in_bytes``, the process's own cgroup), the cgroup's working
  set (usage minus inactive file cache: what the kubelet and the OOM killer
  count) against it; else the process RSS against the machine's RAM.

What is decided
---------------
- **Brake** (new handshakes get 503 with a jittered ``Retry-After``, ``/ready``
  503 with the reasons; connected clients are served as before), for each
  reason on its own:

  - ``cpu``: at or over ``WS_CPU_REJECT_THRESHOLD`` for :data:`SUSTAIN`
    samples in a row; off below ``WS_CPU_RESUME_THRESHOLD``;
  - ``loop_lag``: lag at or over ``WS_MAX_LOOP_LAG_MS`` for :data:`SUSTAIN`
    samples; off below half of it;
  - ``memory``: at or over ``WS_MEMORY_REJECT_PERCENT`` (one sample: memory
    does not flicker like CPU); off :data:`MEMORY_HYSTERESIS` points below.

- **Throttle** (the hub drops ``low`` priority messages for every client and
  says so with ``throttle_update``): CPU at or over
  ``WS_CPU_THROTTLE_THRESHOLD`` for :data:`SUSTAIN` samples, or any brake;
  off once no brake is on and CPU is below the throttle threshold minus the
  brake's hysteresis gap (reject - resume).
- **Shed**: at or over ``WS_MEMORY_SHED_PERCENT``, the bytes to free to get
  back under the reject level; the server closes the clients with the most
  queued bytes (1013) until their queues add up to it. Then
  :data:`SHED_COOLDOWN` samples pass without shedding, so the next decision
  sees what the last one freed. Queued bytes are an estimate of what a close
  frees: message bodies are shared between clients, so a body still queued
  for another client stays in memory.
- **Pace**: while the lag is at least half of ``WS_MAX_LOOP_LAG_MS``, NATS
  consumption pauses for the lag, at most half an interval per sample (so
  ingest keeps at least half its time and JetStream retention is not outrun);
  the backlog waits in JetStream, nothing is lost.

A threshold of 0 turns its check off (``WS_MAX_LOOP_LAG_MS=0`` also stops the
probe, and loop lag then reads 0). The guard's own cost is one timer
callback per :data:`PROBE_INTERVAL` and one sample (a few ``/proc`` and
cgroup reads, about 0.1 ms) per interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from .log import event

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics

__all__ = ["Actions", "Guard", "LagProbe", "Sample", "Sampler", "REASONS", "usable_cores", "memory_limit"]

PROBE_INTERVAL = 0.1     # seconds between loop-lag probes: ten callbacks a second cost nothing measurable
SUSTAIN = 2              # samples in a row over a CPU or lag threshold before it counts (one busy second is no overload)
MEMORY_HYSTERESIS = 5.0  # percent points below WS_MEMORY_REJECT_PERCENT before the memory brake releases
SHED_COOLDOWN = 3        # samples without shedding after a shed: let the freed memory show first
BRAKE_RETRY_AFTER = 5    # seconds; Retry-After is jittered to 1-2x this so refused clients do not return together
REASONS = ("cpu", "loop_lag", "memory")
_NO_LIMIT = 1 << 60      # cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages)

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of the process."""

    cpu_percent: float          # of the usable cores (see the module docstring)
    loop_lag: float             # seconds: largest timer lateness since the previous sample
    memory_used: int            # bytes
    memory_limit: int           # bytes (> 0)
    cores: float = 1.0          # usable cores: cpu_percent * cores = percent of one core
    rss: int = 0                # process resident memory, bytes

    @property
    def memory_percent(self) -> float:
        return 100.0 * self.memory_used / self.memory_limit if self.memory_limit > 0 else 0.0


@dataclass(slots=True)
class Actions:
    """What the server must do after a sample."""

    throttle: bool | None = None      # turn load shedding on/off (None: unchanged)
    shed_bytes: int = 0               # close the most-queued clients until this many queued bytes go
    pause: float = 0.0                # pause NATS consumption for this long
    changed: list[str] = field(default_factory=list)   # human-readable transitions, for tests and logs


# ------------------------------------------------------------------ readings
def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _own_cgroups(proc_cgroup: Path = Path("/proc/self/cgroup")) -> dict[str, str]:
    """controller -> path of this process's cgroup ("" for the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for ctl in (parts[1].split(",") if parts[1] else [""]):
            out[ctl] = parts[2]
    return out


def _cgroup_dirs(controller: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """Where this process's cgroup files for ``controller`` may be, most specific first.

    Inside a container with its own cgroup namespace the mount root is the
    container's cgroup; on a host it is the process's path under it."""
    own = _own_cgroups()
    dirs = []
    v2 = own.get("")
    if v2 is not None:
        dirs.append(root / v2.lstrip("/"))
    dirs.append(root)
    v1 = own.get(controller)
    for name in ((controller, "cpu,cpuacct") if controller == "cpu" else (controller,)):
        base = root / name
        if v1 is not None:
            dirs.append(base / v1.lstrip("/"))
        dirs.append(base)
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def usable_cores(root: Path = CGROUP_ROOT) -> float:
    """Cores this process may use: its CPU affinity, lowered by a cgroup CPU quota."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = float(os.cpu_count() or 1)
    for d in _cgroup_dirs("cpu", root):
        v2 = _read(d / "cpu.max")
        if v2:
            quota, _, period = v2.partition(" ")
            if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
                return max(0.01, min(cores, int(quota) / int(period)))
            if quota == "max":
                break
        q, p = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if q is not None and p is not None:
            try:
                quota_us, period_us = int(q), int(p)
            except ValueError:
                break
            if quota_us > 0 and period_us > 0:
                return max(0.01, min(cores, quota_us / period_us))
            break
    return max(1.0, cores)


def _stat_value(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def memory_limit(root: Path = CGROUP_ROOT) -> tuple[int, Callable[[], int]] | None:
    """(limit, a function returning the working set) of this process's cgroup, or None without a limit."""
    for d in _cgroup_dirs("memory", root):
        v2 = _read(d / "memory.max")
        if v2 is not None:
            if not v2.isdigit():
                return None          # "max": no limit here
            limit = int(v2)

            def used_v2(d: Path = d) -> int:
                cur = _read(d / "memory.current")
                inactive = _stat_value(_read(d / "memory.stat"), "inactive_file")
                return max(0, int(cur) - inactive) if cur and cur.isdigit() else 0
            return limit, used_v2
        v1 = _read(d / "memory.limit_in_bytes")
        if v1 is not None:
            if not v1.isdigit() or int(v1) >= _NO_LIMIT:
                return None

            def used_v1(d: Path = d) -> int:
                cur = _read(d / "memory.usage_in_bytes")
                inactive = _stat_value(_read(d / "memory.stat"), "total_inactive_file")
                return max(0, int(cur) - inactive) if cur and cur.isdigit() else 0
            return int(v1), used_v1
    return None


class Sampler:
    """Reads CPU and memory of this process (the module docstring defines both).

    ``limit_bytes`` > 0 (``WS_MEMORY_LIMIT_BYTES``) measures the RSS against it.
    The memory source is fixed at construction: ``setting``, ``cgroup`` or ``ram``.
    """

    def __init__(self, limit_bytes: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self._proc = psutil.Process()
        self._clock = clock
        self.cores = usable_cores()
        self._last_cpu = self._cpu_seconds()
        self._last_wall = clock()
        self._used: Callable[[], int]
        if limit_bytes > 0:
            self.memory_source, self.limit = "setting", limit_bytes
            self._used = self._rss
        else:
            cg = memory_limit()
            if cg is not None:
                self.memory_source, (self.limit, self._used) = "cgroup", cg
            else:
                self.memory_source, self.limit = "ram", int(psutil.virtual_memory().total)
                self._used = self._rss

    def _cpu_seconds(self) -> float:
        t = self._proc.cpu_times()
        return float(t.user + t.system)

    def _rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def cpu_percent(self) -> float:
        """Percent of the usable cores since the previous call (0 on a zero interval)."""
        cpu, wall = self._cpu_seconds(), self._clock()
        dc, dw = cpu - self._last_cpu, wall - self._last_wall
        self._last_cpu, self._last_wall = cpu, wall
        if dw <= 0:
            return 0.0
        return max(0.0, 100.0 * dc / dw / self.cores)

    def sample(self, loop_lag: float) -> Sample:
        return Sample(self.cpu_percent(), loop_lag, self._used(), self.limit, self.cores, self._rss())


class LagProbe:
    """How late the event loop runs a timer: one ``call_at`` every ``interval``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = PROBE_INTERVAL) -> None:
        self._loop = loop
        self._interval = interval
        self._due = 0.0
        self._max = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._due = self._loop.time() + self._interval
            self._handle = self._loop.call_at(self._due, self._fire)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        now = self._loop.time()
        late = now - self._due
        if late > self._max:
            self._max = late
        self._due = now + self._interval
        self._handle = self._loop.call_at(self._due, self._fire)

    def take(self) -> float:
        """Largest lateness since the last call (a probe overdue right now counts too)."""
        late = max(self._max, self._loop.time() - self._due if self._handle is not None else 0.0)
        self._max = 0.0
        return max(0.0, late)


# ------------------------------------------------------------------ decisions
class Guard:
    """The state machine: :meth:`update` takes one :class:`Sample`, returns :class:`Actions`.

    Pure apart from metrics and log lines, so tests feed it samples; the
    server calls :meth:`tick` (probe + sampler) every ``WS_GUARD_INTERVAL``.
    """

    def __init__(self, cfg: Config, metrics: Metrics | None = None, *,
                 sampler: Sampler | None = None, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._sampler = sampler
        self._probe: LagProbe | None = None
        self._rng = rng or random.Random()
        self.brakes: dict[str, bool] = dict.fromkeys(REASONS, False)
        self.throttling = False
        self._over = {"cpu": 0, "loop_lag": 0, "throttle": 0}
        self._cooldown = 0
        self.last: Sample | None = None
        self.shed_total = 0
        self.paused_total = 0.0
        self.samples = 0

    # ---------------------------------------------------------- lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin measuring (the sampler needs the process, the probe the loop)."""
        if self._sampler is None:
            self._sampler = Sampler(self.cfg.ws_memory_limit_bytes)
        self._probe = LagProbe(loop)
        if self.cfg.ws_max_loop_lag_ms > 0:
            self._probe.start()      # with the lag check off, no probe: the guard then costs one sample per interval
        if self.metrics is not None:
            self.metrics.guard_cpu_cores.set(self._sampler.cores)
            self.metrics.guard_memory_limit.set(self._sampler.limit)
            for r in REASONS:
                self.metrics.guard_braking.labels(r).set(0)
            self.metrics.guard_throttling.set(0)

    def stop(self) -> None:
        if self._probe is not None:
            self._probe.stop()

    def tick(self) -> Actions:
        """Take a sample now and decide."""
        assert self._sampler is not None and self._probe is not None, "start() first"
        return self.update(self._sampler.sample(self._probe.take()))

    # ------------------------------------------------------------- state
    @property
    def braking(self) -> bool:
        return any(self.brakes.values())

    @property
    def reasons(self) -> list[str]:
        return [r for r in REASONS if self.brakes[r]]

    def refusal(self) -> tuple[int, str, str, int] | None:
        """The handshake refusal while braking (503, jittered Retry-After), or None."""
        if not self.braking:
            return None
        retry = self._rng.randint(BRAKE_RETRY_AFTER, 2 * BRAKE_RETRY_AFTER)
        return (503, "overload", f"Service Unavailable: node is overloaded ({', '.join(self.reasons)})\n", retry)

    def status(self) -> dict[str, Any]:
        """The guard's state for /health."""
        s = self.last
        out: dict[str, Any] = {"braking": self.braking, "reasons": self.reasons, "throttling": self.throttling,
                               "shed_total": self.shed_total, "ingest_paused_s": round(self.paused_total, 3)}
        if self._sampler is not None:
            out["cpu_cores"] = self._sampler.cores
            out["memory_source"] = self._sampler.memory_source
        if s is not None:
            out.update(cpu_percent=round(s.cpu_percent, 1), loop_lag_ms=round(s.loop_lag * 1000, 1),
                       memory_used_bytes=s.memory_used, memory_limit_bytes=s.memory_limit,
                       memory_percent=round(s.memory_percent, 1))
        cfg = self.cfg
        out["thresholds"] = {"cpu_reject": cfg.ws_cpu_reject_threshold, "cpu_resume": cfg.ws_cpu_resume_threshold,
                             "cpu_throttle": cfg.ws_cpu_throttle_threshold, "max_loop_lag_ms": cfg.ws_max_loop_lag_ms,
                             "memory_reject": cfg.ws_memory_reject_percent, "memory_shed": cfg.ws_memory_shed_percent}
        return out

    # ------------------------------------------------------------ decide
    def _sustained(self, key: str, over: bool) -> bool:
        self._over[key] = self._over[key] + 1 if over else 0
        return self._over[key] >= SUSTAIN

    def _set_brake(self, reason: str, on: bool, actions: Actions, s: Sample) -> None:
        if self.brakes[reason] == on:
            return
        self.brakes[reason] = on
        actions.changed.append(f"brake {reason} {'on' if on else 'off'}")
        if self.metrics is not None:
            self.metrics.guard_braking.labels(reason).set(1 if on else 0)
        event(logging.WARNING if on else logging.INFO,
              "emergency brake on: refusing new connections" if on else "emergency brake off",
              reason=reason, cpu_percent=round(s.cpu_percent, 1), loop_lag_ms=round(s.loop_lag * 1000, 1),
              memory_percent=round(s.memory_percent, 1), braking=self.reasons)

    def update(self, s: Sample) -> Actions:
        cfg = self.cfg
        actions = Actions()
        self.last = s
        self.samples += 1
        # CPU brake
        reject, resume = cfg.ws_cpu_reject_threshold, cfg.ws_cpu_resume_threshold
        if reject > 0:
            hot = self._sustained("cpu", s.cpu_percent >= reject)
            if hot:
                self._set_brake("cpu", True, actions, s)
            elif self.brakes["cpu"] and s.cpu_percent < resume:
                self._set_brake("cpu", False, actions, s)
        else:
            self._set_brake("cpu", False, actions, s)
        # loop-lag brake
        max_lag = cfg.ws_max_loop_lag_ms / 1000.0
        if max_lag > 0:
            if self._sustained("loop_lag", s.loop_lag >= max_lag):
                self._set_brake("loop_lag", True, actions, s)
            elif self.brakes["loop_lag"] and s.loop_lag < max_lag / 2:
                self._set_brake("loop_lag", False, actions, s)
            if s.loop_lag >= max_lag / 2:
                actions.pause = min(s.loop_lag, cfg.ws_guard_interval / 2)
                self.paused_total += actions.pause
        # memory brake and shedding
        mem = s.memory_percent
        mreject = cfg.ws_memory_reject_percent
        if mreject > 0:
            if mem >= mreject:
                self._set_brake("memory", True, actions, s)
            elif mem < mreject - MEMORY_HYSTERESIS:
                self._set_brake("memory", False, actions, s)
        shed = cfg.ws_memory_shed_percent
        if self._cooldown > 0:
            self._cooldown -= 1
        elif shed > 0 and mem >= shed:
            target = (mreject if mreject > 0 else shed) / 100.0 * s.memory_limit
            actions.shed_bytes = max(1, int(s.memory_used - target))
            self._cooldown = SHED_COOLDOWN
            event(logging.WARNING, "memory at the shed limit: closing the clients with the most queued bytes (1013)",
                  memory_percent=round(mem, 1), limit=shed, to_free=actions.shed_bytes)
        # throttle (load shedding of low priority)
        throttle = cfg.ws_cpu_throttle_threshold
        hot = throttle > 0 and self._sustained("throttle", s.cpu_percent >= throttle)
        gap = max(0.0, reject - resume) if reject > 0 else 0.0
        want = self.throttling
        if hot or self.braking:
            want = True
        elif self.throttling and (throttle <= 0 or s.cpu_percent < throttle - gap):
            want = False
        if want != self.throttling:
            self.throttling = want
            actions.throttle = want
            actions.changed.append(f"throttle {'on' if want else 'off'}")
            event(logging.WARNING if want else logging.INFO,
                  "load shedding on: low-priority messages dropped for every client" if want
                  else "load shedding off", cpu_percent=round(s.cpu_percent, 1), braking=self.reasons)
        self._export(s, actions)
        return actions

    def note_shed(self, clients: int) -> None:
        """The server closed this many clients for a shed."""
        self.shed_total += clients
        if self.metrics is not None and clients:
            self.metrics.guard_shed.inc(clients)

    def _export(self, s: Sample, actions: Actions) -> None:
        m = self.metrics
        if m is None:
            return
        m.guard_cpu_percent.set(s.cpu_percent)
        m.cpu_percent.set(s.cpu_percent * s.cores)   # the one CPU sample: percent of one core
        m.memory_rss.set(s.rss)
        m.guard_loop_lag.set(s.loop_lag)
        m.loop_lag.observe(s.loop_lag)
        m.guard_memory_used.set(s.memory_used)
        m.guard_memory_limit.set(s.memory_limit)
        m.guard_memory_percent.set(s.memory_percent)
        m.guard_throttling.set(1 if self.throttling else 0)
        m.braking.set(1 if self.braking else 0)
        if actions.pause:
            m.guard_ingest_paused.inc(actions.pause)
