"""The billable unit: compute seconds, computed exactly.

    compute_seconds = max(cores, memory_gib / R) * max(1, ceil(connection_seconds))

Worker sizes arrive as Kubernetes quantities and are parsed into Fractions, so
no binary float takes part in billing arithmetic. Each connection's values are
rounded once, half up, to thousandths and kept as integers ("milli" values);
every later sum is an exact integer sum.
"""

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from fractions import Fraction

GIB = 2**30

END_REASONS = ("client_disconnect", "idle_reap", "user_error", "fatal_error", "shutdown", "other")

_DECIMAL_NUMBER = r"(?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
_QUANTITY = re.compile(_DECIMAL_NUMBER + r"(?P<suffix>[A-Za-z]*)")

_CORE_SUFFIXES = {"": Fraction(1), "m": Fraction(1, 1000)}
_MEMORY_SUFFIXES = {
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}


class InvalidUsage(ValueError):
    """A connection fact that cannot be billed; the message names the bad value."""


@dataclass(frozen=True, slots=True)
class WorkerSize:
    cores: Fraction
    memory_gib: Fraction


@dataclass(frozen=True, slots=True)
class ConnectionUsage:
    """One connection's billable values, in integer thousandths."""

    compute_milli: int
    cpu_milli: int
    memory_milli: int
    billed_seconds: int


def parse_cores(value):
    """Parse a CPU quantity such as ``2``, ``0.5`` or ``500m`` into cores."""
    return _parse_quantity(value, _CORE_SUFFIXES, "cores", "a positive number of cores such as 2, 0.5 or 500m")


def parse_memory_gib(value):
    """Parse a memory quantity such as ``16Gi``, ``1536Mi``, ``16G`` or a byte count into GiB."""
    size_bytes = _parse_quantity(
        value,
        _MEMORY_SUFFIXES,
        "memory",
        "a positive byte quantity such as 16Gi, 1536Mi, 16G or 17179869184",
    )
    return size_bytes / GIB


def _parse_quantity(value, suffixes, what, accepted):
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal, Fraction)):
        raise InvalidUsage(f"invalid {what} {value!r} of type {type(value).__name__}; expected {accepted}")
    if isinstance(value, Fraction):
        number = value
    elif isinstance(value, (int, Decimal)):
        number = _finite_fraction(value, value, what, accepted)
    elif isinstance(value, float):
        # repr() gives the shortest decimal that reads back as this float, which
        # is the number the caller wrote (0.5, 2.0), not its binary expansion.
        number = _finite_fraction(Decimal(repr(value)), value, what, accepted)
    else:
        match = _QUANTITY.fullmatch(value.strip())
        if match is None or match["suffix"] not in suffixes:
            raise InvalidUsage(f"invalid {what} {value!r}; expected {accepted}")
        number = Fraction(Decimal(match["number"])) * suffixes[match["suffix"]]
    if number <= 0:
        raise InvalidUsage(f"invalid {what} {value!r}: it must be greater than zero; expected {accepted}")
    return number


def _finite_fraction(number, original, what, accepted):
    if isinstance(number, Decimal) and not number.is_finite():
        raise InvalidUsage(f"invalid {what} {original!r}; expected {accepted}")
    return Fraction(number)


def parse_worker_size(cores, memory):
    return WorkerSize(parse_cores(cores), parse_memory_gib(memory))


def parse_duration_seconds(value, max_seconds):
    """Parse a connection's duration (number of seconds or timedelta) into exact seconds."""
    if isinstance(value, timedelta):
        seconds = Fraction(value.days * 86400 + value.seconds) + Fraction(value.microseconds, 10**6)
    elif isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
        raise InvalidUsage(
            f"invalid duration {value!r} of type {type(value).__name__}; expected seconds as a number or a timedelta"
        )
    else:
        try:
            decimal_value = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
        except InvalidOperation:
            raise InvalidUsage(f"invalid duration {value!r}; expected seconds as a number such as 9.2") from None
        if not decimal_value.is_finite():
            raise InvalidUsage(f"invalid duration {value!r}; expected a finite number of seconds")
        seconds = Fraction(decimal_value)
    if seconds < 0:
        raise InvalidUsage(f"invalid duration {value!r}: a connection cannot last a negative time")
    if seconds > max_seconds:
        raise InvalidUsage(
            f"invalid duration {value!r}: longer than the maximum of {max_seconds} seconds "
            "(METERING_MAX_CONNECTION_SECONDS); check the connection's start time"
        )
    return seconds


def billed_seconds(duration_seconds):
    """Round a duration up to whole seconds; any connection bills at least one second."""
    return max(1, math.ceil(duration_seconds))


def round_to_milli(value):
    """Round a non-negative Fraction to integer thousandths, half up."""
    scaled = value * 1000
    return (2 * scaled.numerator + scaled.denominator) // (2 * scaled.denominator)


def connection_usage(size, duration_seconds, memory_per_core_gib):
    """Compute one connection's usage from its worker size and exact duration."""
    return usage_for_seconds(usage_rates(size, memory_per_core_gib), billed_seconds(duration_seconds))


@dataclass(frozen=True, slots=True)
class UsageRates:
    """A worker size's usage per second, each as an exact (numerator, denominator) pair of integers."""

    compute: tuple
    cpu: tuple
    memory: tuple


def usage_rates(size, memory_per_core_gib):
    """Return a worker size's per-second rates, for ``usage_for_seconds``."""
    compute = max(size.cores, size.memory_gib / Fraction(memory_per_core_gib))
    return UsageRates(
        compute=(compute.numerator, compute.denominator),
        cpu=(size.cores.numerator, size.cores.denominator),
        memory=(size.memory_gib.numerator, size.memory_gib.denominator),
    )


def usage_for_seconds(rates, seconds):
    """Compute the usage of ``seconds`` billed whole seconds with integer arithmetic only.

    Each value is rate * seconds rounded half up to thousandths, as
    ``round_to_milli`` does, without building a Fraction per connection:
    Fraction arithmetic was most of the in-process client's cost per connection.
    """
    return ConnectionUsage(
        compute_milli=_rate_to_milli(rates.compute, seconds),
        cpu_milli=_rate_to_milli(rates.cpu, seconds),
        memory_milli=_rate_to_milli(rates.memory, seconds),
        billed_seconds=seconds,
    )


def _rate_to_milli(rate, seconds):
    # floor(n * s * 1000 / d + 1/2), the half-up rounding of round_to_milli.
    numerator, denominator = rate
    return (2000 * numerator * seconds + denominator) // (2 * denominator)


def milli_to_decimal(milli):
    """Return integer thousandths as an exact Decimal with three places."""
    return Decimal(milli).scaleb(-3)


def bucket_start_for(ended_at_epoch, bucket_seconds):
    """Return the start (epoch seconds) of the bucket a connection ending at that time belongs to."""
    return (int(ended_at_epoch) // bucket_seconds) * bucket_seconds


def aware_epoch_seconds(value, what):
    """Return an aware datetime as epoch seconds; naive datetimes are rejected."""
    if not isinstance(value, datetime):
        raise InvalidUsage(f"invalid {what} {value!r}; expected a timezone-aware datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidUsage(
            f"invalid {what} {value.isoformat()}: it has no time zone; pass an aware datetime such as "
            "datetime.now(timezone.utc)"
        )
    return value.timestamp()


def normalise_end_reason(value):
    """Return the end reason, or None when it is not one of END_REASONS."""
    return value if value in END_REASONS else None
