"""A control-plane process for the chaos harness: it embeds the metering client and records the harness's connections.

    python -m tests.chaos_control_plane --ledger PATH --stats PATH --published PATH

It reads one JSON command per stdin line and writes ``done <round>`` to stdout after each:

* ``{"action": "record", "round": R, "skew": S, "gap": G, "connections": [...]}``
  records each connection with ``metering.client.record_connection_end``,
  sleeping G seconds between them. End times come from this process's clock
  plus S seconds, which models a machine whose clock is off.
* ``{"action": "exit"}`` exits normally, as SIGTERM does.

Before each ``record_connection_end`` call it appends the connection's id and
end time to the ledger (a JSON-lines file), so the harness knows what was
recorded even if this process is SIGKILLed. After the call it appends the
time the call returned. When the client reports that every connection recorded
so far was published to the broker and confirmed by a worker, it appends
``{"checkpoint": N}`` with the number of calls so far, which bounds what a
SIGKILL can lose. Each batch the
client published without an error goes to ``--published`` with its batch id,
so the harness can tell a batch lost after publishing from one never sent.

SIGTERM exits through ``sys.exit(0)``, so the client's atexit handler flushes
what is pending, as a real server does. A SIGTERM that arrives between the
ledger line and the call it describes is deferred until the call returned.
"""

import argparse
import atexit
import json
import os
import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

CHECKPOINT_POLL_SECONDS = 0.1


class Recorder:
    def __init__(self, ledger_path, stats_path):
        self.ledger = open(ledger_path, "a", buffering=1, encoding="utf-8")
        self.stats_path = Path(stats_path)
        self.lock = threading.Lock()
        self.calls = 0
        self.checkpointed = 0
        self.max_record_seconds = 0.0
        self.record_errors = []
        self.in_call = False
        self.exit_requested = False

    def on_sigterm(self, signum, frame):
        if self.in_call:
            self.exit_requested = True
            return
        sys.exit(0)

    def record(self, spec, skew):
        from metering.client import record_connection_end

        args, kwargs, ledger_entry = connection_arguments(spec, skew)
        with self.lock:
            self.in_call = True
            try:
                self.ledger.write(json.dumps({"id": spec["id"], **ledger_entry}) + "\n")
                for _ in range(spec.get("times", 1)):
                    started = time.perf_counter()
                    try:
                        record_connection_end(*args, **kwargs)
                    except Exception as error:  # noqa: BLE001 - a raise breaks the client's contract; count it
                        self.record_errors.append(repr(error))
                    self.max_record_seconds = max(self.max_record_seconds, time.perf_counter() - started)
                    self.calls += 1
                self.ledger.write(json.dumps({"id": spec["id"], "returned": time.time()}) + "\n")
            finally:
                self.in_call = False
        if self.exit_requested:
            sys.exit(0)

    def watch_checkpoints(self):
        """Append a checkpoint whenever the client has published every connection recorded so far."""
        from metering.client import get_client

        client = get_client()
        confirmed_at = None
        while True:
            time.sleep(CHECKPOINT_POLL_SECONDS)
            with self.lock:
                calls = self.calls
                if calls == self.checkpointed:
                    continue
                stats = client.stats()
                handled = sum(stats.get(name, 0) for name in ("recorded", "invalid", "dropped", "internal_errors"))
                published = (
                    handled == calls
                    and stats["pending_rows"] == 0
                    and stats["unconfirmed_rows"] == 0
                    and stats["queued_connections"] == 0
                )
                # Two readings in a row: rows leave the aggregate an instant before they count as unsent.
                if published and confirmed_at == calls:
                    self.ledger.write(json.dumps({"checkpoint": calls}) + "\n")
                    self.checkpointed = calls
                confirmed_at = calls if published else None

    def write_stats(self, exiting=False):
        from metering.client import get_client

        stats = {
            "pid": os.getpid(),
            "calls": self.calls,
            "max_record_seconds": self.max_record_seconds,
            "record_errors": self.record_errors[:20],
            "client": get_client().stats(),
            "exited": exiting,
        }
        temporary = self.stats_path.with_name(self.stats_path.name + ".tmp")
        temporary.write_text(json.dumps(stats))
        os.replace(temporary, self.stats_path)


def connection_arguments(spec, skew):
    """Return (args, kwargs, ledger fields) for one connection spec from the harness."""
    now = datetime.now(timezone.utc) + timedelta(seconds=skew)
    if "end_epoch" in spec:
        now = datetime.fromtimestamp(spec["end_epoch"], timezone.utc)
    duration_ms = spec["ms"]
    duration = Decimal(duration_ms).scaleb(-3)
    kwargs = {"end_reason": spec["reason"], "connection_id": spec.get("connection_id")}
    ledger = {}
    end_as = spec["end_as"]
    if end_as == "datetime":
        kwargs["ended_at"] = now
        ledger["end"] = now.isoformat()
    elif end_as == "epoch":
        epoch = now.timestamp()
        kwargs["ended_at"] = epoch
        ledger["epoch"] = repr(epoch)
    else:
        # The client stamps its own time.time() when no end is given.
        ledger["before"] = time.time()

    duration_as = spec["duration_as"]
    if duration_as == "started_at":
        if end_as != "datetime":
            raise ValueError("duration_as started_at needs end_as datetime")
        kwargs["started_at"] = now - timedelta(milliseconds=duration_ms)
    elif duration_as == "str":
        kwargs["duration_seconds"] = str(duration)
    elif duration_as == "float":
        kwargs["duration_seconds"] = float(duration)
    elif duration_as == "decimal":
        kwargs["duration_seconds"] = duration
    elif duration_as == "timedelta":
        kwargs["duration_seconds"] = timedelta(milliseconds=duration_ms)
    elif duration_as == "raw":
        kwargs["duration_seconds"] = spec["raw_duration"]
    else:
        raise ValueError(f"unknown duration_as {duration_as!r}")
    return (spec["org"], spec["cores"], spec["memory"]), kwargs, ledger


def log_published_batches(client, path):
    """Wrap the client's publish function so that each batch it published without an error is logged."""
    published_log = open(path, "a", buffering=1, encoding="utf-8")
    publish = client._publish

    def publish_and_log(batch_id, rows, timeout_seconds):
        publish(batch_id, rows, timeout_seconds)
        published_log.write(json.dumps({"batch": batch_id, "rows": len(rows), "at": time.time()}) + "\n")

    client._publish = publish_and_log


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.chaos_control_plane")
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--published", required=True)
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    import django

    django.setup()
    recorder = Recorder(args.ledger, args.stats)
    signal.signal(signal.SIGTERM, recorder.on_sigterm)
    # Registered before the client exists, so it runs after the client's own exit flush.
    atexit.register(recorder.write_stats, exiting=True)

    from metering.client import get_client

    log_published_batches(get_client(), args.published)
    threading.Thread(target=recorder.watch_checkpoints, name="checkpoints", daemon=True).start()
    print("ready", flush=True)

    for line in sys.stdin:
        command = json.loads(line)
        if command["action"] == "exit":
            break
        if command["action"] == "record":
            for spec in command["connections"]:
                recorder.record(spec, command.get("skew", 0))
                if command.get("gap"):
                    time.sleep(command["gap"])
            recorder.write_stats()
            print(f"done {command['round']}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
