"""Value comparisons shared by the test modules."""

from __future__ import annotations

from typing import Any

import numpy as np


def rel_err(actual: Any, expected: Any, floor: float = 1e-3) -> float:
    """``max |actual - expected| / max(max |expected|, floor)``, in float64.

    The shapes must match (a broadcast would compare the wrong elements); an empty ``expected``
    gives 0. ``floor`` keeps an all-but-zero ``expected`` from turning rounding into a large
    relative error: below it, the error is absolute.
    """
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    if e.size == 0:
        return 0.0
    return float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), floor))
