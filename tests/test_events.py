import json
from decimal import Decimal

import pytest

from billing_drain.events import exact_number
from metering.units import milli_to_decimal


@pytest.mark.parametrize(
    "milli",
    [
        pytest.param(0, id="zero"),
        pytest.param(1, id="one_thousandth"),
        pytest.param(4657, id="typical"),
        pytest.param(102_288_001, id="nine_digits"),
        pytest.param(2**53 + 1, id="beyond_float_integers"),
        pytest.param(10**15 - 1, id="largest_fast_path"),
        pytest.param(-(10**15 - 1), id="most_negative_fast_path"),
        pytest.param(10**15, id="first_checked_value"),
        pytest.param(123_456_789_012_345_678, id="eighteen_digits"),
    ],
)
def test_exact_number_text_is_exact_decimal(milli):
    number = exact_number(milli)

    assert Decimal(json.dumps(number).strip('"')) == milli_to_decimal(milli)


def test_exact_number_beyond_float_precision_is_a_string():
    assert exact_number(123_456_789_012_345_678) == "123456789012345.678"
