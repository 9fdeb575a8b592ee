"""Fault injection for tests of the guards: ``TESSERA_FAILPOINT=name@N`` or ``name@A-B`` selects a point.

Real processes are run with the variable set; nothing here does anything when it is unset.
"""

from __future__ import annotations

import os


def failpoint_hit(name: str, n: int) -> bool:
    """True when the test asked for failpoint ``name`` at ``n`` (a step or batch number, or a range)."""
    want = os.environ.get("TESSERA_FAILPOINT", "")
    if want == name:
        return True
    point, _, where = want.partition("@")
    if point != name or not where:
        return False
    first, _, last = where.partition("-")
    return int(first) <= n <= int(last or first)
