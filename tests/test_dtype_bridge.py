"""convbn/_dtypes.py: torch <-> NumPy bfloat16 bit-exact, and one refusal wherever ml_dtypes is missing.

The missing-ml_dtypes cases run in a fresh process that hides the package (as
tests/test_backend_selection.py hides frameworks), one per place that needs it; each must raise a
ConvBNError naming where the data is and the fix, never widen to float32 in silence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import convbn
from tests.conftest import need_module
from tests.formats.builders import random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FIX = "pip install ml_dtypes"


def _every_bfloat16() -> np.ndarray:
    """All 65536 bfloat16 bit patterns (NaNs, infinities, subnormals, both zeros) as int16."""
    return np.arange(-(1 << 15), 1 << 15, dtype=np.int32).astype(np.int16)


@pytest.mark.needs("torch", "ml_dtypes")
def test_torch_backend_round_trips_every_bfloat16_bit_exact() -> None:
    import ml_dtypes
    import torch

    from convbn.backends import torch as tb

    bits = _every_bfloat16()
    t = torch.from_numpy(bits.copy()).view(torch.bfloat16)
    a = tb.to_numpy(t)
    assert a.dtype == ml_dtypes.bfloat16
    assert np.array_equal(a.view(np.int16), bits)
    back = tb.asarray(a)
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.view(torch.int16), t.view(torch.int16))
    # to_backend copies: the caller's array must not follow an in-place update of the tensor.
    params = convbn.ConvBNParams(kernel=a[:36].reshape(3, 3, 1, 4), moving_mean=a[:4], moving_var=np.abs(a[4:8]))
    native = tb.to_backend(params)
    native.kernel.add_(1)
    assert np.array_equal(a.view(np.int16), bits)


@pytest.mark.needs("torch", "ml_dtypes")
def test_torch_checkpoint_bfloat16_reads_and_writes_bit_exact(tmp_path: Path) -> None:
    import torch

    bits = _every_bfloat16()[:4 * 3 * 3 * 3 * 3].reshape(3 * 4, 3, 3, 3)[:4]
    state = {
        "0.weight": torch.from_numpy(bits.copy()).view(torch.bfloat16),
        "1.weight": torch.ones(4, dtype=torch.bfloat16), "1.bias": torch.zeros(4, dtype=torch.bfloat16),
        "1.running_mean": torch.zeros(4, dtype=torch.bfloat16),
        "1.running_var": torch.ones(4, dtype=torch.bfloat16),
    }  # fmt: skip
    torch.save(state, tmp_path / "a.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "a.pt")
    (layer,) = ckpt.layers.values()
    assert np.asarray(layer.kernel).dtype.name == "bfloat16"
    assert np.array_equal(np.asarray(layer.kernel).transpose(3, 2, 0, 1).view(np.int16), bits)
    convbn.save_checkpoint(ckpt, tmp_path / "b.pt", "torch")
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    for key, value in state.items():
        assert back[key].dtype == torch.bfloat16 and torch.equal(back[key].view(torch.int16), value.view(torch.int16))


# -- without ml_dtypes --------------------------------------------------------------------------------

_CHILD = textwrap.dedent('''
    import importlib.util, json, sys

    _find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if name.partition(".")[0] == "ml_dtypes" else _find_spec(name, package)

    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "ml_dtypes":
                raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
            return None

    importlib.util.find_spec = find_spec
    sys.meta_path.insert(0, Hide())
    place, file = sys.argv[1], sys.argv[2]

    def run():
        import numpy as np
        import convbn
        if place == "torch backend":
            import torch
            from convbn.backends import torch as tb
            return tb.to_numpy(torch.ones(3, dtype=torch.bfloat16))
        if place == "testing.cast":
            from convbn import testing
            return testing.cast("numpy", np.ones(3, np.float32), "bfloat16")
        return convbn.load_checkpoint(file)

    try:
        result = run()
        out = {"raised": None, "result": repr(result)[:300]}
    except Exception as exc:
        from convbn.errors import ConvBNError
        out = {"raised": type(exc).__name__, "convbn": isinstance(exc, ConvBNError), "message": str(exc)}
    print(json.dumps(out))
''')


def _hidden(place: str, file: Path | str = "") -> dict[str, object]:
    """Run ``place`` in a fresh process without ml_dtypes; what it raised."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-c", _CHILD, place, str(file)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    out: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def _assert_refused(out: dict[str, object], *where: str) -> None:
    assert out["raised"] is not None, f"read without ml_dtypes, and gave {out.get('result')}"
    assert out["convbn"], out
    message = str(out["message"])
    assert "\n" not in message and FIX in message and "bfloat16" in message, message
    for text in where:
        assert text in message, (text, message)


def _float16_to_bfloat16_safetensors(path: Path) -> None:
    """Relabel every F16 tensor of a safetensors file BF16 (same width: the data offsets hold)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    for entry in header.values():
        if isinstance(entry, dict) and entry.get("dtype") == "F16":
            entry["dtype"] = "BF16"
    text = json.dumps(header).encode()
    text = text.ljust(-(-len(text) // 8) * 8)  # the data stays 8-byte aligned
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])


@pytest.mark.needs("torch")
def test_torch_backend_without_ml_dtypes_refuses_bfloat16() -> None:
    _assert_refused(_hidden("torch backend"), "a torch tensor")


def test_testing_cast_without_ml_dtypes_is_not_supported_and_names_the_fix() -> None:
    # testing.cast turns the bridge's refusal into its NotSupported (a skipped conformance case).
    out = _hidden("testing.cast")
    assert out["raised"] == "NotSupported" and FIX in str(out["message"]), out


@pytest.mark.needs("torch")
def test_torch_checkpoint_without_ml_dtypes_refuses_bfloat16(tmp_path: Path) -> None:
    import torch

    torch.save({"0.weight": torch.ones(4, 3, 3, 3, dtype=torch.bfloat16), "1.running_mean": torch.zeros(4),
                "1.running_var": torch.ones(4)}, tmp_path / "bf16.pt")  # fmt: skip
    _assert_refused(_hidden("torch checkpoint", tmp_path / "bf16.pt"), str(tmp_path / "bf16.pt"), "'0.weight'")


def test_safetensors_without_ml_dtypes_refuses_bfloat16(tmp_path: Path) -> None:
    path = tmp_path / "bf16.safetensors"
    convbn.save_checkpoint(random_checkpoint(widths=(3, 4), dtype=np.float16), path, "safetensors")
    _float16_to_bfloat16_safetensors(path)
    _assert_refused(_hidden("safetensors", path), str(path), "tensor '")


@pytest.mark.needs("msgpack")
def test_flax_msgpack_without_ml_dtypes_refuses_bfloat16(tmp_path: Path) -> None:
    msgpack = need_module("msgpack")
    path = tmp_path / "bf16.msgpack"
    convbn.save_checkpoint(random_checkpoint(widths=(3, 4), dtype=np.float16), path, "flax")

    def relabel(code: int, data: bytes) -> object:
        shape, dtype, buffer = msgpack.unpackb(data, raw=True)
        return msgpack.ExtType(code, msgpack.packb((shape, b"bfloat16" if dtype == b"float16" else dtype, buffer)))

    tree = msgpack.unpackb(path.read_bytes(), ext_hook=relabel, raw=False, strict_map_key=False)
    path.write_bytes(msgpack.packb(tree))
    _assert_refused(_hidden("flax", path), str(path))


@pytest.mark.needs("ml_dtypes")
def test_the_keras_dtype_name_is_the_same_for_the_layers_and_the_keras_writer() -> None:
    """``convbn.keras.ConvBN`` (through ``adapters.keras_dtype``) and the ``.keras`` writer's dtype
    policy name a kernel's dtype through one helper: the floats Keras computes in keep their name,
    anything else becomes float32."""
    import ml_dtypes

    from convbn import adapters
    from convbn._dtypes import keras_float_name
    from convbn.formats import keras as keras_format

    kept = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64"}
    widened = {"float8_e4m3fn": "float32", "int8": "float32", "int32": "float32"}
    for name, want in {**kept, **widened}.items():
        dtype = np.dtype(getattr(ml_dtypes, name, None) or name)
        params = convbn.ConvBNParams(kernel=np.ones((1, 1, 2, 3), dtype), moving_mean=np.zeros(3, np.float32),
                                     moving_var=np.ones(3, np.float32))
        assert keras_float_name(dtype) == want, name
        assert adapters.keras_dtype(params) == want, name
        assert keras_format._dtype_policy(params) == want, name
