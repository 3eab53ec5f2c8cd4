"""The one exception type convbn raises for bad shapes, specs and files."""

from __future__ import annotations

__all__ = ["ConvBNError"]


class ConvBNError(ValueError):
    """Raised when a shape, a geometry spec, a convention or a checkpoint is invalid.

    Messages say what must hold and what was received, e.g.
    ``"x has 2 channels but the kernel expects 3 (data_format='NHWC'). Received: x.shape=(2, 8, 8, 2)"``.
    It subclasses ``ValueError`` so code that already catches ``ValueError`` keeps working.
    """
