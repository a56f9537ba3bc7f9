"""HTB numbers chosen per rate: what keeps the kernel from warning and keeps rates exact."""

from __future__ import annotations

import pytest

from testbed.qos import GSO_MAX, KERNEL_QUANTUM_MAX, HtbParams, _tos_key


@pytest.mark.parametrize("rate", [10**6, 10**8, 10**9, 2 * 10**9, 10 * 10**9])
def test_quantum_and_burst_fit_every_rate_we_allow(rate):
    htb = HtbParams(rate)
    # Explicit quanta inside the kernel's bounds: no "quantum of class is big/small" warning.
    assert 1000 <= htb.quantum <= KERNEL_QUANTUM_MAX
    # A bucket that holds two GSO segments, and at least 2 ms at the rate.
    assert htb.burst >= 2 * GSO_MAX and htb.burst >= htb.bytes_per_second // 500
    # r2q keeps the implied quantum (rate / r2q) in bounds too.
    assert htb.bytes_per_second // htb.r2q <= KERNEL_QUANTUM_MAX


def test_tos_keys_match_the_dscp_bits_of_the_tos_byte():
    assert _tos_key(46) == "0xb8/0xfc+1"    # EF
    assert _tos_key(8) == "0x20/0xfc+1"     # CS1
