"""``convbn info``: installed backends, their versions and devices, and a one-call agreement check;
then convbn's and Python's versions, the other packages convbn uses, and TensorFlow's oneDNN
setting (which changes TF's CPU kernels and so its numbers).

Nothing that is not installed is imported: installation is judged with ``importlib.util`` and
versions come from ``importlib.metadata``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

import numpy as np

from convbn import dispatch, testing
from convbn.params import ConvBNParams

_DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "jax": ("jax",),
}


#: Packages convbn's formats and layers use beside the backends, by distribution name.
_PACKAGES = ("keras", "flax", "tf_keras", "tf-slim", "safetensors", "h5py", "msgpack")


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "info",
        help="installed backends, devices, and a quick agreement check",
        description="One line per backend (version or 'not installed', default device, float32 error of one "
                    "conv + BatchNorm against the float64 reference), then convbn's and Python's versions, "
                    "the other packages convbn uses, and TensorFlow's oneDNN setting.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def _version(name: str) -> str | None:
    for dist in _DISTRIBUTIONS[name]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def onednn_setting() -> str:
    """TF_ENABLE_ONEDNN_OPTS as this process has it, or what TensorFlow does when it is unset."""
    value = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if value is not None:
        return f"TF_ENABLE_ONEDNN_OPTS={value}"
    # TensorFlow turns oneDNN on by default only on x86 CPUs with its neural-network instructions
    # (AVX-512 VNNI or BF16, AVX-VNNI, AMX: recent Intel Xeons); /proc/cpuinfo tells which this is.
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return "TF_ENABLE_ONEDNN_OPTS unset (TensorFlow's default: on for x86 CPUs with AVX-512 VNNI/BF16, AVX-VNNI or AMX)"
    on = bool(flags & {"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile"})
    return f"TF_ENABLE_ONEDNN_OPTS unset (TensorFlow's default on this CPU: {'on' if on else 'off'})"


def run(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    params = ConvBNParams(
        kernel=rng.standard_normal((3, 3, 3, 4)).astype(np.float32),
        moving_mean=rng.standard_normal(4).astype(np.float32),
        moving_var=rng.uniform(0.5, 2, 4).astype(np.float32),
        bias=rng.standard_normal(4).astype(np.float32),
        stride=2,
    )
    reference = testing.run("numpy", x.astype(np.float64), params)[0]
    rows = []
    if "torch" in dispatch.available_backends():
        import torch  # noqa: F401  (torch before tensorflow)
    for name in ("numpy", "torch", "tensorflow", "jax"):
        row: dict[str, Any] = {"backend": name, "version": _version(name), "installed": dispatch.is_installed(name)}
        if row["installed"]:
            module = dispatch.load_backend(name)
            device = module.resolve_device(None)
            y = testing.run(name, x, params, device=None if name == "numpy" else device)[0]
            row["device"] = str(device)
            row["max_rel_err_vs_float64"] = float(np.max(np.abs(y - reference)) / np.max(np.abs(reference)))
        rows.append(row)
    from convbn import __version__

    packages = {dist: _package_version(dist) for dist in _PACKAGES}
    if args.json:
        json.dump({"backends": rows, "auto_order": list(dispatch.AUTO_ORDER), "convbn": __version__,
                   "python": platform.python_version(), "packages": packages, "onednn": onednn_setting()},
                  sys.stdout, indent=2)
        print()
        return 0
    print(f"{'backend':<11} {'version':<10} {'device':<28} {'float32 vs float64 (rel)'}")
    for row in rows:
        if not row["installed"]:
            print(f"{row['backend']:<11} {'-':<10} {'not installed':<28} -")
            continue
        print(f"{row['backend']:<11} {row['version'] or '?':<10} {row['device']:<28} {row['max_rel_err_vs_float64']:.2e}")
    print(f"NumPy input picks the first installed of: {', '.join(dispatch.AUTO_ORDER)}")
    print(f"convbn {__version__}, Python {platform.python_version()} ({platform.system()} {platform.machine()})")
    print("other packages: " + ", ".join(f"{d} {v or 'not installed'}" for d, v in packages.items()))
    print(f"TensorFlow oneDNN: {onednn_setting()}")
    return 0
