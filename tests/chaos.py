"""Fault-injection harness for the compute-seconds meter.

    python -m tests.chaos --rounds 50 --seed 1

It starts its own PostgreSQL 15 cluster and Redis on free 127.0.0.1 ports, the
capture server (the PostHog stand-in), two Celery workers, Celery beat and
three control-plane processes that embed the metering client. Each round
feeds a seeded random workload through the control-plane processes, plus some
``metering.record_connection_end`` messages sent by name. Meanwhile it
injects a seeded random mix of faults (FAULT_WEIGHTS and WORKLOAD_FAULTS):
killed and restarted workers, drains crashed after a 2xx and before the
delete, Redis stopped or frozen, PostgreSQL restarted, capture server errors,
stalls, resets, 413s and a poisoned event, overlapping drains, an expired
drain lock, clock skew, late increments, and control-plane processes stopped
with SIGTERM or SIGKILL.

After the rounds it lifts every fault, stops the control-plane processes with
a normal exit (their clients flush at exit), lets beat drain everything and
then compares what the capture server accepted, folded by uuid, with the
expected totals per org and bucket, in thousandths of compute seconds.
Connections recorded by a SIGKILLed control-plane process after its last
confirmed publish may be lost; that is the one accepted loss, reported in its
own column. The exit status is 1 when anything was over-billed or lost beyond
that, when a uuid arrived twice with different content, or when
``record_connection_end`` raised; it is 2 when the system did not settle.

Buckets are 5 s with a 2 s grace, so rounds take a few seconds each. With
``--keep`` the run directory (logs, ledgers, events) is kept for inspection.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tests import chaos_accounting as accounting
from tests.capture_server import read_jsonl
from tests.chaos_hooks import AFTER_BATCH, BEFORE_DELETE
from tests.chaos_services import (
    CaptureProcess,
    CeleryWorker,
    ManagedProcess,
    PostgresCluster,
    RedisServer,
    unavailable_reason,
    wait_for,
)

BUCKET_SECONDS = 5
GRACE_SECONDS = 2
DRAIN_LOCK_TIMEOUT_SECONDS = 5
VISIBILITY_TIMEOUT_SECONDS = 5
QUEUE = "chaos"
# Clients and the task-by-name sender send a message again when no worker confirmed it within this time.
CONFIRM_SECONDS = 5
TASK_CONFIRM_SECONDS = CONFIRM_SECONDS
TASK_CONFIRM_POLL_SECONDS = 0.5
API_KEY = "phc_chaos"
ORGS = tuple(f"org-{index:02d}" for index in range(12))
END_REASONS = ("client_disconnect", "idle_reap", "user_error", "fatal_error", "shutdown", "other")
WORKERS = 2
CONTROL_PLANES = 3
# A record_connection_end call slower than this counts as hurting the connection. A call that waited
# on the broker would take at least the publish timeout (1 s here), while scheduling noise on a busy
# machine stays far below it.
MAX_RECORD_SECONDS = 0.5

# Relative weights of the faults a round draws from.
FAULT_WEIGHTS = {
    "worker_kill_mid_batch": 6,
    "worker_kill": 4,
    "worker_restart": 3,
    "worker_kill_mid_drain": 4,
    "drain_kill_after_2xx": 5,
    "redis_stop": 5,
    "redis_freeze": 5,
    "pg_restart": 5,
    "pg_restart_during_delete": 3,
    "capture_500": 4,
    "capture_502": 3,
    "capture_429": 4,
    "capture_stall": 3,
    "capture_reset": 3,
    "capture_413": 3,
    "capture_poison": 2,
    "concurrent_drains": 3,
    "lock_expiry": 1,
    "ship_now": 2,
    "cp_sigterm": 4,
    "cp_sigkill": 2,
    "cp_sigterm_redis_down": 2,
    "cp_sigterm_redis_frozen": 2,
}
FAULT_COUNT_WEIGHTS = {0: 1, 1: 4, 2: 4, 3: 2}
# Probabilities that a round's workload gets each kind of unusual input.
WORKLOAD_FAULTS = {
    "clock_skew": 0.35,
    "late_increment": 0.3,
    "task_by_name": 0.3,
    "duplicate_record": 0.3,
    "invalid_input": 0.2,
}


class Chaos:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        # PostgreSQL runs as the postgres user and needs to reach its directory inside this one.
        self.root = Path(tempfile.mkdtemp(prefix="chaos-"))
        os.chmod(self.root, 0o755)
        self.log_dir = self.root / "logs"
        self.hook_dir = self.root / "hooks"
        for directory in (self.log_dir, self.hook_dir, self.root / "ledgers", self.root / "var"):
            directory.mkdir()

        self.injected = collections.Counter()
        self.not_triggered = collections.Counter()
        self.problems = []
        self.specs = {}
        self.next_id = 0
        self.instances = []
        self.task_sends = []
        self.subprocess_exits = collections.Counter()
        self.recent_keys = collections.deque(maxlen=200)
        self.max_future_end = 0.0

        # Faults run in parallel threads. These locks keep two of them off the same process.
        self.redis_lock = threading.Lock()
        self.pg_lock = threading.Lock()
        self.cp_lock = threading.Lock()
        self.hook_lock = threading.Lock()
        self.worker_lock = threading.Lock()

        self.drains = []
        self.drain_count = 0
        self.sender_queue = queue.Queue()
        # Messages sent by name that no worker confirmed yet: task id -> (name, kwargs, when to send again).
        self.unconfirmed_tasks = {}
        self.tasks_sent_again = 0
        self.rounds_played = 0
        self.pg = self.redis = self.capture = self.beat = None
        self.workers = []
        self.control_planes = []

    # Set-up and tear-down.

    def start(self):
        self.pg = PostgresCluster(self.root / "pg")
        self.pg.start()
        self.pg.create_database("chaos")
        self.redis = RedisServer(self.root / "redis")
        self.redis.start()
        self.capture = CaptureProcess(self.root / "capture", API_KEY).start()
        self.env = self._product_env()
        os.environ.update(self.env)
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        from settings.celery import app

        self.app = app
        self.workers = [CeleryWorker(slot, self.env, self.log_dir) for slot in range(WORKERS)]
        for worker in self.workers:
            worker.start()
        self.beat = ManagedProcess(
            "beat", [sys.executable, "-m", "celery", "-A", "settings.celery", "beat", "-l", "info"],
            self.env, self.log_dir / "beat.log",
        ).start()
        self.control_planes = [None] * CONTROL_PLANES
        for slot in range(CONTROL_PLANES):
            self._start_control_plane(slot)
        threading.Thread(target=self._send_tasks, name="task-sender", daemon=True).start()
        if not wait_for(lambda: all(worker.ready() for worker in self.workers), 60):
            raise RuntimeError(f"the Celery workers did not start; see {self.log_dir}")

    def _product_env(self):
        env = {
            name: value for name, value in os.environ.items()
            if not name.startswith(("METERING_", "DRAIN_", "POSTHOG_", "CELERY_", "TEST_"))
            and name not in ("DATABASE_URL", "REDIS_URL")
        }
        env.update({
            "DJANGO_SETTINGS_MODULE": "settings",
            "PYTHONUNBUFFERED": "1",
            "DATABASE_URL": self.pg.url("chaos"),
            "CELERY_BROKER_URL": self.redis.url,
            "REDIS_URL": self.redis.url,
            "CELERY_QUEUE": QUEUE,
            "CELERY_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_SECONDS),
            "METERING_DATA_DIR": str(self.root / "var"),
            "METERING_BUCKET_SECONDS": str(BUCKET_SECONDS),
            "METERING_GRACE_SECONDS": str(GRACE_SECONDS),
            "METERING_MEMORY_PER_CORE_GIB": "2",
            "METERING_FLUSH_SECONDS": "0.3",
            "METERING_PUBLISH_TIMEOUT_SECONDS": "1",
            "METERING_CONFIRM_SECONDS": str(CONFIRM_SECONDS),
            "METERING_LOG_LEVEL": "INFO",
            "POSTHOG_API_KEY": API_KEY,
            "POSTHOG_HOST": self.capture.url,
            "POSTHOG_TIMEOUT_SECONDS": "1",
            "DRAIN_BATCH_SIZE": "20",
            "DRAIN_INTERVAL_SECONDS": "2",
            "DRAIN_LOCK_TIMEOUT_SECONDS": str(DRAIN_LOCK_TIMEOUT_SECONDS),
            "DRAIN_MAX_BACKOFF_SECONDS": "2",
            "CHAOS_HOOK_DIR": str(self.hook_dir),
        })
        return env

    def close(self):
        """Stop everything this run started, thawing Redis first. Never raises."""
        for step in (
            lambda: self.redis and self.redis.thaw(),
            lambda: [process.terminate(10) for process in self.drains if process.alive()],
            lambda: [control.process.kill() for control in self.control_planes if control and control.process.alive()],
            lambda: [worker.terminate(10) for worker in self.workers],
            lambda: self.beat and self.beat.terminate(10),
            lambda: self.capture and self.capture.terminate(10),
            lambda: self.redis and self.redis.close(),
            lambda: self.pg and self.pg.stop(),
        ):
            try:
                step()
            except Exception:  # noqa: BLE001 - clean up as much as possible
                traceback.print_exc()
        if self.args.keep:
            print(f"chaos: run directory kept at {self.root}", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    # Control-plane processes.

    def _start_control_plane(self, slot):
        number = len(self.instances)
        ledger = self.root / "ledgers" / f"cp{slot}-{number}.jsonl"
        stats = self.root / "ledgers" / f"cp{slot}-{number}.stats.json"
        published = self.root / "ledgers" / f"cp{slot}-{number}.published.jsonl"
        process = ManagedProcess(
            f"cp{slot}-{number}",
            [sys.executable, "-m", "tests.chaos_control_plane", "--ledger", ledger, "--stats", stats,
             "--published", published],
            self.env, self.log_dir / f"cp{slot}-{number}.log", stdin=True, stdout_lines=True,
        ).start()
        instance = {"slot": slot, "process": process, "ledger": ledger, "stats": stats, "published": published,
                    "fate": "running"}
        self.instances.append(instance)
        self.control_planes[slot] = ControlPlane(instance)

    def _end_control_plane(self, slot, fate):
        control = self.control_planes[slot]
        control.instance["fate"] = fate
        self._start_control_plane(slot)

    # The workload.

    def _new_spec(self, org=None):
        rng = self.rng
        self.next_id += 1
        size = rng.randrange(len(accounting.SIZES))
        roll = rng.random()
        if roll < 0.1:
            ms = rng.randint(0, 5) * 1000
        elif roll < 0.8:
            ms = rng.randint(0, 120_000)
        else:
            ms = rng.randint(120_000, 3_600_000)
        end_as = rng.choices(("datetime", "epoch", "now"), (2, 1, 1))[0]
        duration_as = rng.choice(("str", "float", "decimal", "timedelta", "started_at"))
        if duration_as == "started_at" and end_as != "datetime":
            duration_as = "str"
        reason = rng.choice(END_REASONS) if rng.random() > 0.03 else "mystery_reason"
        cores, memory, _, _ = accounting.SIZES[size]
        spec = {
            "id": self.next_id, "org": org or rng.choice(ORGS), "size": size, "cores": cores, "memory": memory,
            "ms": ms, "end_as": end_as, "duration_as": duration_as, "reason": reason, "valid": True,
        }
        if rng.random() < 0.25:
            spec["connection_id"] = f"c-{self.args.seed}-{self.next_id}"
        self.specs[spec["id"]] = spec
        return spec

    def _invalid_spec(self):
        spec = self._new_spec()
        spec["valid"] = False
        spec.pop("connection_id", None)
        kind = self.rng.choice(("cores", "memory", "duration", "org", "negative"))
        if kind == "cores":
            spec["cores"] = "eight"
        elif kind == "memory":
            spec["memory"] = "0Gi"
        elif kind == "duration":
            spec["duration_as"], spec["raw_duration"] = "raw", "NaN"
        elif kind == "org":
            spec["org"] = ""
        else:
            spec["duration_as"], spec["raw_duration"] = "raw", "-5"
        return spec

    def _workload(self, round_number, modifiers):
        rng = self.rng
        commands = {}
        skewed_slot = rng.randrange(CONTROL_PLANES) if "clock_skew" in modifiers else None
        for slot in range(CONTROL_PLANES):
            count = rng.randint(5, 25)
            specs = [self._new_spec() for _ in range(count)]
            skew = 0.0
            if slot == skewed_slot:
                if rng.random() < 0.75:
                    skew = -rng.uniform(5, 180)
                else:
                    skew = rng.uniform(5, self.args.max_future_skew)
                    self.max_future_end = max(self.max_future_end, time.time() + skew + 3)
            if "duplicate_record" in modifiers and slot == 0:
                spec = self._new_spec()
                spec["connection_id"] = f"c-{self.args.seed}-{spec['id']}"
                spec["times"] = 2
                specs.insert(rng.randrange(len(specs) + 1), spec)
            if "invalid_input" in modifiers and slot == 1:
                for _ in range(rng.randint(1, 2)):
                    specs.insert(rng.randrange(len(specs) + 1), self._invalid_spec())
            if "late_increment" in modifiers and slot == 2:
                old = [key for key, recorded_at in self.recent_keys if time.time() - recorded_at > 12]
                if old:
                    org, bucket = rng.choice(old)
                    for _ in range(rng.randint(1, 3)):
                        spec = self._new_spec(org)
                        spec["end_as"] = "datetime"
                        spec["end_epoch"] = bucket + rng.randint(0, BUCKET_SECONDS * 1000 - 1) / 1000
                        specs.append(spec)
            for spec in specs:
                if spec["end_as"] != "now" and "end_epoch" not in spec:
                    self.recent_keys.append(((spec["org"], int(time.time() + skew) // BUCKET_SECONDS * BUCKET_SECONDS),
                                             time.time()))
            gap = rng.uniform(0.5, 1.0) / len(specs)
            commands[slot] = {"action": "record", "round": round_number, "skew": skew, "gap": gap,
                              "connections": [self._wire(spec) for spec in specs]}
        return commands

    @staticmethod
    def _wire(spec):
        return {key: value for key, value in spec.items() if key not in ("size", "valid")}

    def _task_by_name(self):
        """Queue 1 to 4 ``metering.record_connection_end`` messages, some sent twice."""
        for _ in range(self.rng.randint(1, 4)):
            spec = self._new_spec()
            spec["connection_id"] = f"t-{self.args.seed}-{spec['id']}"
            ended = datetime.now(timezone.utc) - timedelta(milliseconds=self.rng.randint(0, 60_000))
            size_cores, memory, _, _ = accounting.SIZES[spec["size"]]
            kwargs = {
                "org_id": spec["org"], "cores": str(size_cores), "memory": memory,
                "ended_at": ended.isoformat().replace("+00:00", "Z"),
                "duration_seconds": f"{spec['ms'] // 1000}.{spec['ms'] % 1000:03d}",
                "end_reason": spec["reason"] if spec["reason"] in END_REASONS else "other",
                "connection_id": spec["connection_id"],
            }
            self.task_sends.append((spec["id"], ended.isoformat()))
            for _ in range(2 if self.rng.random() < 0.3 else 1):
                self.sender_queue.put(("metering.record_connection_end", kwargs))

    def _send_tasks(self):
        """Send queued messages by name as a careful sender in another language would.

        It retries each message until the broker takes it, then sends it again
        under the same task id until a worker confirms it (metering.confirmations).
        The drain task is sent once and may be dropped, as beat's is.
        """
        from metering.confirmations import RedisConfirmations

        confirmations = RedisConfirmations(self.redis.url, 1.0)
        while True:
            try:
                name, kwargs = self.sender_queue.get(timeout=TASK_CONFIRM_POLL_SECONDS)
            except queue.Empty:
                self._collect_task_confirmations(confirmations)
                continue
            task_id = str(uuid.uuid4())
            if self._send_by_name(name, kwargs, task_id) and name != "billing_drain.drain":
                self.unconfirmed_tasks[task_id] = (name, kwargs, time.monotonic() + TASK_CONFIRM_SECONDS)
            self.sender_queue.task_done()

    def _send_by_name(self, name, kwargs, task_id):
        """Send one message, retrying until the broker takes it; the drain task is tried once."""
        while True:
            try:
                self.app.send_task(name, kwargs=kwargs, task_id=task_id, queue=QUEUE, retry=False)
                return True
            except Exception:  # noqa: BLE001 - the broker may be down or frozen on purpose
                if name == "billing_drain.drain":
                    return False
                time.sleep(0.3)

    def _collect_task_confirmations(self, confirmations):
        if not self.unconfirmed_tasks:
            return
        try:
            confirmed = confirmations.take_confirmed(list(self.unconfirmed_tasks))
        except Exception:  # noqa: BLE001 - Redis may be down or frozen on purpose; ask again later
            return
        for task_id in confirmed:
            self.unconfirmed_tasks.pop(task_id, None)
        now = time.monotonic()
        for task_id, (name, kwargs, send_again_at) in list(self.unconfirmed_tasks.items()):
            if send_again_at <= now and self._send_by_name(name, kwargs, task_id):
                self.tasks_sent_again += 1
                self.unconfirmed_tasks[task_id] = (name, kwargs, time.monotonic() + TASK_CONFIRM_SECONDS)

    def _request_drain(self):
        """Send the drain task, as beat does. It is dropped when the broker is down."""
        self.sender_queue.put(("billing_drain.drain", {}))

    # Pause points.

    def _arm(self, point, role, max_seconds):
        armed = self.hook_dir / f"{point}.{role}.armed"
        temporary = self.hook_dir / f"{point}.{role}.tmp"
        (self.hook_dir / f"{point}.{role}.paused").unlink(missing_ok=True)
        temporary.write_text(json.dumps({"max_seconds": max_seconds}))
        os.replace(temporary, armed)

    def _wait_paused(self, point, role, timeout):
        marker = self.hook_dir / f"{point}.{role}.paused"
        if not wait_for(marker.exists, timeout, 0.02):
            return None
        return json.loads(marker.read_text())

    def _disarm(self, point, role):
        """Disarm a pause point. If a process claimed it meanwhile, let that process go on and return its info."""
        try:
            (self.hook_dir / f"{point}.{role}.armed").unlink()
            return None
        except FileNotFoundError:
            info = self._wait_paused(point, role, 2)
            if info:
                self._release(info)
            return info

    def _release(self, info):
        (self.hook_dir / info["claimed"]).unlink(missing_ok=True)

    # Subprocess drains.

    def _spawn_drain(self, *args, manual=False):
        self.drain_count += 1
        if manual:
            argv = [sys.executable, "manage.py", "drain_billing"]
        else:
            argv = [sys.executable, "-m", "tests.chaos_drain", *args]
        process = ManagedProcess(f"drain-{self.drain_count}", argv, {**self.env, "CHAOS_ROLE": "drain"},
                                 self.log_dir / "drains.log").start()
        self.drains.append(process)
        return process

    def _reap_drains(self):
        for process in list(self.drains):
            if not process.alive():
                self.subprocess_exits[process.process.returncode] += 1
                process.close_log()
                self.drains.remove(process)

    def _worker_by_pid(self, pid):
        return next((worker for worker in self.workers if worker.pid == pid), None)

    # Faults. Each returns True when it was injected.

    def fault_worker_kill_mid_batch(self, delay):
        time.sleep(delay)
        with self.hook_lock:
            self._arm(AFTER_BATCH, "worker", 6)
            info = self._wait_paused(AFTER_BATCH, "worker", 3)
            if info is None:
                info = self._disarm(AFTER_BATCH, "worker")
                if info is None:
                    return False
            return self._kill_paused_worker(info)

    def _kill_paused_worker(self, info):
        """Kill the worker paused at a hook with SIGKILL, release the hook and start the worker again.

        Returns False when no worker has the paused process id.
        """
        with self.worker_lock:
            worker = self._worker_by_pid(info["pid"])
            if worker is None:
                self._release(info)
                return False
            worker.kill()
            self._release(info)
            worker.start()
        return True

    def fault_worker_kill(self, delay):
        time.sleep(delay)
        with self.worker_lock:
            worker = self.rng.choice(self.workers)
            if not worker.alive():
                return False
            worker.kill()
            worker.start()
        return True

    def fault_worker_restart(self, delay):
        time.sleep(delay)
        with self.worker_lock:
            worker = self.rng.choice(self.workers)
            if not worker.alive():
                return False
            worker.terminate(15)
            worker.start()
        return True

    def fault_worker_kill_mid_drain(self, delay):
        time.sleep(delay)
        with self.hook_lock:
            self._arm(BEFORE_DELETE, "worker", 8)
            self._request_drain()
            info = self._wait_paused(BEFORE_DELETE, "worker", 3)
            if info is None:
                # The first drain may have found nothing due, or lost the lock to a subprocess drain.
                self._request_drain()
                info = self._wait_paused(BEFORE_DELETE, "worker", 3)
            if info is None:
                info = self._disarm(BEFORE_DELETE, "worker")
                if info is None:
                    return False
            return self._kill_paused_worker(info)

    def _pause_subprocess_drain(self, max_seconds):
        """Start a drain subprocess, wait until one of ours paused before a delete and return (process, info)."""
        self._arm(BEFORE_DELETE, "drain", max_seconds)
        self._spawn_drain("--until-delivered", "6")
        info = self._wait_paused(BEFORE_DELETE, "drain", 7)
        if info is None:
            info = self._disarm(BEFORE_DELETE, "drain")
        if info is None:
            return None, None
        # Any drain subprocess of this run may have reached the pause point first.
        process = next((drain for drain in list(self.drains) if drain.pid == info["pid"]), None)
        if process is None:
            self._release(info)
            return None, None
        return process, info

    def fault_drain_kill_after_2xx(self, delay):
        time.sleep(delay)
        with self.hook_lock:
            process, info = self._pause_subprocess_drain(10)
            if info is None:
                return False
            process.kill()
            self._release(info)
        return True

    def fault_pg_restart_during_delete(self, delay):
        time.sleep(delay)
        with self.hook_lock, self.pg_lock:
            process, info = self._pause_subprocess_drain(15)
            if info is None:
                return False
            self.pg.restart(self.rng.choice(("fast", "immediate")))
            self._release(info)
            process.wait(15)
        return True

    def fault_lock_expiry(self, delay):
        time.sleep(delay)
        with self.hook_lock:
            first, info = self._pause_subprocess_drain(DRAIN_LOCK_TIMEOUT_SECONDS + 10)
            if info is None:
                return False
            time.sleep(DRAIN_LOCK_TIMEOUT_SECONDS + 0.5)
            second = self._spawn_drain("--lock-retry-seconds", "3")
            second.wait(15)
            self._release(info)
            first.wait(15)
        return True

    def fault_pg_restart(self, delay):
        time.sleep(delay)
        with self.pg_lock:
            self.pg.restart(self.rng.choice(("fast", "immediate")))
        return True

    def _redis_outage_start(self, delay):
        time.sleep(delay)
        if self.rng.random() < 0.4:
            # During a drain rather than during teardown and flush.
            if self.rng.random() < 0.5:
                self._spawn_drain("--lock-retry-seconds", "2")
                time.sleep(self.rng.uniform(0.5, 1.0))
            else:
                self._request_drain()
                time.sleep(self.rng.uniform(0.05, 0.3))

    def fault_redis_stop(self, delay):
        with self.redis_lock:
            self._redis_outage_start(delay)
            self.redis.stop()
            time.sleep(self.rng.uniform(0.3, 2.5))
            self.redis.start()
        return True

    def fault_redis_freeze(self, delay):
        with self.redis_lock:
            self._redis_outage_start(delay)
            self.redis.freeze()
            time.sleep(self.rng.uniform(0.3, 3.0))
            self.redis.thaw()
        return True

    def _stop_control_plane(self, delay, sig, redis_down_seconds=None, freeze=False):
        time.sleep(delay)
        with self.cp_lock:
            slot = self.rng.randrange(CONTROL_PLANES)
            control = self.control_planes[slot]
            # A signal before the process installed its SIGTERM handler ends it before it recorded anything.
            wait_for(lambda: "ready" in control.process.lines or not control.process.alive(), 15)
            if not control.process.alive():
                return False
            if redis_down_seconds is None:
                control.process.signal(sig)
            else:
                with self.redis_lock:
                    if freeze:
                        self.redis.freeze()
                    else:
                        self.redis.stop()
                    control.process.signal(sig)
                    time.sleep(redis_down_seconds)
                    if freeze:
                        self.redis.thaw()
                    else:
                        self.redis.start()
            code = control.process.wait(20)
            if sig == signal.SIGKILL:
                fate = "killed"
            elif code == 0:
                fate = "exited"
            else:
                control.process.kill()
                fate = "killed"
                self.problems.append(f"control-plane process {control.process.name} did not exit cleanly on SIGTERM "
                                     f"(exit code {code}); its unconfirmed connections count as accepted loss")
            self._end_control_plane(slot, fate)
        return True

    def fault_cp_sigterm(self, delay):
        return self._stop_control_plane(delay, signal.SIGTERM)

    def fault_cp_sigkill(self, delay):
        return self._stop_control_plane(delay, signal.SIGKILL)

    def fault_cp_sigterm_redis_down(self, delay):
        return self._stop_control_plane(delay, signal.SIGTERM, redis_down_seconds=self.rng.uniform(1.0, 3.0))

    def fault_cp_sigterm_redis_frozen(self, delay):
        return self._stop_control_plane(delay, signal.SIGTERM, redis_down_seconds=self.rng.uniform(1.0, 3.0),
                                        freeze=True)

    def _capture(self, action, **fields):
        self.capture.control(action, **fields)
        self._request_drain()
        return True

    def fault_capture_500(self, delay):
        return self._capture("fail_next", n=self.rng.randint(1, 3), status=500)

    def fault_capture_502(self, delay):
        return self._capture("fail_next", n=self.rng.randint(1, 3), status=502)

    def fault_capture_429(self, delay):
        return self._capture("fail_next", n=self.rng.randint(1, 2), status=429, retry_after=self.rng.randint(1, 2))

    def fault_capture_stall(self, delay):
        return self._capture("stall_next", n=1, seconds=1.5)

    def fault_capture_reset(self, delay):
        return self._capture("reset_next", n=self.rng.randint(1, 2))

    def fault_capture_413(self, delay):
        return self._capture("set_max_body_bytes", max_body_bytes=self.rng.randint(420, 800))

    def fault_capture_poison(self, delay):
        from billing_drain.events import event_uuid

        org = self.rng.choice(ORGS)
        bucket = int(time.time()) // BUCKET_SECONDS * BUCKET_SECONDS
        for generation in (1, 2):
            self.capture.control("poison", uuid=str(event_uuid(org, bucket, generation)))
        return True

    def fault_concurrent_drains(self, delay):
        time.sleep(delay)
        started = [self._spawn_drain(), self._spawn_drain(), self._spawn_drain(manual=True)]
        self._request_drain()
        for process in started:
            process.wait(20)
        return True

    def fault_ship_now(self, delay):
        time.sleep(delay)
        self._spawn_drain("--ship-now", str(self.rng.randint(1, 4))).wait(15)
        return True

    def _run_fault(self, kind, delay):
        started = time.monotonic()
        outcome = "failed in the harness"
        try:
            injected = getattr(self, f"fault_{kind}")(delay)
            outcome = "injected" if injected else "not triggered"
            (self.injected if injected else self.not_triggered)[kind] += 1
        except Exception as error:  # noqa: BLE001 - a harness error is reported, not hidden
            self.problems.append(f"fault {kind} failed in the harness: {error!r}")
            traceback.print_exc()
        finally:
            with open(self.root / "faults.log", "a") as log:
                log.write(f"{datetime.now(timezone.utc):%H:%M:%S.%f} {kind}: {outcome} "
                          f"in {time.monotonic() - started:.2f} s\n")

    # Rounds.

    def play_round(self, number):
        rng = self.rng
        started = time.monotonic()
        self._reap_drains()
        self._restart_dead()
        modifiers = [kind for kind, chance in WORKLOAD_FAULTS.items() if rng.random() < chance]
        count = rng.choices(list(FAULT_COUNT_WEIGHTS), list(FAULT_COUNT_WEIGHTS.values()))[0]
        kinds = [kind for kind in FAULT_WEIGHTS if not self.args.faults or kind in self.args.faults]
        faults = set()
        while kinds and len(faults) < min(count, len(kinds)):
            faults.add(rng.choices(kinds, [FAULT_WEIGHTS[kind] for kind in kinds])[0])
        if "capture_413" in faults:
            faults.discard("capture_poison")

        commands = self._workload(number, modifiers)
        for kind in modifiers:
            self.injected[kind] += 1
        if "task_by_name" in modifiers:
            self._task_by_name()
        waiting = []
        for slot, command in commands.items():
            control = self.control_planes[slot]
            if control.send(command):
                waiting.append((control, number))
        threads = [
            threading.Thread(target=self._run_fault, args=(kind, rng.uniform(0, 0.8)), name=kind, daemon=True)
            for kind in sorted(faults)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
            if thread.is_alive():
                self.problems.append(f"round {number}: fault {thread.name} did not finish within 60 s")
        for control, round_number in waiting:
            control.wait_done(round_number, 10)
        if any(kind.startswith("capture_") for kind in faults):
            self.capture.control("clear_faults")
        self.rounds_played += 1
        with open(self.root / "rounds.log", "a") as log:
            log.write(f"round {number}: {time.monotonic() - started:.2f} s, faults {sorted(faults)}, "
                      f"workload {sorted(modifiers)}\n")

    def _restart_dead(self):
        with self.worker_lock:
            for worker in self.workers:
                if not worker.alive():
                    worker.start()
        with self.cp_lock:
            for slot, control in enumerate(self.control_planes):
                if not control.process.alive():
                    self.problems.append(f"control-plane process {control.process.name} exited unexpectedly "
                                         f"with code {control.process.process.returncode}")
                    self._end_control_plane(slot, "killed")

    # Settling and the verdict.

    def settle(self):
        """Lift all faults, stop the control-plane processes normally and wait until everything is delivered."""
        started = time.monotonic()
        self.capture.control("clear_faults")
        for path in self.hook_dir.iterdir():
            path.unlink(missing_ok=True)
        self.redis.thaw()
        if not self.redis.is_running():
            self.redis.start()
        self.pg.ensure_running()
        self._restart_dead()
        for control in self.control_planes:
            control.send({"action": "exit"})
        for slot, control in enumerate(self.control_planes):
            code = control.process.wait(30)
            if code == 0:
                control.instance["fate"] = "exited"
            else:
                control.process.kill()
                control.instance["fate"] = "killed"
                self.problems.append(f"control-plane process {control.process.name} did not exit normally "
                                     f"(exit code {code})")
        self.sender_queue.join()
        for process in self.drains:
            process.wait(30)
        self._reap_drains()
        with open(self.root / "settle.log", "a") as log:
            log.write(f"{time.monotonic() - started:.1f} s: control-plane processes stopped\n")
        wait_until = max(self.max_future_end, time.time()) + BUCKET_SECONDS + GRACE_SECONDS + 1
        while time.time() < wait_until:
            time.sleep(0.5)

        deadline = time.monotonic() + self.args.settle_seconds
        quiet_checks = 0
        last_worker_restart = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(1)
            state = self._pending_state()
            with open(self.root / "settle.log", "a") as log:
                log.write(f"{time.monotonic() - started:.1f} s: {state}\n")
            if state["rejected"]:
                self._retry_parked()
            stranded = state["unacked"] and not state["queued"]
            if stranded and self._oldest_unacked_age() > VISIBILITY_TIMEOUT_SECONDS + 1 \
                    and time.monotonic() - last_worker_restart > 5:
                # kombu hands back a killed worker's unacknowledged messages when a worker starts (and
                # otherwise only every 100 s), or at a warm shutdown for the messages a worker holds.
                with self.worker_lock:
                    for worker in self.workers:
                        worker.terminate(30)
                        worker.start()
                last_worker_restart = time.monotonic()
            if not any(state.values()):
                quiet_checks += 1
                if quiet_checks >= 3:
                    self.settle_seconds = time.monotonic() - started
                    return True
            else:
                quiet_checks = 0
        self.settle_seconds = time.monotonic() - started
        self.problems.append(f"the system did not settle within {self.args.settle_seconds} s: {self._pending_state()}")
        return False

    def _pending_state(self):
        from django.db import close_old_connections
        from django.db.models import Count

        from metering.models import UsageBucket

        with self.redis.client() as client:
            # kombu keeps one list per queue and priority, all named after the queue.
            queued = sum(client.llen(key) for key in client.keys(f"{QUEUE}*") if client.type(key) == b"list")
            unacked = client.hlen("unacked")
        close_old_connections()
        states = dict(UsageBucket.objects.values_list("state").annotate(rows=Count("id")))
        return {"queued": queued, "unacked": unacked, "unconfirmed_tasks": len(self.unconfirmed_tasks),
                "open": states.get("open", 0), "sealed": states.get("sealed", 0),
                "rejected": states.get("rejected", 0)}

    def _oldest_unacked_age(self):
        with self.redis.client() as client:
            oldest = client.zrange("unacked_index", 0, 0, withscores=True)
        return time.time() - oldest[0][1] if oldest else 0.0

    def _retry_parked(self):
        from billing_drain.services import retry_parked

        retry_parked()

    def verdict(self):
        with open(self.root / "specs.jsonl", "w") as specs:
            specs.writelines(json.dumps(spec, default=repr) + "\n" for spec in self.specs.values())
        expected = accounting.Expected(BUCKET_SECONDS)
        for instance in self.instances:
            accounting.add_ledger(expected, self.specs, instance["ledger"], killed=instance["fate"] == "killed")
        for spec_id, ended in self.task_sends:
            spec = self.specs[spec_id]
            seconds = accounting.epoch_seconds(datetime.fromisoformat(ended))
            expected.add(spec["org"], [accounting.bucket_of(seconds, BUCKET_SECONDS)],
                         accounting.expected_compute_milli(spec["size"], spec["ms"]))
        billed = accounting.read_billed(self.capture.events_file)
        compute = accounting.compare(expected.compute, expected.at_risk_compute, billed.compute, expected.groups)
        connections = accounting.compare(expected.connections, expected.at_risk_connections, billed.connections,
                                         expected.groups)
        clients = self._client_stats()
        statuses = collections.Counter()
        for request in read_jsonl(self.capture.requests_file):
            statuses[request["status"] if request["status"] is not None else "no response"] += 1
        ledger_mismatches = self._ledger_mismatches(billed)
        unapplied = self._unapplied_batches()
        return Verdict(self, expected, billed, compute, connections, clients, statuses, ledger_mismatches, unapplied)

    def _client_stats(self):
        totals = collections.Counter()
        max_seconds = 0.0
        errors = []
        exit_leftovers = []
        exit_unconfirmed = []
        for instance in self.instances:
            try:
                stats = json.loads(Path(instance["stats"]).read_text())
            except (OSError, ValueError):
                continue
            max_seconds = max(max_seconds, stats["max_record_seconds"])
            errors.extend(stats["record_errors"])
            for name, value in stats["client"].items():
                totals[name] += value
            if instance["fate"] == "exited" and stats["exited"] and stats["client"].get("pending_rows"):
                exit_leftovers.append((instance["process"].name, stats["client"]["pending_rows"]))
            if instance["fate"] == "exited" and stats["exited"] and stats["client"].get("unconfirmed_rows"):
                exit_unconfirmed.append((instance["process"].name, stats["client"]["unconfirmed_rows"]))
        return {"totals": totals, "max_record_seconds": max_seconds, "errors": errors, "exit_leftovers": exit_leftovers,
                "exit_unconfirmed": exit_unconfirmed}

    def _unapplied_batches(self):
        """Return (batch id, rows, publish time) of batches a client published that no worker applied."""
        from django.db import close_old_connections

        from metering.models import AppliedMessage

        close_old_connections()
        applied = {key[len("batch:"):] for key in AppliedMessage.objects.filter(key__startswith="batch:")
                   .values_list("key", flat=True)}
        unapplied = {}
        for instance in self.instances:
            for entry in read_jsonl(instance["published"]):
                # A batch sent again appears once per send; keep the first.
                if entry["batch"] not in applied and entry["batch"] not in unapplied:
                    unapplied[entry["batch"]] = (entry["batch"], entry["rows"], entry["at"])
        return sorted(unapplied.values(), key=lambda item: item[2])

    def _ledger_mismatches(self, billed):
        """Return uuids whose DeliveredEvent row differs from what the capture server accepted."""
        from django.db import close_old_connections

        from billing_drain.models import DeliveredEvent

        close_old_connections()
        delivered = {
            str(uuid): milli for uuid, milli in DeliveredEvent.objects.values_list("event_uuid", "compute_milli")
        }
        accepted = {uuid: event["properties"]["compute_milli"] for uuid, event in billed.by_uuid.items()}
        return sorted(uuid for uuid in set(delivered) | set(accepted) if delivered.get(uuid) != accepted.get(uuid))


class ControlPlane:
    """The harness's handle on one control-plane process."""

    def __init__(self, instance):
        self.instance = instance
        self.process = instance["process"]

    def send(self, command):
        return self.process.alive() and self.process.send_line(json.dumps(command))

    def wait_done(self, round_number, timeout):
        return wait_for(lambda: f"done {round_number}" in self.process.lines or not self.process.alive(), timeout)


class Verdict:
    def __init__(self, chaos, expected, billed, compute, connections, clients, statuses, ledger_mismatches,
                 unapplied):
        self.chaos = chaos
        self.expected = expected
        self.billed = billed
        self.compute = compute
        self.connections = connections
        self.clients = clients
        self.statuses = statuses
        self.ledger_mismatches = ledger_mismatches
        self.unapplied = unapplied

    @property
    def failed(self):
        return bool(
            self.compute.over or self.compute.lost or self.connections.over or self.connections.lost
            or self.billed.conflicting_uuids or self.billed.inexact_numbers or self.clients["errors"]
            or self.clients["max_record_seconds"] > MAX_RECORD_SECONDS or self.ledger_mismatches
        )

    def table(self, elapsed):
        chaos = self.chaos
        seconds = _seconds_text
        lines = [
            f"chaos: seed {chaos.args.seed}, {chaos.rounds_played} rounds in {elapsed:.0f} s "
            f"(settle {getattr(chaos, 'settle_seconds', 0):.0f} s)",
            f"connections: {self.expected.recorded} billable recorded "
            f"({len(chaos.task_sends)} sent by task name), {self.expected.invalid} invalid (not billable), "
            f"{self.expected.at_risk} recorded by SIGKILLed processes after their last confirmed publish",
            "",
            f"{'fault':<28}{'injected':>9}{'not triggered':>15}",
        ]
        for kind in sorted(set(FAULT_WEIGHTS) | set(WORKLOAD_FAULTS)):
            lines.append(f"  {kind:<26}{chaos.injected[kind]:>9}{chaos.not_triggered[kind]:>15}")
        lines += [
            "",
            f"{'':<18}{'expected':>16}{'billed':>16}{'over-billed':>13}{'lost':>11}{'accepted loss':>15}",
            f"{'compute seconds':<18}{seconds(self.compute.expected):>16}{seconds(self.compute.billed):>16}"
            f"{seconds(self.compute.over):>13}{seconds(self.compute.lost):>11}{seconds(self.compute.accepted):>15}",
            f"{'connections':<18}{self.connections.expected:>16}{self.connections.billed:>16}"
            f"{self.connections.over:>13}{self.connections.lost:>11}{self.connections.accepted:>15}",
            "",
            f"events: {self.billed.events} uuids in {self.billed.deliveries} accepted deliveries; "
            f"uuids with conflicting content: {len(self.billed.conflicting_uuids)}; "
            f"compute_seconds not equal to compute_milli / 1000: {len(self.billed.inexact_numbers)}; "
            f"DeliveredEvent rows differing from the capture server: {len(self.ledger_mismatches)}",
            "capture responses: " + ", ".join(f"{status}: {count}" for status, count in
                                              sorted(self.statuses.items(), key=lambda item: str(item[0]))),
            "drain subprocess exit codes: " + ", ".join(f"{code}: {count}" for code, count in
                                                        sorted(chaos.subprocess_exits.items(), key=str)),
            f"record_connection_end: max {self.clients['max_record_seconds'] * 1000:.1f} ms per call, "
            f"{len(self.clients['errors'])} raised; client counters: "
            + ", ".join(f"{name} {value}" for name, value in sorted(self.clients["totals"].items())),
        ]
        lines.append(f"batches published by a client but never applied by a worker: {len(self.unapplied)}")
        for batch_id, rows, published_at in self.unapplied[:10]:
            when = datetime.fromtimestamp(published_at, timezone.utc)
            lines.append(f"  batch {batch_id} with {rows} rows, published at {when:%H:%M:%S.%f}")
        lines.append(f"messages sent by name again for want of a confirmation: {chaos.tasks_sent_again}")
        if self.clients["exit_leftovers"]:
            lines.append(f"exit flush left rows unpublished: {self.clients['exit_leftovers']}")
        if self.clients["exit_unconfirmed"]:
            lines.append(f"exit flush left rows published but unconfirmed: {self.clients['exit_unconfirmed']}")
        for key, expected, billed in self.compute.over_keys[:10]:
            lines.append(f"over-billed {key}: expected {expected}, billed {billed} (thousandths)")
        for key, expected, billed, at_risk in self.compute.lost_keys[:10]:
            lines.append(f"lost {key}: expected {expected}, billed {billed}, at risk {at_risk} (thousandths)")
        for problem in chaos.problems[:20]:
            lines.append(f"problem: {problem}")
        lines.append("result: " + ("FAIL" if self.failed else "PASS"))
        return "\n".join(lines)


def _seconds_text(milli):
    return f"{milli // 1000}.{milli % 1000:03d}"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="Rounds of workload and faults (default 20).")
    parser.add_argument("--seed", type=int, default=1, help="Seed for the workload and the faults (default 1).")
    parser.add_argument("--max-future-skew", type=float, default=120.0,
                        help="Largest clock skew into the future, in seconds; the settle phase waits it out "
                             "(default 120).")
    parser.add_argument("--settle-seconds", type=float, default=300.0,
                        help="Longest wait for everything to be delivered after the rounds (default 300).")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="Stop starting rounds after this many seconds (default: no limit).")
    parser.add_argument("--faults", type=lambda text: [kind for kind in text.split(",") if kind],
                        help="Comma-separated fault kinds to draw from (default: all of them).")
    parser.add_argument("--keep", action="store_true", help="Keep the run directory with logs and ledgers.")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.faults or ()) - set(FAULT_WEIGHTS))
    if unknown:
        parser.error(f"unknown fault kinds {', '.join(unknown)}; known kinds are {', '.join(sorted(FAULT_WEIGHTS))}")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds} is invalid; use at least 1")
    if args.max_future_skew < 5:
        parser.error(f"--max-future-skew {args.max_future_skew} is invalid; use at least 5 seconds")
    return args


def main(argv=None):
    args = parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"chaos: cannot run: {reason}", file=sys.stderr)
        return 2
    started = time.monotonic()
    chaos = Chaos(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))
    try:
        chaos.start()
        print(f"chaos: run directory {chaos.root}, capture server {chaos.capture.url}", file=sys.stderr, flush=True)
        for number in range(args.rounds):
            if args.time_limit and time.monotonic() - started > args.time_limit:
                chaos.problems.append(f"stopped after {number} rounds at the time limit of {args.time_limit} s")
                break
            chaos.play_round(number)
            if number % 10 == 9:
                print(f"chaos: round {number + 1} of {args.rounds}, {time.monotonic() - started:.0f} s",
                      file=sys.stderr, flush=True)
        settled = chaos.settle()
        verdict = chaos.verdict()
        print(verdict.table(time.monotonic() - started), flush=True)
        if not settled:
            return 2
        return 1 if verdict.failed else 0
    finally:
        chaos.close()


if __name__ == "__main__":
    sys.exit(main())
