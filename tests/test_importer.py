"""The importer on the shipped PostgreSQL log, through a real worker into PostgreSQL."""

import re
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from billing_drain import services
from metering.models import AppliedMessage, UsageBucket
from tests.processes import wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LOG = EXAMPLES / "postgres-connections.log.gz"
SIZES = EXAMPLES / "worker-sizes.csv"
EXPECTED = {
    "acme": Decimal("102288"),
    "globex": Decimal("433440"),
    "hooli": Decimal("372.546"),
    "initech": Decimal("516"),
    "umbrella": Decimal("333"),
}


def billed_by_org(capture_server):
    billed = defaultdict(int)
    for event in capture_server.events_by_uuid().values():
        billed[event["distinct_id"]] += event["properties"]["compute_milli"]
    return {org: Decimal(milli).scaleb(-3) for org, milli in billed.items()}


@pytest.mark.integration
def test_example_log_bills_expected_totals(settings, worker_env, start_worker, posthog_settings, capture_server, capsys):
    settings.CELERY_TASK_DEFAULT_QUEUE = worker_env["CELERY_QUEUE"]
    start_worker()

    call_command("import_connection_log", str(LOG), "--sizes", str(SIZES))
    output = capsys.readouterr().out
    wait_until(lambda: AppliedMessage.objects.filter(key__startswith="conn:").count() == 26_466, 60,
               message="26,466 sessions applied")
    services.drain()

    assert "Sessions metered: 26466" in output
    assert "no org match: 12" in output
    assert billed_by_org(capture_server) == EXPECTED
    assert sum(event["properties"]["connections"] for event in capture_server.events_by_uuid().values()) == 26_466
    assert UsageBucket.objects.count() == 0

    batches_before = AppliedMessage.objects.filter(key__startswith="batch:").count()
    call_command("import_connection_log", str(LOG), "--sizes", str(SIZES))
    messages = int(re.search(r"in (\d+) messages", capsys.readouterr().out).group(1))
    wait_until(
        lambda: AppliedMessage.objects.filter(key__startswith="batch:").count() == batches_before + messages,
        60,
        message="the second import's batches to be applied",
    )
    report = services.drain()

    assert UsageBucket.objects.count() == 0
    assert report.delivered_events == 0
    assert billed_by_org(capture_server) == EXPECTED


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param(["missing.log", "--sizes", str(SIZES)], "log file not found: missing.log", id="missing-log"),
        pytest.param([str(LOG), "--sizes", "missing.csv"], "cannot read worker sizes missing.csv", id="missing-sizes"),
        pytest.param([str(LOG), "--sizes", str(SIZES), "--format", "xml"], "invalid --format 'xml'", id="bad-format"),
        pytest.param([str(LOG), "--sizes", str(SIZES), "--org-pattern", "org_("], "invalid --org-pattern", id="bad-regex"),
        pytest.param([str(LOG), "--sizes", str(SIZES), "--org-pattern", "org_.+"], "needs a group", id="no-group"),
    ],
)
def test_importer_rejects_bad_arguments(arguments, message):
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        call_command("import_connection_log", *arguments)


@pytest.mark.django_db
def test_importer_fails_when_no_org_matches():
    with pytest.raises(CommandError) as error:
        call_command("import_connection_log", str(LOG), "--sizes", str(SIZES), "--org-pattern", "^customer_(.+)$")

    assert "no session matched --org-pattern '^customer_(.+)$' on the database name" in str(error.value)
    assert "'org_acme'" in str(error.value)


@pytest.mark.django_db
def test_importer_rejects_duplicate_org_sizes(tmp_path):
    sizes = tmp_path / "sizes.csv"
    sizes.write_text("org,cores,memory\nacme,8,16Gi\nacme,4,8Gi\n")

    with pytest.raises(CommandError, match=r"sizes.csv:3: org 'acme' is listed twice"):
        call_command("import_connection_log", str(LOG), "--sizes", str(sizes))


@pytest.mark.django_db
def test_importer_rejects_bad_size_row(tmp_path):
    sizes = tmp_path / "sizes.csv"
    sizes.write_text("org,cores,memory\nacme,8,16GB\n")

    with pytest.raises(CommandError, match=r"sizes.csv:2: invalid memory '16GB'"):
        call_command("import_connection_log", str(LOG), "--sizes", str(sizes))
