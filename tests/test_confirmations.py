"""The confirmation stores: a worker confirms a message id once, a sender takes it once."""

import os
import time
import uuid

import pytest

from metering.confirmations import TTL_SECONDS, FileConfirmations, RedisConfirmations, confirmations_from_settings


@pytest.fixture(params=["file", "redis"])
def store(request, tmp_path):
    if request.param == "file":
        yield FileConfirmations(tmp_path / "confirmed")
        return
    url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    yield RedisConfirmations(url, 2.0)


def test_confirmation_is_taken_once(store):
    confirmed_id = str(uuid.uuid4())
    other_id = str(uuid.uuid4())
    store.confirm(confirmed_id)

    assert store.take_confirmed([confirmed_id, other_id]) == {confirmed_id}
    assert store.take_confirmed([confirmed_id, other_id]) == set()


def test_any_message_id_can_be_confirmed(store):
    # Senders by name choose their own task ids.
    odd_ids = [f"../{uuid.uuid4()}/x", f"tâche {uuid.uuid4()}", "x" * 300 + str(uuid.uuid4())]
    for message_id in odd_ids:
        store.confirm(message_id)

    assert store.take_confirmed(odd_ids) == set(odd_ids)


def test_files_nobody_read_expire(tmp_path, monkeypatch):
    monkeypatch.setattr(FileConfirmations, "_PRUNE_EVERY", 3)
    store = FileConfirmations(tmp_path / "confirmed")
    store.confirm("old")
    old_file = next((tmp_path / "confirmed").iterdir())
    expired = time.time() - TTL_SECONDS - 60
    os.utime(old_file, (expired, expired))

    store.confirm("new-1")
    store.confirm("new-2")

    assert not old_file.exists()
    assert store.take_confirmed(["old", "new-1", "new-2"]) == {"new-1", "new-2"}


@pytest.mark.parametrize(
    ("broker_url", "confirm_seconds", "expected"),
    [
        ("redis://127.0.0.1:6379/15", 60, RedisConfirmations),
        ("filesystem://localhost/", 60, FileConfirmations),
        ("redis://127.0.0.1:6379/15", 0, type(None)),
    ],
)
def test_store_follows_broker(settings, broker_url, confirm_seconds, expected):
    settings.CELERY_BROKER_URL = broker_url
    settings.METERING_CONFIRM_SECONDS = confirm_seconds

    assert type(confirmations_from_settings()) is expected
