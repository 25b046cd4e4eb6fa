"""A short run of the fault-injection harness (tests/chaos.py): billing stays exact under faults.

Each run starts its own PostgreSQL, Redis, capture server, workers, beat and
control-plane processes, so it needs the PostgreSQL 15 server binaries and
redis-server on this machine. A run takes about a minute on two cores.

The mixed run includes worker SIGKILLs and Redis stops at random moments,
which can land in the window of kombu's Redis transport between taking a
message off the queue and recording it as unacknowledged. The clients and the
harness's sender by name recover such a message by sending it again when no
worker confirmed it (metering/confirmations.py).
"""

import re
import subprocess
import sys

import pytest

from tests.chaos import FAULT_WEIGHTS
from tests.chaos_services import ROOT, unavailable_reason

pytestmark = pytest.mark.integration

RUN_TIMEOUT_SECONDS = 400


def run_chaos(*arguments):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"the chaos harness cannot run here: {reason}")
    return subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--max-future-skew", "10", "--settle-seconds", "180", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
    )


def table_row(output, label):
    """Return the numbers of one row of the harness's table: expected, billed, over-billed, lost, accepted loss."""
    match = re.search(rf"^{label}\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", output, re.MULTILINE)
    assert match, f"no {label!r} row in the harness output:\n{output}"
    return match.groups()


def test_mixed_faults_bill_exactly():
    result = run_chaos("--rounds", "10", "--seed", "7", "--faults", ",".join(sorted(FAULT_WEIGHTS)))
    output = result.stdout + result.stderr[-4000:]
    _, _, over, lost, _ = table_row(result.stdout, "compute seconds")

    assert result.returncode == 0, output
    assert over == "0.000", output
    assert lost == "0.000", output
    assert "uuids with conflicting content: 0" in result.stdout, output
    assert "result: PASS" in result.stdout, output


def test_sigterm_during_broker_outage_flushes():
    result = run_chaos(
        "--rounds", "6", "--seed", "3", "--faults", "cp_sigterm_redis_down,cp_sigterm_redis_frozen,cp_sigterm"
    )
    output = result.stdout + result.stderr[-4000:]
    _, _, over, lost, accepted = table_row(result.stdout, "compute seconds")

    assert result.returncode == 0, output
    assert lost == "0.000", output
    assert accepted == "0.000", output
    assert over == "0.000", output
    assert "exit flush left rows unpublished" not in result.stdout, output
