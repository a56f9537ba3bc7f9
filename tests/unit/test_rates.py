"""testbed.rates: the rates users write ('400Gbit') and the bits/s the kernel is given."""

from __future__ import annotations

import pytest

from testbed.rates import format_rate, parse_rate


@pytest.mark.parametrize("text, bits", [
    ("400Gbit", 400 * 10**9),
    ("1.5Tbit", 1_500 * 10**9),
    ("100mbit", 100 * 10**6),           # units are case-insensitive
    ("100Mbit", 100 * 10**6),
    ("400GBIT", 400 * 10**9),
    ("64Kbit", 64_000),
    ("1bit", 1),
    ("2.5Gbit", 2_500_000_000),
    (" 400 Gbit ", 400 * 10**9),        # surrounding and inner blanks are tolerated
])
def test_parse_rate_accepts(text: str, bits: int) -> None:
    result = parse_rate(text)
    assert result == bits
    assert type(result) is int


@pytest.mark.parametrize("value", [
    "400Gbs",       # unknown unit
    "400",          # no unit
    "Gbit",         # no number
    "",
    "   ",
    "fast",
    "-5Gbit",       # negative
    "0Gbit",        # zero
    "0.0Mbit",
    "1e9bit",       # no exponent notation
    "400 G bit",
    "400Gbit/s",
    400,            # a bare number: which unit?
    400.0,
    True,           # YAML 'yes'/'true': bool is an int in Python, still not a rate
    None,
    ["400Gbit"],
])
def test_parse_rate_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_rate(value)


def test_parse_rate_error_says_what_is_expected() -> None:
    with pytest.raises(ValueError) as info:
        parse_rate("400Gbs")
    message = str(info.value)
    assert "400Gbit" in message          # an example of a good value
    for unit in ("Kbit", "Mbit", "Gbit", "Tbit"):
        assert unit in message


@pytest.mark.parametrize("bits, text", [
    (100 * 10**6, "100Mbit"),
    (1.5 * 10**9, "1.5Gbit"),
    (400 * 10**9, "400Gbit"),
    (10**12, "1Tbit"),
    (1.6 * 10**12, "1.6Tbit"),
    (2_000, "2Kbit"),
    (999, "999bit"),
    (1, "1bit"),
    (400 * 10**9 / 4000, "100Mbit"),      # a 400 Gbit/s NIC at scale 4000
])
def test_format_rate(bits: float, text: str) -> None:
    assert format_rate(bits) == text


@pytest.mark.parametrize("text", ["400Gbit", "1.5Tbit", "100Mbit", "25Kbit", "7bit",
                                  "2.5Gbit", "12.5Mbit"])
def test_format_then_parse_round_trips(text: str) -> None:
    assert format_rate(parse_rate(text)) == text
    assert parse_rate(format_rate(parse_rate(text))) == parse_rate(text)


def test_format_rate_keeps_four_significant_digits() -> None:
    assert format_rate(1_234_567) == "1.235Mbit"
    assert format_rate(123_456_789_000) == "123.5Gbit"


def test_parse_rate_decimal_rates_are_exact() -> None:
    assert parse_rate("1.001Gbit") == 1_001_000_000
    assert parse_rate("1.001Kbit") == 1_001


def test_parse_rate_rejects_rates_below_one_bit() -> None:
    with pytest.raises(ValueError):
        parse_rate("0.5bit")
