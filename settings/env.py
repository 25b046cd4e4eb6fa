"""Typed readers for configuration taken from environment variables.

Each reader raises ImproperlyConfigured naming the variable, the bad value and
what would be accepted, so a typo stops the process at start-up instead of
producing wrong bills later.
"""

import os
import re
from decimal import Decimal, InvalidOperation

from django.core.exceptions import ImproperlyConfigured


def env_str(name, default=None):
    value = os.environ.get(name, "")
    return value if value.strip() else default


def env_int(name, default, minimum=None, maximum=None):
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(
            f"{name}={raw!r} is not a whole number; set it to an integer such as {default}"
        ) from None
    _check_range(name, raw, value, minimum, maximum)
    return value


def env_decimal(name, default, minimum_exclusive=None):
    raw = os.environ.get(name, "")
    if not raw.strip():
        return Decimal(default)
    try:
        value = Decimal(raw.strip())
    except InvalidOperation:
        raise ImproperlyConfigured(
            f"{name}={raw!r} is not a decimal number; set it to a value such as {default}"
        ) from None
    if not value.is_finite():
        raise ImproperlyConfigured(f"{name}={raw!r} must be a finite decimal number")
    if minimum_exclusive is not None and value <= minimum_exclusive:
        raise ImproperlyConfigured(f"{name}={raw!r} must be greater than {minimum_exclusive}")
    return value


def env_choice(name, default, choices):
    """Read one of ``choices``, compared without case, and return it as written in ``choices``."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    for choice in choices:
        if raw.strip().lower() == choice.lower():
            return choice
    raise ImproperlyConfigured(f"{name}={raw!r} is invalid; use one of {', '.join(choices)}")


def env_database_url(name, default, **options):
    """Parse a database URL with dj-database-url. The error shows the URL without its password."""
    import dj_database_url

    url = env_str(name, default)
    try:
        return dj_database_url.parse(url, **options)
    except ValueError as error:
        # Up to the last "@" before the path, since a password may itself contain "@".
        redacted = re.sub(r"(//[^/:@]*):[^/]*@", r"\1:***@", url)
        raise ImproperlyConfigured(
            f"{name}={redacted!r} is not a database URL ({error}); set it to a URL such as "
            "postgres://USER:PASSWORD@HOST:5432/NAME"
        ) from None


def env_bool(name, default):
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean; use one of 1, 0, true, false")


def _check_range(name, raw, value, minimum, maximum):
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={raw!r} is too small; the minimum is {minimum}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name}={raw!r} is too large; the maximum is {maximum}")
