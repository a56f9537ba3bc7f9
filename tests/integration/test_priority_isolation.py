"""Priority isolation on a CNIC, in both directions (docker 1P1D fabric).

A KV flow (DSCP CS1) must fill the link alone, shrink to its 1% guarantee while a
model-execution flow (DSCP EF) shares the CNIC, and refill the link within a second of EF
stopping; EF must keep at least 95% of what it gets alone.
"""

from __future__ import annotations

import pytest

from testbed.isolation import measure_isolation


@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_ef_preempts_cs1_on_a_cnic(docker_1p1d, direction):
    r = measure_isolation(docker_1p1d, direction)
    link = r.link_rate
    assert r.cs1_alone >= 0.90 * link, f"CS1 alone got {r.cs1_alone / 1e6:.1f} Mbit/s"
    assert r.ef_shared >= 0.95 * r.ef_alone, \
        f"EF kept {r.ef_shared / r.ef_alone:.1%} of its {r.ef_alone / 1e6:.1f} Mbit/s"
    assert r.cs1_under_ef <= 0.03 * link, f"CS1 under EF got {r.cs1_under_ef / 1e6:.2f} Mbit/s"
    assert r.recovery_seconds is not None, "CS1 never recovered after EF stopped"
    assert r.recovery_seconds <= 1.0, f"CS1 back to 90% only after {r.recovery_seconds:.2f} s"
