"""The conformance suite's data: one :class:`Result` per comparison, and the backends' report order.

It sits below the runner and the report, which both use it, so that neither imports the other
for its types.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ORDER", "Result"]

#: Backend order in reports: the reference first, then the frameworks.
ORDER = ("numpy", "torch", "tensorflow", "jax")


@dataclasses.dataclass(frozen=True)
class Result:
    """One comparison of one backend (or pair of backends) against the reference (or each other).

    ``status`` is ``"pass"``, ``"fail"``, ``"skip"`` (could not run here: ``detail`` says why) or
    ``"ref"`` (the numpy backend in float64 *is* the reference).
    """

    backend: str
    device: str
    group: str
    dtype: str
    case: str
    status: str
    error: float | None = None
    tolerance: float | None = None
    quantity: str = ""
    detail: str = ""
    exception: str = ""  # "Type: message" when the check crashed instead of producing numbers

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    @property
    def ratio(self) -> float:
        """``error / tolerance`` (0 without an error; inf for a nonzero error at tolerance 0)."""
        if self.error is None or self.tolerance is None:
            return 0.0
        if self.tolerance == 0:
            return 0.0 if self.error == 0 else float("inf")
        return self.error / self.tolerance

    def message(self) -> str:
        """One line naming the backend, device, dtype, group, case and what went wrong."""
        who = f"{self.backend} on {self.device}, {self.dtype} {self.group} check, case {self.case}"
        if self.status == "skip":
            return f"{who}: skipped: {self.detail}"
        if self.error is None:
            return f"{who}: {self.status}: {self.detail}"
        relation = ">" if self.failed else "<="
        where = f" ({self.detail})" if self.detail else ""
        return (
            f"{who}: {self.quantity} error {self.error:.3g} {relation} tolerance "
            f"{self.tolerance:.3g}{where}"
        )
