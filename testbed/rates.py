"""Link rates as users write them ("400Gbit") and as the kernel takes them (bits/s)."""

from __future__ import annotations

import re

UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")
EXPECTED = "a rate like '400Gbit' (a number and one of bit, Kbit, Mbit, Gbit, Tbit)"


def parse_rate(text: object) -> int:
    """Bits per second from '400Gbit', '1.5Tbit', '100Mbit'. Raises ValueError otherwise."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise ValueError(f"expected {EXPECTED}")
    match = _RATE.match(text)
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"expected {EXPECTED}")
    bits = round(float(match.group(1)) * UNITS[match.group(2).lower()])
    if bits < 1:
        raise ValueError(f"expected a positive rate of at least 1bit, {EXPECTED}")
    return bits


def format_rate(bits_per_second: float) -> str:
    """The shortest exact-enough form: 100Mbit, 1.5Gbit, 400Gbit."""
    for unit, factor in (("Tbit", 10**12), ("Gbit", 10**9), ("Mbit", 10**6), ("Kbit", 10**3)):
        if bits_per_second >= factor:
            return f"{bits_per_second / factor:.4g}{unit}"
    return f"{bits_per_second:.4g}bit"
