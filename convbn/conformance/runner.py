"""Runs the declared matrix on backends and devices and turns every comparison into a `Result`.

:func:`run_task` runs one :class:`~convbn.conformance.cases.Task` on one backend and device (the
test suite calls it once per parametrized test); :func:`run` runs the whole matrix on every
installed backend and device, adds the pairwise comparisons, and returns a
:class:`~convbn.conformance.report.Report`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from convbn import dispatch, testing
from convbn.conformance import reference
from convbn.conformance.cases import (
    EXTREME,
    TRACED_CASE,
    Case,
    Task,
    param_dtype,
    round_to,
    tasks,
)
from convbn.conformance.report import Report, environment
from convbn.conformance.results import ORDER, Result
from convbn.conformance.tolerances import agree_tolerance, tolerance
from convbn.errors import ConvBNError
from convbn.params import ConvBNParams, with_arrays

__all__ = [
    "ORDER",
    "Oracle",
    "Result",
    "gpu_device",
    "gpu_precision",
    "pairwise",
    "run",
    "run_task",
    "select",
]

_EXTREME_NAMES = frozenset(c.name for c in EXTREME)

def _check(
    backend: str, device: str, group: str, dtype: str, case: str, quantity: str,
    error: float, tol: float, detail: str = "",
) -> Result:
    ok = bool(np.isfinite(error)) and error <= tol
    return Result(backend, device, group, dtype, case, "pass" if ok else "fail", float(error), tol,
                  quantity, detail)


# -- the oracle ------------------------------------------------------------------------------------

def _mode(mode: str) -> tuple[bool, str]:
    """``(training, var_update)`` for a mode name."""
    return mode != "eval", ("biased" if mode == "train_biased" else "unbiased")


def _inputs(case: Case, dtype: str, mode: str, seed: int = 0) -> tuple[np.ndarray, ConvBNParams]:
    """The case's ``x`` rounded to ``dtype`` and its params in the params dtype (float32 for low
    precision, as mixed precision keeps them)."""
    _, var_update = _mode(mode)
    x64, params = case.params(seed=seed, var_update=var_update)
    pd = param_dtype(dtype)
    return round_to(x64, dtype), with_arrays(
        params, **{k: np.asarray(v, pd) for k, v in params.arrays().items()}
    )


def _cotangent(case: Case, dtype: str, y_shape: tuple[int, ...]) -> np.ndarray:
    return round_to(np.random.default_rng(1).standard_normal(y_shape), dtype)


class Oracle:
    """Float64 reference results, computed once per (case, dtype, mode) and shared by backends."""

    def __init__(self) -> None:
        self._forward: dict[tuple[Any, ...], reference.Forward] = {}
        self._grads: dict[tuple[Any, ...], tuple[np.ndarray, dict[str, np.ndarray], float]] = {}

    def forward(self, case: Case, dtype: str, mode: str) -> reference.Forward:
        key = (case, dtype, mode)
        if key not in self._forward:
            x, params = _inputs(case, dtype, mode)
            self._forward[key] = reference.forward(x, params, _mode(mode)[0])
        return self._forward[key]

    def gradients(self, case: Case, dtype: str, mode: str) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
        """``(dy, grads, bias_scale)`` for the case: dy is NHWC, rounded to ``dtype``."""
        key = (case, dtype, mode)
        if key not in self._grads:
            x, params = _inputs(case, dtype, mode)
            training = _mode(mode)[0]
            dy = _cotangent(case, dtype, self.forward(case, dtype, "eval").y.shape)
            grads = reference.gradients(x, params, dy, training)
            scale = reference.bias_grad_scale(x, params, dy) if training else 0.0
            self._grads[key] = (dy, grads, scale)
        return self._grads[key]


# -- layouts ---------------------------------------------------------------------------------------

def _to_layout(a: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if layout == "NCHW" else a


def _from_layout(a: np.ndarray, layout: str) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if layout == "NCHW" else a


# -- one task ----------------------------------------------------------------------------------------

#: Outputs kept for the pairwise comparison: key -> (group, kind, value, reference arrays).
Outputs = dict[tuple[Any, ...], tuple[str, str, Any, tuple[Any, ...]]]


def run_task(
    backend: str,
    device: str,
    task: Task,
    oracle: Oracle | None = None,
    outputs: Outputs | None = None,
) -> list[Result]:
    """Run ``task`` on ``backend`` on ``device`` (``"cpu"`` or ``"gpu"``) and check every result.

    Args:
        backend: ``"numpy"``, ``"torch"``, ``"tensorflow"`` or ``"jax"``.
        device: ``"cpu"`` or ``"gpu"`` (``"gpu"`` tasks target the GPU whatever this says).
        task: a :class:`~convbn.conformance.cases.Task` from :func:`~convbn.conformance.cases.tasks`.
        oracle: float64 results to reuse across tasks (a fresh one when None).
        outputs: when given, collects what the backend produced, for :func:`pairwise`.

    Returns:
        One :class:`Result` per comparison; a check the backend cannot run here (e.g. float64 on
        JAX without x64) is a ``"skip"`` result, an exception a ``"fail"`` naming it.

    Example:
        >>> from convbn.conformance import cases, run_task
        >>> task = cases.Task("forward", cases.EDGE_CASE, "float32", ("eval",), ("NHWC",))
        >>> [(r.group, r.status) for r in run_task("numpy", "cpu", task)]
        [('eval', 'pass')]
    """
    oracle = oracle or Oracle()
    if task.kind == "forward":
        return _forward(backend, device, task, oracle, outputs)
    if task.kind == "grad":
        return _gradient(backend, device, task, oracle, outputs)
    if task.kind == "edge":
        return _edge(backend, device, task, oracle)
    if task.kind == "gpu":
        return _gpu(backend, task, oracle)
    raise ValueError(f"task.kind must be forward, grad, edge or gpu. Received: kind={task.kind!r}")


def _label(case: Case, mode: str, layout: str) -> str:
    return f"{case.name}[{mode},{layout}]"


def _groups(case: Case, training: bool) -> tuple[str, ...]:
    if case.name in _EXTREME_NAMES:
        return ("extreme",)
    return ("train", "stats") if training else ("eval",)


def _skip_or_fail(
    backend: str, device: str, groups: Sequence[str], dtype: str, label: str, exc: BaseException
) -> list[Result]:
    if isinstance(exc, testing.NotSupported):
        return [Result(backend, device, g, dtype, label, "skip", detail=str(exc)) for g in groups]
    detail = f"raised {type(exc).__name__}: {exc}"
    crash = f"{type(exc).__name__}: {exc}"
    return [Result(backend, device, g, dtype, label, "fail", detail=detail, exception=crash) for g in groups]


def _is_reference(backend: str, dtype: str) -> bool:
    return backend == "numpy" and dtype == "float64"


def _forward(backend: str, device: str, task: Task, oracle: Oracle, outputs: Outputs | None) -> list[Result]:
    case, dtype = task.case, task.dtype
    results: list[Result] = []
    for mode in task.modes:
        training, _ = _mode(mode)
        groups = _groups(case, training)
        x, params = _inputs(case, dtype, mode)
        ref = oracle.forward(case, dtype, mode)
        for layout in task.layouts:
            label = _label(case, mode, layout)
            if _is_reference(backend, dtype):
                results += [Result(backend, device, g, dtype, label, "ref",
                                   detail="the numpy backend in float64 is the reference") for g in groups]
                continue
            try:
                y, new = testing.run(backend, _to_layout(x, layout), params, training, layout, device, dtype)
            except Exception as exc:
                results += _skip_or_fail(backend, device, groups, dtype, label, exc)
                continue
            y = _from_layout(y, layout)
            floor = ref.floor
            err, where = reference.output_error(y, ref.y, ref.y, -1, floor)
            results.append(_check(backend, device, groups[0], dtype, label, "y", err,
                                  tolerance(groups[0], dtype), where))
            if outputs is not None:
                outputs[(task.id, mode, layout, "y")] = (groups[0], "y", y, (ref.y, floor))
            if not training:
                continue
            assert new is not None and ref.moving_mean is not None and ref.moving_var is not None
            stats_group = groups[-1]
            m_err, m_where = reference.mean_error(new.moving_mean, ref.moving_mean, ref.moving_mean, ref.moving_var)
            v_err, v_where = reference.var_error(new.moving_var, ref.moving_var, ref.moving_var)
            if m_err >= v_err:
                worst = ("moving_mean", m_err, m_where)
            else:
                worst = ("moving_var", v_err, v_where)
            results.append(_check(backend, device, stats_group, dtype, label, worst[0], worst[1],
                                  tolerance(stats_group, dtype), worst[2]))
            if outputs is not None:
                outputs[(task.id, mode, layout, "moving_mean")] = (
                    stats_group, "mean", new.moving_mean, (ref.moving_mean, ref.moving_var))
                outputs[(task.id, mode, layout, "moving_var")] = (
                    stats_group, "var", new.moving_var, (ref.moving_var,))
    return results


def _gradient(backend: str, device: str, task: Task, oracle: Oracle, outputs: Outputs | None) -> list[Result]:
    case, dtype = task.case, task.dtype
    results: list[Result] = []
    for mode in task.modes:
        training, _ = _mode(mode)
        x, params = _inputs(case, dtype, mode)
        dy, ref, bias_scale = oracle.gradients(case, dtype, mode)
        for layout in task.layouts:
            label = _label(case, mode, layout)
            if _is_reference(backend, dtype):
                results.append(Result(backend, device, "grad", dtype, label, "ref",
                                      detail="the numpy backend's float64 backward pass is the oracle"))
                continue
            try:
                got = testing.gradients(backend, _to_layout(x, layout), params, _to_layout(dy, layout),
                                        training, layout, device, dtype)
            except Exception as exc:
                results += _skip_or_fail(backend, device, ("grad",), dtype, label, exc)
                continue
            if set(got) != set(ref):
                results.append(Result(backend, device, "grad", dtype, label, "fail",
                                      detail=f"gradients for {sorted(got)}, expected {sorted(ref)}"))
                continue
            got["x"] = _from_layout(got["x"], layout)
            worst = ("", -1.0)
            for name in ref:
                scale = bias_scale if (training and name == "bias") else None
                err = reference.grad_error(got[name], ref[name], ref[name], scale)
                if err > worst[1]:
                    worst = (name, err)
                if outputs is not None:
                    outputs[(task.id, mode, layout, f"d{name}")] = ("grad", "grad", got[name], (ref[name], scale))
            results.append(_check(backend, device, "grad", dtype, label, f"d{worst[0]}", worst[1],
                                  tolerance("grad", dtype)))
    return results


# -- edge cases --------------------------------------------------------------------------------------

def _native(backend: str, x: np.ndarray, device: str, dtype: str | None) -> Any:
    module = dispatch.load_backend(backend)
    dev = None if backend == "numpy" else module.resolve_device(device)
    return testing.cast(backend, module.asarray(x, dev), dtype)


def _edge(backend: str, device: str, task: Task, oracle: Oracle) -> list[Result]:
    case, dtype = task.case, task.dtype
    results: list[Result] = []
    checks: list[tuple[str, Callable[[], Result]]] = [
        ("one_value_per_channel", lambda: _one_value(backend, device, case, dtype)),
        ("zero_size_batch", lambda: _zero_size(backend, device, case, dtype)),
        ("non_contiguous_numpy", lambda: _non_contiguous_numpy(backend, device, case, dtype, oracle)),
    ]
    if backend in ("tensorflow", "jax"):
        checks.append(("traced", lambda: _traced(backend, device, dtype, oracle)))
    if backend == "torch":
        checks += [
            ("non_contiguous_strided", lambda: _non_contiguous_torch(device, case, dtype, oracle, "strided")),
            ("non_contiguous_permuted", lambda: _non_contiguous_torch(device, case, dtype, oracle, "permuted")),
        ]
    for name, check in checks:
        try:
            results.append(check())
        except Exception as exc:
            results += _skip_or_fail(backend, device, ("edge",), dtype, name, exc)
    return results


def _one_value(backend: str, device: str, case: Case, dtype: str) -> Result:
    """Training on one value per channel must raise ConvBNError; eval on it must be right."""
    label = "one_value_per_channel"
    x_full, params = _inputs(case, dtype, "train_unbiased")
    x = np.ascontiguousarray(x_full[:1, :1, :1, :])  # SAME, stride 2: a 1x1 output
    with testing.on_device(backend, device):
        p = dispatch.load_backend(backend).to_backend(params, None if backend == "numpy" else device)
        xb = _native(backend, x, device, dtype)
        try:
            out = _call(xb, p, True)
        except ConvBNError as exc:
            if "more than one value per channel" not in str(exc):
                return Result(backend, device, "edge", dtype, label, "fail",
                              detail=f"ConvBNError without the reason: {exc}")
        else:
            y = testing.as_numpy(backend, out[0])
            return Result(backend, device, "edge", dtype, label, "fail",
                          detail=f"training returned instead of raising ConvBNError "
                                 f"(NaN in y: {bool(np.isnan(y).any())})")
        y = testing.as_numpy(backend, _call(xb, p, False))
    ref = reference.forward(x, params, False)
    err, where = reference.output_error(y, ref.y, ref.y, -1)
    return _check(backend, device, "edge", dtype, label, "y (eval; training raised ConvBNError)", err,
                  tolerance("eval", dtype), where)


@contextlib.contextmanager
def _quiet_tf_logger(tf: Any) -> Iterator[None]:
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


def _output(out: Any, training: bool) -> Any:
    """``y`` alone (a traced function can only return arrays)."""
    return out[0] if training else out


def _call(x: Any, params: ConvBNParams, training: bool, data_format: str = "NHWC") -> Any:
    from convbn.api import conv_bn

    # NumPy input runs on the numpy backend here, not on the auto-selected framework.
    backend = "numpy" if isinstance(x, np.ndarray) else None
    return conv_bn(x, params, training, data_format=data_format, backend=backend)


def _zero_size(backend: str, device: str, case: Case, dtype: str) -> Result:
    """A zero-size batch: empty y of the right shape, moving statistics unchanged (bit for bit)."""
    label = "zero_size_batch"
    x, params = _inputs(case, dtype, "train_unbiased")
    empty = np.ascontiguousarray(x[:0])
    expected_shape = (0, *reference.forward(x[:1], params, False).y.shape[1:])
    with testing.on_device(backend, device):
        p = dispatch.load_backend(backend).to_backend(params, None if backend == "numpy" else device)
        xb = _native(backend, empty, device, dtype)
        y_eval = testing.as_numpy(backend, _call(xb, p, False))
        y_train, new = _call(xb, p, True)
        y_train = testing.as_numpy(backend, y_train)
        new_mean = testing.as_numpy(backend, new.moving_mean)
        new_var = testing.as_numpy(backend, new.moving_var)
    if y_eval.shape != expected_shape or y_train.shape != expected_shape:
        return Result(backend, device, "edge", dtype, label, "fail",
                      detail=f"y shapes {y_eval.shape} (eval), {y_train.shape} (training); "
                             f"expected {expected_shape}")
    err = max(
        float(np.max(np.abs(new_mean.astype(np.float64) - params.moving_mean))),
        float(np.max(np.abs(new_var.astype(np.float64) - params.moving_var))),
    )
    return _check(backend, device, "edge", dtype, label, "moving stats change", err, 0.0)


def _non_contiguous_numpy(backend: str, device: str, case: Case, dtype: str, oracle: Oracle) -> Result:
    """A strided (non-contiguous) NumPy view through ``conv_bn(..., backend=)``."""
    from convbn.api import conv_bn

    label = "non_contiguous_numpy"
    x, params = _inputs(case, dtype, "eval")
    testing.cast(backend, _native(backend, x[:1, :1, :1, :1], device, None), dtype)  # NotSupported?
    base = testing.cast("numpy", np.repeat(x, 2, axis=2), dtype)
    view = base[:, :, ::2]
    assert not view.flags.c_contiguous
    y = testing.as_numpy("numpy", conv_bn(view, params, backend=backend, device=device))
    ref = oracle.forward(case, dtype, "eval")
    err, where = reference.output_error(y, ref.y, ref.y, -1)
    return _check(backend, device, "edge", dtype, label, "y", err, tolerance("eval", dtype), where)


def _non_contiguous_torch(device: str, case: Case, dtype: str, oracle: Oracle, how: str) -> Result:
    """torch's own non-contiguous tensors: a strided slice (NHWC) or an NCHW permuted view."""
    import torch

    label = f"non_contiguous_{how}"
    x, params = _inputs(case, dtype, "train_unbiased")
    dev = dispatch.load_backend("torch").resolve_device(device)
    if how == "strided":
        xt = testing.cast("torch", torch.from_numpy(np.repeat(x, 2, axis=2)).to(dev), dtype)[:, :, ::2]
        layout = "NHWC"
    else:
        xt = testing.cast("torch", torch.from_numpy(x).to(dev), dtype).permute(0, 3, 1, 2)
        layout = "NCHW"
    assert not xt.is_contiguous()
    p = dispatch.load_backend("torch").to_backend(params, dev)
    checks = []
    for training in (False, True):
        out = _call(xt, p, training, layout)
        y = _from_layout(testing.as_numpy("torch", out[0] if training else out), layout)
        ref = oracle.forward(case, dtype, "train_unbiased" if training else "eval")
        err, where = reference.output_error(y, ref.y, ref.y, -1, ref.floor)
        group = "train" if training else "eval"
        checks.append(_check("torch", device, "edge", dtype, label, f"y ({group})", err,
                             tolerance(group, dtype), where))
    return max(checks, key=lambda r: r.ratio)


def _traced(backend: str, device: str, dtype: str, oracle: Oracle) -> Result:
    """The op inside the user's own ``tf.function`` (batch size unknown) or ``jax.jit``, eval and
    training, on a grouped conv."""
    label = "traced"
    case = TRACED_CASE
    checks = []
    for mode in ("eval", "train_unbiased"):
        training, _ = _mode(mode)
        x, params = _inputs(case, dtype, mode)
        with testing.on_device(backend, device):
            p = dispatch.load_backend(backend).to_backend(params, device)
            xb = _native(backend, x, device, dtype)
            if backend == "tensorflow":
                import tensorflow as tf

                spec = tf.TensorSpec([None, *xb.shape[1:]], xb.dtype)
                fn = tf.function(lambda x, p=p, t=training: _output(_call(x, p, t), t),
                                 input_signature=[spec])
                # A new tf.function per check is the point (the user's own); TF's warning about
                # functions traced in a loop would only clutter the progress output.
                with _quiet_tf_logger(tf):
                    y = testing.as_numpy(backend, fn(xb))
            else:
                import jax

                fn = jax.jit(lambda x, p=p, t=training: _output(_call(x, p, t), t))
                y = testing.as_numpy(backend, fn(xb))
        ref = oracle.forward(case, dtype, mode)
        group = "train" if training else "eval"
        err, where = reference.output_error(y, ref.y, ref.y, -1, ref.floor)
        checks.append(_check(backend, device, "edge", dtype, f"{label}[{case.name},{mode}]", "y", err,
                             tolerance(group, dtype), where))
    return max(checks, key=lambda r: r.ratio)


# -- input already on a GPU ----------------------------------------------------------------------------

def gpu_device(backend: str) -> str | None:
    """``"gpu"`` when ``backend``'s framework sees a GPU, else None (never for numpy)."""
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else None
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_logical_devices("GPU") else None
    if backend == "jax":
        import jax

        try:
            return "gpu" if jax.devices("gpu") else None
        except RuntimeError:
            return None
    return None


def _on_gpu(backend: str, a: Any) -> bool:
    if backend == "torch":
        return bool(a.device.type == "cuda")
    if backend == "tensorflow":
        return "GPU" in a.device.upper()
    return all(d.platform == "gpu" for d in a.devices())


def _gpu(backend: str, task: Task, oracle: Oracle) -> list[Result]:
    """Input already on a GPU: runs there, stays there, and matches the reference; NumPy input with
    ``device="gpu"`` comes back as NumPy with the same numbers."""
    if backend == "numpy":
        return []
    case, dtype = task.case, task.dtype
    label = f"{case.name}[gpu input]"
    device = gpu_device(backend)
    if device is None:
        return [Result(backend, "gpu", "gpu", dtype, label, "skip",
                       detail=f"no GPU visible to {backend}")]
    results = []
    for mode in task.modes:
        training, _ = _mode(mode)
        x, params = _inputs(case, dtype, mode)
        ref = oracle.forward(case, dtype, mode)
        group = "train" if training else "eval"
        try:
            with testing.on_device(backend, device):
                p = dispatch.load_backend(backend).to_backend(params, device)
                xb = _native(backend, x, device, dtype)
                out = _call(xb, p, training)
                y_native = out[0] if training else out
                if not _on_gpu(backend, y_native):
                    results.append(Result(backend, "gpu", "gpu", dtype, f"{label}[{mode}]", "fail",
                                          detail="the output left the GPU"))
                    continue
                y = testing.as_numpy(backend, y_native)
        except Exception as exc:
            results += _skip_or_fail(backend, "gpu", ("gpu",), dtype, f"{label}[{mode}]", exc)
            continue
        err, where = reference.output_error(y, ref.y, ref.y, -1, ref.floor)
        results.append(_check(backend, "gpu", "gpu", dtype, f"{label}[{mode}]", "y", err,
                              tolerance(group, dtype), where))
    return results


# -- pairwise ------------------------------------------------------------------------------------------

def _compare(kind: str, a: Any, b: Any, refs: tuple[Any, ...]) -> float:
    if kind == "y":
        return reference.output_error(a, b, refs[0], -1, refs[1])[0]
    if kind == "mean":
        return reference.mean_error(a, b, refs[0], refs[1])[0]
    if kind == "var":
        return reference.var_error(a, b, refs[0])[0]
    return reference.grad_error(a, b, refs[0], refs[1])


def pairwise(collected: dict[tuple[str, str], Outputs]) -> list[Result]:
    """Every pair of backends on the same device, on every output both produced."""
    results = []
    for (a, dev_a), (b, dev_b) in itertools.combinations(sorted(collected, key=_order_key), 2):
        if dev_a != dev_b:
            continue
        out_a, out_b = collected[(a, dev_a)], collected[(b, dev_b)]
        for key in out_a.keys() & out_b.keys():
            task_id, mode, layout, quantity = key
            group, kind, value_a, refs = out_a[key]
            value_b = out_b[key][2]
            dtype = task_id.rsplit("-", 1)[1]
            case = f"{task_id.split('-', 1)[1].rsplit('-', 1)[0]}[{mode},{layout}]"
            err = _compare(kind, value_a, value_b, refs)
            results.append(_check(f"{a}~{b}", dev_a, "agree", dtype, case, f"{quantity} ({group})", err,
                                  agree_tolerance(group, dtype)))
    return results


def _order_key(item: tuple[str, str]) -> tuple[int, str]:
    return (ORDER.index(item[0]) if item[0] in ORDER else len(ORDER), item[1])


# -- GPU precision ------------------------------------------------------------------------------------

@contextlib.contextmanager
def gpu_precision(allow_tf32: bool, backends: Sequence[str]) -> Iterator[dict[str, str]]:
    """TF32 off (or on, with ``allow_tf32``) for the frameworks in ``backends``; restores afterwards.

    torch: the ``fp32_precision`` flags of cuDNN convolutions and CUDA matmuls where this torch has
    them (``"ieee"``/``"tf32"``; mixing them with the legacy ``allow_tf32`` flags is an error in
    recent torch), else ``torch.backends.cudnn.allow_tf32`` and
    ``torch.backends.cuda.matmul.allow_tf32``. TensorFlow:
    ``tf.config.experimental.enable_tensor_float_32_execution``. JAX:
    ``jax_default_matmul_precision`` (``"highest"``, or ``"tensorfloat32"``), which convolutions
    follow too. Yields the settings in force, for the report.
    """
    restore: list[Callable[[], None]] = []
    state: dict[str, str] = {}
    try:
        if "torch" in backends:
            import torch

            conv = getattr(torch.backends.cudnn, "conv", None)
            if conv is not None and hasattr(conv, "fp32_precision"):
                matmul = torch.backends.cuda.matmul
                old = (conv.fp32_precision, matmul.fp32_precision)
                value = "tf32" if allow_tf32 else "ieee"
                conv.fp32_precision = value
                matmul.fp32_precision = value

                def _restore_torch(old: tuple[str, str] = old) -> None:
                    conv.fp32_precision, matmul.fp32_precision = old

                restore.append(_restore_torch)
                state["torch"] = f"cudnn.conv.fp32_precision={value!r}, cuda.matmul.fp32_precision={value!r}"
            else:
                old_flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
                torch.backends.cudnn.allow_tf32 = allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = allow_tf32

                def _restore_torch_legacy(old: tuple[bool, bool] = old_flags) -> None:
                    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old

                restore.append(_restore_torch_legacy)
                state["torch"] = f"cudnn.allow_tf32={allow_tf32}, cuda.matmul.allow_tf32={allow_tf32}"
        if "tensorflow" in backends:
            import tensorflow as tf

            old_tf = tf.config.experimental.tensor_float_32_execution_enabled()
            tf.config.experimental.enable_tensor_float_32_execution(allow_tf32)
            restore.append(lambda: tf.config.experimental.enable_tensor_float_32_execution(old_tf))
            state["tensorflow"] = f"tensor_float_32_execution={allow_tf32}"
        if "jax" in backends:
            import jax

            old_jax = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
            value = "tensorfloat32" if allow_tf32 else "highest"
            jax.config.update("jax_default_matmul_precision", value)
            restore.append(lambda: jax.config.update("jax_default_matmul_precision", old_jax))
            state["jax"] = f"jax_default_matmul_precision={value!r}"
        yield state
    finally:
        for undo in reversed(restore):
            undo()


# -- the whole matrix ------------------------------------------------------------------------------------

def select(backends: Sequence[str] | None) -> list[str]:
    """The backends to run, in report order: ``backends`` (names or aliases) or every installed one.

    Raises:
        ConvBNError: an unknown name.
        ImportError: a named backend whose framework is not installed (naming the extra).
    """
    if backends is None:
        return [n for n in ORDER if dispatch.is_installed(n)]
    names = [dispatch.normalize_name(n) for n in backends]
    missing = [n for n in names if not dispatch.is_installed(n)]
    if missing:
        raise ImportError(
            f"requested backends {missing} are not installed: pip install 'convbn[{','.join(missing)}]'"
        )
    return [n for n in ORDER if n in names]


def run(
    backends: Sequence[str] | None = None,
    *,
    quick: bool = False,
    gpu: bool = True,
    allow_tf32: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> Any:
    """Run the conformance matrix.

    Args:
        backends: backend names; None for every installed one.
        quick: the representative ``--quick`` subset instead of the full matrix.
        gpu: also run on each framework's GPU where it sees one.
        allow_tf32: let GPU float32 convolutions and matmuls use TF32 (off by default, to
            measure its effect); the previous settings are restored afterwards.
        progress: called as ``progress(done, total, label)`` before each task.

    Returns:
        A :class:`convbn.conformance.report.Report`: ``passed``, ``failures``, ``summaries()``,
        ``text()`` (the table ``convbn conformance`` prints) and ``as_dict()`` (its ``--json``).

    Raises:
        ConvBNError: an unknown backend name.
        ImportError: a requested backend whose framework is not installed.

    Example:
        >>> from convbn import conformance
        >>> report = conformance.run(["numpy"], quick=True)
        >>> report.passed, report.counts()["fail"]
        (True, 0)
    """
    names = select(backends)
    if "torch" in names and "tensorflow" in names:
        import torch  # noqa: F401  (torch before tensorflow)
    for name in names:
        dispatch.load_backend(name)
    devices = {name: ["cpu"] + (["gpu"] if gpu and gpu_device(name) else []) for name in names}
    todo = tasks(quick)
    work = [
        (name, device, task)
        for name in names
        for device in devices[name]
        for task in todo
        if not (task.kind == "gpu" and device != "cpu")  # the GPU check targets the GPU itself
    ]
    oracle = Oracle()
    collected: dict[tuple[str, str], Outputs] = {}
    results: list[Result] = []
    with gpu_precision(allow_tf32, names) as precision:
        for i, (name, device, task) in enumerate(work):
            if progress is not None:
                progress(i, len(work), f"{name} {device} {task.dtype} {task.kind} {task.case.name}")
            outputs = collected.setdefault((name, device), {})
            results += run_task(name, device, task, oracle, outputs)
        if progress is not None:
            progress(len(work), len(work), "pairwise")
        results += pairwise(collected)
    meta = environment(names, devices, quick=quick, allow_tf32=allow_tf32, precision=precision)
    return Report(results, meta)
