"""Bad inputs through every entry point, each its own case.

Each case checks the exact message that names the bad value, that the bad
input applies nothing, and that good inputs sent alongside it still arrive:
- the in-process client (``MeteringClient.record``, ``record_connection_end``),
- the ``metering.record_connection_end`` and ``metering.apply_batch`` tasks run
  by name, in-process with ``.apply()`` and once through a real worker,
- the ``import_connection_log`` and ``drain_billing`` commands,
- the settings, read by a fresh interpreter with a bad environment.
"""

import base64
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from metering import client as client_module
from metering.client import MeteringClient
from metering.models import AppliedMessage, UsageBucket
from metering.tasks import apply_batch, record_connection_end
from metering.units import END_REASONS
from tests.factories import row
from tests.processes import ROOT, wait_until

ENDED = datetime(2026, 12, 4, 19, 29, 38, tzinfo=timezone.utc)
BUCKET = 1_796_412_540  # ENDED rounded down to the minute, as epoch seconds
# 2 cores and 4 GiB with R = 2 GiB per core bill 2 compute seconds per second: 10 s is 20.000.
GOOD = {"org_id": "acme", "cores": "2", "memory": "4Gi", "ended_at": ENDED, "duration_seconds": "9.2"}
GOOD_COMPUTE_MILLI = 20_000
CORES_ACCEPTED = "expected a positive number of cores such as 2, 0.5 or 500m"
MEMORY_ACCEPTED = "expected a positive byte quantity such as 16Gi, 1536Mi, 16G or 17179869184"
MAX_SECONDS_TEXT = "longer than the maximum of 86400 seconds (METERING_MAX_CONNECTION_SECONDS); check the connection's start time"
REASONS_TEXT = ", ".join(END_REASONS)
NUL_ORG = "ac\x00me"
SURROGATE_ORG = "caf\udce9"
NUL_CONNECTION = "conn\x00"
LONG_ORG = "x" * 5000
LONG_CONNECTION = "c" * 300


class RecordingPublisher:
    def __init__(self):
        self.batches = []

    def __call__(self, batch_id, rows, timeout_seconds):
        self.batches.append((batch_id, rows))

    def rows_by_org(self):
        return {row["org_id"]: row for _, rows in self.batches for row in rows}


def new_client(publisher):
    return MeteringClient(
        bucket_seconds=60,
        memory_per_core_gib=2,
        max_connection_seconds=86400,
        flush_seconds=60,
        register_exit_flush=False,
        publish=publisher,
    )


# The in-process client: the bad connection is logged and counted, the good ones around it are published.

CLIENT_CASES = [
    pytest.param({"cores": "eight"}, f"invalid cores 'eight'; {CORES_ACCEPTED}", id="cores-word"),
    pytest.param({"cores": "2k"}, f"invalid cores '2k'; {CORES_ACCEPTED}", id="cores-unknown-suffix"),
    pytest.param({"cores": "0"}, f"invalid cores '0': it must be greater than zero; {CORES_ACCEPTED}", id="cores-zero"),
    pytest.param({"cores": -2}, f"invalid cores -2: it must be greater than zero; {CORES_ACCEPTED}", id="cores-negative"),
    pytest.param({"cores": None}, f"invalid cores None of type NoneType; {CORES_ACCEPTED}", id="cores-none"),
    pytest.param({"cores": True}, f"invalid cores True of type bool; {CORES_ACCEPTED}", id="cores-bool"),
    pytest.param({"cores": float("nan")}, f"invalid cores nan; {CORES_ACCEPTED}", id="cores-nan"),
    pytest.param({"cores": ["2"]}, f"invalid cores ['2'] of type list; {CORES_ACCEPTED}", id="cores-list"),
    pytest.param({"memory": "16GB"}, f"invalid memory '16GB'; {MEMORY_ACCEPTED}", id="memory-unknown-suffix"),
    pytest.param({"memory": "0Gi"}, f"invalid memory '0Gi': it must be greater than zero; {MEMORY_ACCEPTED}",
                 id="memory-zero"),
    pytest.param({"memory": "-4Gi"}, f"invalid memory '-4Gi'; {MEMORY_ACCEPTED}", id="memory-negative"),
    pytest.param({"duration_seconds": -5}, "invalid duration -5: a connection cannot last a negative time",
                 id="duration-negative"),
    pytest.param({"duration_seconds": "ten"}, "invalid duration 'ten'; expected seconds as a number such as 9.2",
                 id="duration-word"),
    pytest.param({"duration_seconds": float("inf")}, "invalid duration inf; expected a finite number of seconds",
                 id="duration-infinite"),
    pytest.param({"duration_seconds": 3 * 86400}, f"invalid duration 259200: {MAX_SECONDS_TEXT}", id="duration-days"),
    pytest.param({"duration_seconds": timedelta(days=40)},
                 f"invalid duration datetime.timedelta(days=40): {MAX_SECONDS_TEXT}", id="duration-timedelta-days"),
    pytest.param({"duration_seconds": None, "started_at": ENDED - timedelta(days=2)},
                 f"invalid duration datetime.timedelta(days=2): {MAX_SECONDS_TEXT}", id="started-days-before"),
    pytest.param({"duration_seconds": None, "started_at": ENDED + timedelta(seconds=5)},
                 "invalid times: ended_at 2026-12-04T19:29:38+00:00 is before started_at 2026-12-04T19:29:43+00:00",
                 id="end-before-start"),
    pytest.param({"ended_at": datetime(2026, 12, 4, 19, 29, 38)},
                 "invalid ended_at 2026-12-04T19:29:38: it has no time zone; pass an aware datetime such as "
                 "datetime.now(timezone.utc)", id="ended-naive"),
    pytest.param({"duration_seconds": None, "started_at": datetime(2026, 12, 4, 19, 29, 30)},
                 "invalid started_at 2026-12-04T19:29:30: it has no time zone; pass an aware datetime such as "
                 "datetime.now(timezone.utc)", id="started-naive"),
    pytest.param({"ended_at": "2026-12-04T19:29:38Z"},
                 "invalid ended_at '2026-12-04T19:29:38Z'; expected a timezone-aware datetime", id="ended-text"),
    pytest.param({"duration_seconds": None}, "missing duration: pass duration_seconds, or started_at with ended_at",
                 id="duration-missing"),
    pytest.param({"org_id": ""}, "invalid org id '': it is empty", id="org-empty"),
    pytest.param({"org_id": "   "}, "invalid org id '   ': it is empty", id="org-blank"),
    pytest.param({"org_id": LONG_ORG}, f"invalid org id {LONG_ORG[:40]!r}...: 5000 characters, the maximum is 200",
                 id="org-huge"),
    pytest.param({"org_id": b"caf\xe9"}, "invalid org id b'caf\\xe9': it is not valid UTF-8", id="org-not-utf8"),
    pytest.param({"org_id": NUL_ORG}, f"invalid org id {NUL_ORG!r}: it contains a NUL or an undecodable character",
                 id="org-nul"),
    pytest.param({"org_id": SURROGATE_ORG},
                 f"invalid org id {SURROGATE_ORG!r}: it contains a lone surrogate, which UTF-8 cannot encode",
                 id="org-surrogate"),
    pytest.param({"org_id": 42}, "invalid org id 42 of type int; expected a string", id="org-int"),
    pytest.param({"connection_id": ""}, "invalid connection id ''; expected a non-empty string",
                 id="connection-id-empty"),
    pytest.param({"connection_id": LONG_CONNECTION},
                 f"invalid connection id {LONG_CONNECTION[:40]!r}...: 300 characters, the maximum is 200",
                 id="connection-id-huge"),
    pytest.param({"connection_id": NUL_CONNECTION},
                 f"invalid connection id {NUL_CONNECTION!r}: it contains a NUL character", id="connection-id-nul"),
    pytest.param({"connection_id": 7}, "invalid connection id 7; expected a non-empty string", id="connection-id-int"),
]


@pytest.mark.parametrize(("bad", "message"), CLIENT_CASES)
def test_client_skips_bad_connection(bad, message, caplog):
    publisher = RecordingPublisher()
    client = new_client(publisher)
    bad_call = {**GOOD, **bad}

    with caplog.at_level(logging.WARNING, logger="metering.client"):
        client.record(**GOOD)
        client.record(**bad_call)
        client.record(**{**GOOD, "org_id": "globex"})
        published = client.flush()

    rows = publisher.rows_by_org()
    assert published is True
    assert client.stats()["invalid"] == 1
    assert client.stats()["recorded"] == 2
    assert f"metering ignored a connection end for org {bad_call['org_id']!r}: {message}" in caplog.messages
    assert rows["acme"]["connections"] == 1
    assert rows["acme"]["compute_milli"] == GOOD_COMPUTE_MILLI
    assert rows["globex"]["connections"] == 1


def test_client_bills_unknown_end_reason_as_other(caplog):
    publisher = RecordingPublisher()
    client = new_client(publisher)

    with caplog.at_level(logging.WARNING, logger="metering.client"):
        client.record(**GOOD, end_reason="oom_killed")
        client.flush()

    [acme] = publisher.rows_by_org().values()
    assert client.stats().get("invalid", 0) == 0
    assert client.stats()["unknown_end_reasons"] == 1
    assert acme["end_reasons"] == {"other": 1}
    assert acme["compute_milli"] == GOOD_COMPUTE_MILLI
    assert (
        f"metering recorded unknown end reason 'oom_killed' for org 'acme' as 'other'; accepted reasons are "
        f"{REASONS_TEXT}" in caplog.messages
    )


def test_module_api_never_raises_on_bad_input(monkeypatch, caplog):
    publisher = RecordingPublisher()
    client = new_client(publisher)
    monkeypatch.setattr(client_module, "_default_client", client)

    with caplog.at_level(logging.WARNING, logger="metering.client"):
        client_module.record_connection_end(**{**GOOD, "cores": object()})
        with client_module.metered_connection("acme", "2", "-4Gi"):
            pass
        client_module.record_connection_end(**GOOD)
        client.flush()

    assert client.stats()["invalid"] == 2
    assert publisher.rows_by_org()["acme"]["connections"] == 1
    assert "invalid memory '-4Gi'" in caplog.text
    assert "invalid cores <object object at" in caplog.text


# The task by name: an error naming the value, nothing applied for that message, the next message applied.

TASK_GOOD = {
    "org_id": "acme",
    "cores": "2",
    "memory": "4Gi",
    "ended_at": "2026-12-04T19:29:38.232Z",
    "duration_seconds": "9.2",
    "end_reason": "client_disconnect",
    "connection_id": "conn-bad",
}
ISO_HINT = "ISO 8601 with a zone such as 2026-12-04T19:29:38.232Z"

TASK_CASES = [
    pytest.param({"cores": "eight"}, f"invalid cores 'eight'; {CORES_ACCEPTED}", id="cores-word"),
    pytest.param({"cores": ["2"]}, f"invalid cores ['2'] of type list; {CORES_ACCEPTED}", id="cores-list"),
    pytest.param({"memory": "0Gi"}, f"invalid memory '0Gi': it must be greater than zero; {MEMORY_ACCEPTED}",
                 id="memory-zero"),
    pytest.param({"duration_seconds": "-1"}, "invalid duration '-1': a connection cannot last a negative time",
                 id="duration-negative"),
    pytest.param({"duration_seconds": "3456000"},
                 "invalid duration '3456000': longer than the maximum of 2678400 seconds "
                 "(METERING_MAX_CONNECTION_SECONDS); check the connection's start time", id="duration-40-days"),
    pytest.param({"duration_seconds": {"s": 1}},
                 "invalid duration {'s': 1} of type dict; expected seconds as a number or a timedelta",
                 id="duration-object"),
    pytest.param({"duration_seconds": True},
                 "invalid duration True of type bool; expected seconds as a number or a timedelta", id="duration-bool"),
    pytest.param({"ended_at": "2026-12-04T19:29:38"},
                 f"invalid ended_at '2026-12-04T19:29:38': it has no time zone; send {ISO_HINT}", id="ended-naive"),
    pytest.param({"ended_at": "yesterday"}, f"invalid ended_at 'yesterday'; expected {ISO_HINT}", id="ended-word"),
    pytest.param({"ended_at": 1796412578}, "invalid ended_at 1796412578; expected an ISO 8601 string with a zone",
                 id="ended-number"),
    pytest.param({"ended_at": None}, "missing ended_at; pass the connection's end time with a zone", id="ended-missing"),
    pytest.param({"started_at": "2026-12-04T19:29:40Z", "duration_seconds": None},
                 "invalid times: ended_at 2026-12-04T19:29:38.232000+00:00 is before started_at "
                 "2026-12-04T19:29:40+00:00", id="end-before-start"),
    pytest.param({"org_id": 42}, "invalid org id 42 of type int; expected a string", id="org-int"),
    pytest.param({"org_id": ""}, "invalid org id '': it is empty", id="org-empty"),
    pytest.param({"org_id": SURROGATE_ORG},
                 f"invalid org id {SURROGATE_ORG!r}: it contains a lone surrogate, which UTF-8 cannot encode",
                 id="org-surrogate"),
    pytest.param({"connection_id": None}, "invalid connection id None; expected a non-empty string",
                 id="connection-id-missing"),
    pytest.param({"connection_id": NUL_CONNECTION},
                 f"invalid connection id {NUL_CONNECTION!r}: it contains a NUL character", id="connection-id-nul"),
]


def applied_connection_keys():
    return set(AppliedMessage.objects.filter(key__startswith="conn:").values_list("key", flat=True))


@pytest.mark.django_db
@pytest.mark.parametrize(("bad", "message"), TASK_CASES)
def test_task_rejects_bad_connection_end(bad, message, caplog):
    kwargs = {**TASK_GOOD, **bad}

    with caplog.at_level(logging.ERROR, logger="metering.tasks"):
        rejected = record_connection_end.apply(kwargs=kwargs).get()
    applied = record_connection_end.apply(kwargs={**TASK_GOOD, "connection_id": "conn-good"}).get()

    assert rejected == 0
    assert f"rejected connection end {kwargs['connection_id']!r} for org {kwargs['org_id']!r}: {message}" in (
        caplog.messages
    )
    assert applied == 1
    assert applied_connection_keys() == {"conn:conn-good"}
    assert UsageBucket.objects.get().compute_milli == GOOD_COMPUTE_MILLI


@pytest.mark.django_db
def test_task_rejects_unknown_argument(caplog):
    with caplog.at_level(logging.ERROR, logger="metering.tasks"):
        rejected = record_connection_end.apply(kwargs={**TASK_GOOD, "org": "acme"}).get()

    assert rejected == 0
    assert (
        "rejected connection end 'conn-bad': unknown arguments org; accepted are org_id, cores, memory, started_at, "
        "ended_at, duration_seconds, end_reason, connection_id" in caplog.messages
    )
    assert UsageBucket.objects.count() == 0


@pytest.mark.django_db
def test_task_bills_unknown_end_reason_as_other(caplog):
    with caplog.at_level(logging.WARNING, logger="metering.connections"):
        applied = record_connection_end.apply(kwargs={**TASK_GOOD, "end_reason": "oom_killed"}).get()

    bucket = UsageBucket.objects.get()
    assert applied == 1
    assert bucket.ended_other == 1
    assert bucket.compute_milli == GOOD_COMPUTE_MILLI
    assert (
        f"metering recorded unknown end reason 'oom_killed' of connection 'conn-bad' for org 'acme' as 'other'; "
        f"accepted reasons are {REASONS_TEXT}" in caplog.messages
    )


@pytest.mark.integration
def test_worker_rejects_bad_messages_keeps_good(start_worker, worker_env):
    from settings.celery import app

    worker = start_worker()
    queue = worker_env["CELERY_QUEUE"]
    messages = [
        ("metering.record_connection_end", {**TASK_GOOD, "connection_id": "w-good-1"}),
        ("metering.record_connection_end", {**TASK_GOOD, "cores": "eight", "connection_id": "w-bad-1"}),
        ("metering.apply_batch", {"batch_id": "w-bad-2", "rows": [row(compute_milli=-1)]}),
        ("metering.apply_batch", {"batch_id": "w-bad-3", "rows": [row(compute_milli=2**63)]}),
        ("metering.apply_batch", {"batch_id": "w-bad-4", "rows": [row(org_id=NUL_ORG)]}),
        ("metering.record_connection_end", {**TASK_GOOD, "connection_id": "w-good-2"}),
    ]
    for name, kwargs in messages:
        app.send_task(name, kwargs=kwargs, queue=queue)

    wait_until(lambda: applied_connection_keys() == {"conn:w-good-1", "conn:w-good-2"}, 30,
               message="both good connection ends applied")
    wait_until(lambda: "w-bad-4" in worker.log_text(), 30, message="the last bad batch logged")
    log = worker.log_text()

    assert UsageBucket.objects.get().compute_milli == 2 * GOOD_COMPUTE_MILLI
    assert not AppliedMessage.objects.filter(key__startswith="batch:").exists()
    assert f"rejected connection end 'w-bad-1' for org 'acme': invalid cores 'eight'; {CORES_ACCEPTED}" in log
    assert "rejected malformed batch 'w-bad-2': row 0 has invalid compute_milli -1" in log
    assert "rejected malformed batch 'w-bad-3': row 0 has invalid compute_milli 9223372036854775808" in log
    assert f"rejected malformed batch 'w-bad-4': row 0 has invalid org_id {NUL_ORG!r}" in log
    assert "retrying in" not in log


# metering.apply_batch with a malformed body: nothing of that message is applied, its id stays unclaimed.

ROW_WITHOUT_ORG = {key: value for key, value in row().items() if key != "org_id"}
ROW_WITHOUT_START = {key: value for key, value in row().items() if key != "bucket_start"}

BATCH_CASES = [
    pytest.param({"batch_id": None}, "invalid batch_id None; expected a string of 1 to 200 characters",
                 id="batch-id-missing"),
    pytest.param({"batch_id": ""}, "invalid batch_id ''; expected a string of 1 to 200 characters", id="batch-id-empty"),
    pytest.param({"batch_id": "b" * 300}, f"invalid batch_id {'b' * 300!r}; expected a string of 1 to 200 characters",
                 id="batch-id-huge"),
    pytest.param({"batch_id": "b\x00"}, "invalid batch_id 'b\\x00': it contains a NUL character", id="batch-id-nul"),
    pytest.param({"rows": None}, "invalid rows None of type NoneType; expected a list of row objects", id="rows-missing"),
    pytest.param({"rows": {"org_id": "acme"}},
                 "invalid rows {'org_id': 'acme'} of type dict; expected a list of row objects", id="rows-object"),
    pytest.param({"rows": [42]}, "row 0 is int; expected an object", id="row-number"),
    pytest.param({"rows": [ROW_WITHOUT_ORG]}, "row 0 has invalid org_id None; expected a string of 1 to 200 characters",
                 id="org-missing"),
    pytest.param({"rows": [row(org_id=NUL_ORG)]}, f"row 0 has invalid org_id {NUL_ORG!r}: it contains a NUL character",
                 id="org-nul"),
    pytest.param({"rows": [row(org_id=SURROGATE_ORG)]},
                 f"row 0 has invalid org_id {SURROGATE_ORG!r}: it contains a lone surrogate, which UTF-8 cannot encode",
                 id="org-surrogate"),
    pytest.param({"rows": [row(compute_milli=-1)]},
                 "row 0 has invalid compute_milli -1; expected a non-negative integer", id="compute-negative"),
    pytest.param({"rows": [row(compute_milli=1.5)]},
                 "row 0 has invalid compute_milli 1.5; expected a non-negative integer", id="compute-float"),
    pytest.param({"rows": [row(compute_milli="80000")]},
                 "row 0 has invalid compute_milli '80000'; expected a non-negative integer", id="compute-string"),
    pytest.param({"rows": [row(compute_milli=True)]},
                 "row 0 has invalid compute_milli True; expected a non-negative integer", id="compute-bool"),
    pytest.param({"rows": [row(compute_milli=2**63)]},
                 "row 0 has invalid compute_milli 9223372036854775808; the maximum is 9223372036854775807",
                 id="compute-beyond-bigint"),
    pytest.param({"rows": [row(bucket_seconds=0)]}, "row 0 has bucket_seconds 0; expected a positive integer",
                 id="bucket-seconds-zero"),
    pytest.param({"rows": [row(bucket_seconds=2**31)]},
                 "row 0 has invalid bucket_seconds 2147483648; the maximum is 2147483647", id="bucket-seconds-huge"),
    pytest.param({"rows": [ROW_WITHOUT_START]}, "row 0 has invalid bucket_start None; expected a non-negative integer",
                 id="bucket-start-missing"),
    pytest.param({"rows": [row(end_reasons=["idle_reap"])]},
                 "row 0 has invalid end_reasons ['idle_reap']; expected an object of counts", id="end-reasons-list"),
    pytest.param({"rows": [row(end_reasons={"teleported": 1})]},
                 f"row 0 has unknown end reason 'teleported'; accepted reasons are {REASONS_TEXT}",
                 id="end-reason-unknown"),
    pytest.param({"rows": [row(end_reasons={"idle_reap": -1})]},
                 "row 0 has invalid count -1 for end reason 'idle_reap'", id="end-reason-count-negative"),
    pytest.param({"rows": [row(connection_id=5)]},
                 "row 0 has invalid connection_id 5; expected a string of 1 to 200 characters", id="connection-id-int"),
    pytest.param({"rows": [row(connection_id=NUL_CONNECTION)]},
                 f"row 0 has invalid connection_id {NUL_CONNECTION!r}: it contains a NUL character",
                 id="connection-id-nul"),
    pytest.param({"rows": [row(org_id="good-first"), row(connections=-3)]},
                 "row 1 has invalid connections -3; expected a non-negative integer", id="bad-second-row"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("bad", "message"), BATCH_CASES)
def test_apply_batch_rejects_malformed_body(bad, message, caplog):
    kwargs = {"batch_id": "batch-bad", "rows": [row()], **bad}

    with caplog.at_level(logging.ERROR, logger="metering.tasks"):
        rejected = apply_batch.apply(kwargs=kwargs).get()
    applied = apply_batch.apply(kwargs={"batch_id": "batch-good", "rows": [row(org_id="globex")]}).get()

    assert rejected == 0
    assert f"rejected malformed batch {kwargs['batch_id']!r}: {message}; the message is dropped" in caplog.messages
    assert applied == 1
    assert list(UsageBucket.objects.values_list("org_id", flat=True)) == ["globex"]
    assert set(AppliedMessage.objects.values_list("key", flat=True)) == {"batch:batch-good"}


@pytest.mark.django_db
def test_apply_batch_rejects_unknown_argument(caplog):
    with caplog.at_level(logging.ERROR, logger="metering.tasks"):
        rejected = apply_batch.apply(kwargs={"batch_id": "batch-bad", "rowz": [row()]}).get()

    assert rejected == 0
    assert (
        "rejected malformed batch 'batch-bad': unknown arguments rowz; accepted are batch_id, rows; "
        "the message is dropped" in caplog.messages
    )
    assert UsageBucket.objects.count() == 0


# The importer command.

def stderr_log_line(database, seconds=2, pid=4242):
    return (
        f"2026-12-04 19:29:38.907 UTC [{pid}] LOG:  disconnection: session time: 0:00:{seconds:02d}.000 "
        f"user=svc database={database} host=127.0.0.1 port=5000\n"
    ).encode("utf-8")


@pytest.fixture
def inputs(tmp_path):
    """A good log, a good sizes file and helpers that write bad ones into tmp_path."""
    directory = tmp_path / "inputs"
    directory.mkdir()

    def write(name, content):
        path = directory / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)

    write("good.log", stderr_log_line("org_acme"))
    write("sizes.csv", "org,cores,memory\nacme,2,4Gi\n")
    write.directory = directory
    return write


def many_sessions_gzip(count):
    lines = b"".join(stderr_log_line("org_acme", pid=1000 + index) for index in range(count))
    return gzip.compress(lines, mtime=0)


IMPORT_CASES = [
    pytest.param(lambda put: (["{dir}/missing.log", "--sizes", "{dir}/sizes.csv"]), "log file not found: {dir}/missing.log",
                 id="log-missing"),
    pytest.param(lambda put: (["{dir}", "--sizes", "{dir}/sizes.csv"]),
                 "log path is a directory: {dir}; give the log files themselves", id="log-directory"),
    pytest.param(lambda put: ([put("corrupt.log.gz", b"\x1f\x8bnot gzip at all"), "--sizes", "{dir}/sizes.csv"]),
                 "cannot read log file {dir}/corrupt.log.gz: Unknown compression method", id="log-corrupt-gzip"),
    pytest.param(lambda put: ([put("truncated.log.gz", many_sessions_gzip(2000)[:3000]), "--sizes", "{dir}/sizes.csv"]),
                 "cannot read log file {dir}/truncated.log.gz after line *: Compressed file ended before the "
                 "end-of-stream marker was reached", id="log-truncated-gzip"),
    pytest.param(lambda put: ([put("notes.txt", "hello world\n"), "--sizes", "{dir}/sizes.csv"]),
                 "{dir}/notes.txt is not a PostgreSQL stderr log: the first line does not start with a timestamp and "
                 "a severity (expected a log_line_prefix that begins with %m or %t): 'hello world'", id="log-not-postgres"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", "{dir}/sizes.csv", "--format", "json"]),
                 "{dir}/good.log is not a PostgreSQL json log: the first line is not a JSON object: Extra data: "
                 "line 1 column 5 (char 4)", id="log-format-mismatch"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", "{dir}/missing.csv"]),
                 "cannot read worker sizes {dir}/missing.csv: No such file or directory", id="sizes-missing"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", "{dir}"]),
                 "cannot read worker sizes {dir}: Is a directory", id="sizes-directory"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", put("latin1.csv", b"org,cores,memory\ncaf\xe9,2,4Gi\n")]),
                 "cannot read worker sizes {dir}/latin1.csv: not UTF-8 text ('utf-8' codec can't decode byte 0xe9 in "
                 "position 20: invalid continuation byte)", id="sizes-not-utf8"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", put("columns.csv", "org,cores\nacme,2\n")]),
                 "{dir}/columns.csv: missing column(s) memory; the header must be org,cores,memory",
                 id="sizes-missing-column"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", put("unit.csv", "org,cores,memory\nacme,2,4GB\n")]),
                 f"{{dir}}/unit.csv:2: invalid memory '4GB'; {MEMORY_ACCEPTED}", id="sizes-unknown-unit"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", put("zero.csv", "org,cores,memory\nacme,0,4Gi\n")]),
                 f"{{dir}}/zero.csv:2: invalid cores '0': it must be greater than zero; {CORES_ACCEPTED}",
                 id="sizes-zero-cores"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", put("negative.csv", "org,cores,memory\nacme,-2,4Gi\n")]),
                 f"{{dir}}/negative.csv:2: invalid cores '-2'; {CORES_ACCEPTED}", id="sizes-negative-cores"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", put("short.csv", "org,cores,memory\nacme,2\n")]),
                 f"{{dir}}/short.csv:2: invalid memory ''; {MEMORY_ACCEPTED}", id="sizes-short-row"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", put("noorg.csv", "org,cores,memory\n,2,4Gi\n")]),
                 "{dir}/noorg.csv:2: empty org", id="sizes-empty-org"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", put("empty.csv", "org,cores,memory\n")]),
                 "{dir}/empty.csv lists no worker sizes; add rows such as 'acme,8,16Gi'", id="sizes-no-rows"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes",
                               put("twice.csv", "org,cores,memory\nacme,2,4Gi\nacme,8,16Gi\n")]),
                 "{dir}/twice.csv:3: org 'acme' is listed twice; keep one size per org", id="sizes-duplicate-org"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", "{dir}/sizes.csv", "--org-pattern", "org_("]),
                 "invalid --org-pattern 'org_(': missing ), unterminated subpattern at position 4", id="regex-unbalanced"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", "{dir}/sizes.csv", "--org-pattern", "org_.+"]),
                 "invalid --org-pattern 'org_.+': it needs a group that captures the org id", id="regex-no-group"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", "{dir}/sizes.csv", "--format", "xml"]),
                 "invalid --format 'xml'; use one of auto, stderr, csv, json", id="format-unknown"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", "{dir}/sizes.csv", "--wait", "0"]),
                 "invalid --wait 0; use a number of seconds of at least 1", id="wait-zero"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", "{dir}/sizes.csv", "--wait", "soon"]),
                 "Error: argument --wait: invalid int value: 'soon'", id="wait-word"),
    pytest.param(lambda put: (["{dir}/good.log", "--sizes", "{dir}/sizes.csv", "--org-from", "host"]),
                 "Error: argument --org-from: invalid choice: 'host' (choose from 'database', 'user')",
                 id="org-from-unknown"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("arguments", "message"), IMPORT_CASES)
def test_importer_rejects_bad_input(arguments, message, inputs):
    directory = str(inputs.directory)
    argv = [argument.replace("{dir}", directory) for argument in arguments(inputs)]
    prefix, _, suffix = message.replace("{dir}", directory).partition("*")

    with pytest.raises(CommandError) as error:
        call_command("import_connection_log", *argv)

    assert str(error.value).startswith(prefix)
    assert str(error.value).endswith(suffix) if suffix else str(error.value) == prefix
    assert UsageBucket.objects.count() == 0


def run_without_file_permissions(argv, env):
    """Run a command that cannot read files by their permission bits, even as root."""
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop the file-permission override")
        argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *argv]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("unreadable", ["log", "sizes"])
def test_importer_rejects_unreadable_file(unreadable, inputs, tmp_path):
    directory = inputs.directory
    target = directory / ("good.log" if unreadable == "log" else "sizes.csv")
    target.chmod(0)
    env = {**os.environ, "METERING_DATA_DIR": str(tmp_path / "var")}

    result = run_without_file_permissions(
        [sys.executable, "manage.py", "import_connection_log", str(directory / "good.log"),
         "--sizes", str(directory / "sizes.csv")],
        env,
    )

    expected = {
        "log": f"CommandError: log file not readable: {target}",
        "sizes": f"CommandError: cannot read worker sizes {target}: Permission denied",
    }[unreadable]
    assert result.returncode == 1
    assert expected in result.stderr


@pytest.mark.django_db
def test_importer_skips_non_utf8_name_keeps_others(inputs, settings, redis_client):
    settings.CELERY_TASK_DEFAULT_QUEUE = queue = f"test-{uuid.uuid4().hex[:8]}"
    latin1_line = stderr_log_line("org_cafe", pid=2).replace(b"org_cafe", b"org_caf\xe9")
    log = inputs("mixed.log", stderr_log_line("org_acme", pid=1) + latin1_line)
    try:
        call_command("import_connection_log", log, "--sizes", str(inputs.directory / "sizes.csv"))
        sent = [json.loads(message) for message in redis_client.lrange(queue, 0, -1)]
    finally:
        redis_client.delete(queue)

    # Without a worker to confirm it, the batch was sent twice under the same task id.
    batches = {message["headers"]["id"]: message for message in sent}
    [(_, kwargs, _)] = [json.loads(base64.b64decode(message["body"])) for message in batches.values()]
    assert [row["org_id"] for row in kwargs["rows"]] == ["acme"]
    assert kwargs["rows"][0]["compute_milli"] == 4_000


# The drain command.

@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param(["--batch-size", "0"], "--batch-size 0 is invalid; use a whole number of at least 1", id="batch-zero"),
        pytest.param(["--batch-size", "-5"], "--batch-size -5 is invalid; use a whole number of at least 1",
                     id="batch-negative"),
        pytest.param(["--batch-size", "ten"], "Error: argument --batch-size: invalid int value: 'ten'", id="batch-word"),
        pytest.param(["--org", ""], "--org '' is invalid; give an org id, or leave out --org to drain every org",
                     id="org-empty"),
        pytest.param(["--org", "  "], "--org '  ' is invalid; give an org id, or leave out --org to drain every org",
                     id="org-blank"),
    ],
)
def test_drain_command_rejects_bad_argument(arguments, message):
    with pytest.raises(CommandError) as error:
        call_command("drain_billing", *arguments)

    assert str(error.value) == message


# Settings read from the environment by a fresh interpreter.

SETTINGS_CASES = [
    pytest.param({"METERING_BUCKET_SECONDS": "abc"},
                 "METERING_BUCKET_SECONDS='abc' is not a whole number; set it to an integer such as 60",
                 id="bucket-word"),
    pytest.param({"METERING_BUCKET_SECONDS": "1.5"},
                 "METERING_BUCKET_SECONDS='1.5' is not a whole number; set it to an integer such as 60",
                 id="bucket-fraction"),
    pytest.param({"METERING_BUCKET_SECONDS": "0"}, "METERING_BUCKET_SECONDS='0' is too small; the minimum is 1",
                 id="bucket-zero"),
    pytest.param({"METERING_BUCKET_SECONDS": "-60"}, "METERING_BUCKET_SECONDS='-60' is too small; the minimum is 1",
                 id="bucket-negative"),
    pytest.param({"METERING_BUCKET_SECONDS": "86401"},
                 "METERING_BUCKET_SECONDS='86401' is too large; the maximum is 86400", id="bucket-over-a-day"),
    pytest.param({"METERING_BUCKET_SECONDS": "60", "METERING_GRACE_SECONDS": "61"},
                 "METERING_GRACE_SECONDS=61 is longer than METERING_BUCKET_SECONDS=60; the grace must be at most one "
                 "bucket", id="grace-longer-than-bucket"),
    pytest.param({"METERING_GRACE_SECONDS": "-1"}, "METERING_GRACE_SECONDS='-1' is too small; the minimum is 0",
                 id="grace-negative"),
    pytest.param({"METERING_MEMORY_PER_CORE_GIB": "0"}, "METERING_MEMORY_PER_CORE_GIB='0' must be greater than 0",
                 id="r-zero"),
    pytest.param({"METERING_MEMORY_PER_CORE_GIB": "-2"}, "METERING_MEMORY_PER_CORE_GIB='-2' must be greater than 0",
                 id="r-negative"),
    pytest.param({"METERING_MEMORY_PER_CORE_GIB": "two"},
                 "METERING_MEMORY_PER_CORE_GIB='two' is not a decimal number; set it to a value such as 2", id="r-word"),
    pytest.param({"METERING_MEMORY_PER_CORE_GIB": "NaN"},
                 "METERING_MEMORY_PER_CORE_GIB='NaN' must be a finite decimal number", id="r-nan"),
    pytest.param({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG='maybe' is not a boolean; use one of 1, 0, true, false",
                 id="debug-not-boolean"),
    pytest.param({"METERING_FLUSH_SECONDS": "0"}, "METERING_FLUSH_SECONDS='0' must be greater than 0", id="flush-zero"),
    pytest.param({"METERING_PUBLISH_TIMEOUT_SECONDS": "-1"},
                 "METERING_PUBLISH_TIMEOUT_SECONDS='-1' must be greater than 0", id="publish-timeout-negative"),
    pytest.param({"METERING_MAX_CONNECTION_SECONDS": "0"},
                 "METERING_MAX_CONNECTION_SECONDS='0' is too small; the minimum is 1", id="max-connection-zero"),
    pytest.param({"METERING_DEDUP_RETENTION_DAYS": "0"},
                 "METERING_DEDUP_RETENTION_DAYS='0' is too small; the minimum is 1", id="dedup-retention-zero"),
    pytest.param({"DRAIN_LOCK_TIMEOUT_SECONDS": "1"}, "DRAIN_LOCK_TIMEOUT_SECONDS='1' is too small; the minimum is 5",
                 id="lock-timeout-short"),
    pytest.param({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/15", "CELERY_VISIBILITY_TIMEOUT": "0"},
                 "CELERY_VISIBILITY_TIMEOUT='0' is too small; the minimum is 1", id="visibility-timeout-zero"),
    pytest.param({"CELERY_BROKER_URL": "nope://"},
                 "CELERY_BROKER_URL='nope://' is not a supported broker; use redis://host:6379/0, rediss://… or "
                 "filesystem://localhost/ (the default)", id="broker-url-unknown-scheme"),
    pytest.param({"CELERY_BROKER_URL": "amqp://app:s3cret@rabbit:5672//"},
                 "CELERY_BROKER_URL='rabbit:5672//' is not a supported broker", id="broker-url-amqp-hides-password"),
    pytest.param({"METERING_CONFIRM_SECONDS": "-5"},
                 "METERING_CONFIRM_SECONDS='-5' is too small; the minimum is 0", id="confirm-negative"),
    pytest.param({"METERING_LOG_LEVEL": "LOUD"},
                 "METERING_LOG_LEVEL='LOUD' is invalid; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
                 id="log-level-unknown"),
    pytest.param({"POSTHOG_HOST": "us.i.posthog.com"},
                 "POSTHOG_HOST='us.i.posthog.com' is not a URL; set it to your PostHog host such as "
                 "https://us.i.posthog.com", id="posthog-host-not-url"),
    pytest.param({"DATABASE_URL": "garbage"}, "DATABASE_URL='garbage' is not a database URL (Scheme '://' is unknown.",
                 id="database-url-garbage"),
    pytest.param({"DATABASE_URL": "postgres://app:s3cret@db:port/billing"},
                 "DATABASE_URL='postgres://app:***@db:port/billing' is not a database URL (", id="database-url-bad-port"),
]


@pytest.mark.parametrize(("variables", "message"), SETTINGS_CASES)
def test_settings_reject_bad_environment(variables, message, tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith(("METERING_", "DRAIN_", "CELERY_"))}
    env.update({"METERING_DATA_DIR": str(tmp_path / "var"), **variables})

    result = subprocess.run([sys.executable, "-c", "import settings"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)

    assert result.returncode == 1
    assert f"django.core.exceptions.ImproperlyConfigured: {message}" in result.stderr
    assert "s3cret" not in result.stderr


def test_check_command_names_bad_variable(tmp_path):
    env = {**os.environ, "METERING_DATA_DIR": str(tmp_path / "var"), "METERING_BUCKET_SECONDS": "0"}

    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)

    assert result.returncode == 1
    assert "configuration error: METERING_BUCKET_SECONDS='0' is too small; the minimum is 1" in result.stderr
    assert "Traceback" not in result.stderr
