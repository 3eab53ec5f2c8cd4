"""The conformance suite: every backend against the float64 NumPy reference and against each other.

One declaration serves both the ``convbn conformance`` command and the test suite:

- :mod:`convbn.conformance.cases`: the matrix (geometry, parameters, extreme statistics, modes,
  layouts, dtypes) and the tasks built from it;
- :mod:`convbn.conformance.tolerances`: every tolerance, with the measurement it came from;
- :mod:`convbn.conformance.reference`: the float64 oracle and the error measures;
- :mod:`convbn.conformance.runner`: runs tasks on backends and devices, and pairs of backends;
- :mod:`convbn.conformance.report`: the summary table and JSON.

Example:
    >>> from convbn import conformance
    >>> report = conformance.run(["numpy"], quick=True)
    >>> report.passed
    True
"""

from __future__ import annotations

from convbn.conformance.cases import DTYPES, Case, Task, tasks
from convbn.conformance.runner import Result, run, run_task
from convbn.conformance.tolerances import TOLERANCES, tolerance

__all__ = ["DTYPES", "TOLERANCES", "Case", "Result", "Task", "run", "run_task", "tasks", "tolerance"]
