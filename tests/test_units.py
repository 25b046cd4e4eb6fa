from decimal import Decimal
from fractions import Fraction

import pytest

from metering import units


def usage(cores, memory, seconds, memory_per_core_gib=2):
    size = units.parse_worker_size(cores, memory)
    duration = units.parse_duration_seconds(seconds, max_seconds=31 * 86400)
    return units.connection_usage(size, duration, memory_per_core_gib)


@pytest.mark.parametrize(
    ("cores", "memory", "seconds", "compute_milli"),
    [
        pytest.param("8", "16Gi", 9.2, 80_000, id="cores-dominate-rounded-up"),
        pytest.param("8", "64Gi", 10.0, 320_000, id="memory-dominates"),
        pytest.param("2", "4Gi", 0.3, 2_000, id="under-a-second-bills-one"),
        pytest.param("500m", "3Gi", 61.5, 93_000, id="millicores"),
        pytest.param("4", "10G", 1.0, 4_657, id="decimal-gigabytes"),
        pytest.param("2", "4Gi", 0, 2_000, id="zero-duration-bills-one"),
        pytest.param(2, "4Gi", Decimal("3.000"), 6_000, id="whole-seconds-not-rounded-up"),
        pytest.param("1", "1Gi", "1.000001", 2_000, id="a-microsecond-over-rounds-up"),
    ],
)
def test_compute_seconds_examples(cores, memory, seconds, compute_milli):
    assert usage(cores, memory, seconds).compute_milli == compute_milli


def test_unbilled_values_use_billed_seconds():
    result = usage("500m", "3Gi", 61.5)
    assert result.billed_seconds == 62
    assert result.cpu_milli == 31_000
    assert result.memory_milli == 186_000


@pytest.mark.parametrize(
    ("memory", "gib"),
    [
        pytest.param("1536Mi", Fraction(3, 2), id="mebibytes"),
        pytest.param("17179869184", Fraction(16), id="plain-bytes"),
        pytest.param("16Gi", Fraction(16), id="gibibytes"),
        pytest.param("16G", Fraction(16 * 10**9, 2**30), id="decimal-gigabytes"),
        pytest.param("1Ti", Fraction(1024), id="tebibytes"),
        pytest.param("1e9", Fraction(10**9, 2**30), id="exponent"),
    ],
)
def test_memory_quantities_parse_exactly(memory, gib):
    assert units.parse_memory_gib(memory) == gib


@pytest.mark.parametrize(
    ("cores", "expected"),
    [("2", Fraction(2)), ("0.5", Fraction(1, 2)), ("500m", Fraction(1, 2)), (0.25, Fraction(1, 4)), (3, Fraction(3))],
)
def test_core_quantities_parse_exactly(cores, expected):
    assert units.parse_cores(cores) == expected


@pytest.mark.parametrize("bad", ["16GB", "-1", "0", "", "abc", "1.2.3", "NaN", "inf", "16 Gi", "1m"])
def test_bad_memory_is_rejected_naming_the_value(bad):
    with pytest.raises(units.InvalidUsage) as error:
        units.parse_memory_gib(bad)
    assert repr(bad) in str(error.value)
    assert "16Gi" in str(error.value)


@pytest.mark.parametrize("bad", ["16GB", "-1", "0", "", "abc", "1.2.3", "NaN", "inf", "2Gi", None, True, float("nan")])
def test_bad_cores_are_rejected_naming_the_value(bad):
    with pytest.raises(units.InvalidUsage) as error:
        units.parse_cores(bad)
    assert repr(bad) in str(error.value)


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan"), "abc", True, None])
def test_bad_durations_are_rejected(bad):
    with pytest.raises(units.InvalidUsage) as error:
        units.parse_duration_seconds(bad, max_seconds=100)
    assert "duration" in str(error.value)


def test_duration_above_maximum_is_rejected():
    with pytest.raises(units.InvalidUsage, match="longer than the maximum of 100 seconds"):
        units.parse_duration_seconds(101, max_seconds=100)


@pytest.mark.parametrize(
    ("value", "milli"),
    [
        pytest.param(Fraction(4657, 1000), 4657, id="exact"),
        pytest.param(Fraction(46575, 10000), 4658, id="half-rounds-up"),
        pytest.param(Fraction(46574999, 10**7), 4657, id="just-below-half"),
        pytest.param(Fraction(1, 3), 333, id="third"),
        pytest.param(Fraction(2, 3), 667, id="two-thirds"),
    ],
)
def test_round_to_milli_half_up(value, milli):
    assert units.round_to_milli(value) == milli


@pytest.mark.parametrize(
    ("epoch", "bucket"),
    [(0, 0), (59.999, 0), (60, 60), (119, 60), (1_764_876_578.232, 1_764_876_540)],
)
def test_bucket_start_aligned_to_epoch(epoch, bucket):
    assert units.bucket_start_for(epoch, 60) == bucket


def test_memory_per_core_setting_changes_the_fold():
    assert usage("8", "64Gi", 10, memory_per_core_gib=4).compute_milli == 160_000
