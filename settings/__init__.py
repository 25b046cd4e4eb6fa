"""Django settings, read from the environment.

With no variables set, everything runs on one machine: SQLite under ``var/``
and kombu's filesystem transport as the Celery broker, and events that cannot
go to PostHog (no API key) are written to a local outbox instead of being
deleted.
"""

from datetime import timedelta
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from settings.env import env_bool, env_choice, env_database_url, env_decimal, env_int, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("METERING_DATA_DIR", str(BASE_DIR / "var")))
DATA_DIR.mkdir(parents=True, exist_ok=True)

# The default key only signs admin sessions on a developer machine.
SECRET_KEY = env_str("DJANGO_SECRET_KEY", "insecure-local-only-key-set-DJANGO_SECRET_KEY-in-production")
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = [host for host in env_str("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",") if host]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "metering",
    "billing_drain",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "settings.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "settings.wsgi.application"

# Database: DATABASE_URL, or SQLite on this machine.
SQLITE_PATH = DATA_DIR / "metering.sqlite3"
DATABASES = {"default": env_database_url("DATABASE_URL", f"sqlite:///{SQLITE_PATH}", conn_max_age=60)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The worker, beat and management commands write to the same file. WAL lets
    # readers go on during a write, and IMMEDIATE transactions take the write
    # lock up front so two writers queue instead of failing on lock upgrade.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
USE_I18N = False
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"

# The billable unit and the buffer.
METERING_BUCKET_SECONDS = env_int("METERING_BUCKET_SECONDS", 60, minimum=1, maximum=86400)
METERING_GRACE_SECONDS = env_int("METERING_GRACE_SECONDS", 30, minimum=0)
if METERING_GRACE_SECONDS > METERING_BUCKET_SECONDS:
    raise ImproperlyConfigured(
        f"METERING_GRACE_SECONDS={METERING_GRACE_SECONDS} is longer than "
        f"METERING_BUCKET_SECONDS={METERING_BUCKET_SECONDS}; the grace must be at most one bucket"
    )
METERING_MEMORY_PER_CORE_GIB = env_decimal("METERING_MEMORY_PER_CORE_GIB", "2", minimum_exclusive=0)
# Longer connections are rejected as implausible (a wrong start time, a clock
# reset) instead of being billed for days: 31 days by default.
METERING_MAX_CONNECTION_SECONDS = env_int("METERING_MAX_CONNECTION_SECONDS", 31 * 86400, minimum=1)

# The in-process client that control-plane processes embed.
METERING_FLUSH_SECONDS = env_decimal("METERING_FLUSH_SECONDS", "2", minimum_exclusive=0)
METERING_MAX_PENDING_KEYS = env_int("METERING_MAX_PENDING_KEYS", 100_000, minimum=1)
METERING_MAX_PENDING_CONNECTIONS = env_int("METERING_MAX_PENDING_CONNECTIONS", 1_000_000, minimum=1)
METERING_ROWS_PER_MESSAGE = env_int("METERING_ROWS_PER_MESSAGE", 500, minimum=1)
METERING_PUBLISH_TIMEOUT_SECONDS = env_decimal("METERING_PUBLISH_TIMEOUT_SECONDS", "2", minimum_exclusive=0)
METERING_EXIT_FLUSH_SECONDS = env_decimal("METERING_EXIT_FLUSH_SECONDS", "5", minimum_exclusive=0)
# The client keeps each published batch until a worker confirms it
# (metering/confirmations.py), and sends it again (same batch id) when no
# confirmation came within this many seconds, doubling up to ten minutes.
# 0 turns this off.
METERING_CONFIRM_SECONDS = env_int("METERING_CONFIRM_SECONDS", 60, minimum=0)
# Message ids applied to the buffer are kept this long to recognise redeliveries
# and re-imports. It must stay longer than the broker's visibility timeout.
METERING_DEDUP_RETENTION = timedelta(days=env_int("METERING_DEDUP_RETENTION_DAYS", 35, minimum=1))

# Delivery to PostHog.
POSTHOG_API_KEY = env_str("POSTHOG_API_KEY")
POSTHOG_HOST = env_str("POSTHOG_HOST", "https://us.i.posthog.com")
if not POSTHOG_HOST.startswith(("http://", "https://")):
    raise ImproperlyConfigured(
        f"POSTHOG_HOST={POSTHOG_HOST!r} is not a URL; set it to your PostHog host such as https://us.i.posthog.com"
    )
POSTHOG_TIMEOUT_SECONDS = env_int("POSTHOG_TIMEOUT_SECONDS", 15, minimum=1)
METERING_EVENT_NAME = env_str("METERING_EVENT_NAME", "managed warehouse compute usage")
METERING_OUTBOX_DIR = Path(env_str("METERING_OUTBOX_DIR", str(DATA_DIR / "outbox")))
DRAIN_BATCH_SIZE = env_int("DRAIN_BATCH_SIZE", 500, minimum=1)
DRAIN_INTERVAL_SECONDS = env_int("DRAIN_INTERVAL_SECONDS", 60, minimum=1)
# Deployments that share one Redis need different lock names.
DRAIN_LOCK_NAME = env_str("DRAIN_LOCK_NAME", "billing-drain")
DRAIN_LOCK_TIMEOUT_SECONDS = env_int("DRAIN_LOCK_TIMEOUT_SECONDS", 120, minimum=5)
DRAIN_MAX_BACKOFF_SECONDS = env_int("DRAIN_MAX_BACKOFF_SECONDS", 3600, minimum=1)

# Redis for the drain's singleton lock; without it the lock is a database row.
REDIS_URL = env_str("REDIS_URL")

# Celery.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://localhost/")
if not CELERY_BROKER_URL.startswith(("redis://", "rediss://", "filesystem://")):
    raise ImproperlyConfigured(
        f"CELERY_BROKER_URL={CELERY_BROKER_URL.split('@')[-1]!r} is not a supported broker; "
        "use redis://host:6379/0, rediss://… or filesystem://localhost/ (the default)"
    )
CELERY_BROKER_DIR = DATA_DIR / "broker"
if CELERY_BROKER_URL.startswith("filesystem://"):
    for folder in ("queue", "processed", "control"):
        (CELERY_BROKER_DIR / folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(CELERY_BROKER_DIR / "queue"),
        "data_folder_out": str(CELERY_BROKER_DIR / "queue"),
        "processed_folder": str(CELERY_BROKER_DIR / "processed"),
        # kombu keeps its exchange tables in ./control by default.
        "control_folder": str(CELERY_BROKER_DIR / "control"),
        "store_processed": False,
        # kombu polls the folder once a second by default, which caps a
        # prefork worker at about one message a second.
        "polling_interval": 0.1,
    }
else:
    # kombu's Redis transport waits forever on a dead or frozen server unless
    # its sockets have timeouts, which would hang the flusher thread.
    publish_timeout = float(METERING_PUBLISH_TIMEOUT_SECONDS)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "socket_timeout": publish_timeout,
        "socket_connect_timeout": publish_timeout,
        "socket_keepalive": True,
        "retry_on_timeout": False,
        "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600, minimum=1),
        "max_retries": 1,
    }
CELERY_BROKER_CONNECTION_TIMEOUT = float(METERING_PUBLISH_TIMEOUT_SECONDS)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A worker keeps reconnecting through a broker outage of any length instead of
# exiting after 100 attempts; its tasks are idempotent, so a task cut off by
# the lost connection can be cancelled and redelivered safely.
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_QUEUE", "metering")
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# Acknowledge only after the buffer transaction committed, and hand the message
# back if the worker dies, so a crash re-runs the task instead of losing it.
# The task is idempotent by its message id, so the re-run counts once.
# kombu's Redis transport removes a message from the queue (BRPOP) before it
# records it as unacknowledged, so a worker killed, or a Redis stopped, in the
# milliseconds between loses that message, whatever these settings are. The
# client covers that window because it sends again the batches no worker
# confirmed (METERING_CONFIRM_SECONDS, metering/confirmations.py).
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Without this, Celery's Django fixup closes the database connection before and
# after every task, so each message paid for a new PostgreSQL connection, the
# largest fixed cost of a message (BENCHMARKS.md, increments). With it, the
# fixup closes the connection every CELERY_DB_REUSE_MAX tasks. Before each task,
# settings/celery.py runs Django's close_old_connections, which closes a failed
# or expired (CONN_MAX_AGE) connection. With CONN_HEALTH_CHECKS the task's first
# query then checks the connection and replaces one the server dropped, as after
# a PostgreSQL restart, so the task does not fail on it.
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1000, minimum=1)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULE = {
    "drain-billing": {
        "task": "billing_drain.drain",
        "schedule": float(DRAIN_INTERVAL_SECONDS),
        "options": {"expires": float(DRAIN_INTERVAL_SECONDS)},
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")

METERING_LOG_LEVEL = env_choice("METERING_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "metering": {"level": METERING_LOG_LEVEL},
        "billing_drain": {"level": METERING_LOG_LEVEL},
    },
}
