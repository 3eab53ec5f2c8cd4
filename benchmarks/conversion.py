"""Checkpoint-conversion cost on a ResNet-50-sized checkpoint: wall time and peak memory.

The source is a torch ``state_dict`` with torchvision's ResNet-50 names and shapes (53 conv +
BatchNorm pairs, 23.5 M conv parameters, no classifier), synthetic float32 weights. Each
conversion runs in a fresh process that first imports the frameworks the two formats need (timed
as ``import``), then runs ``convbn.load_checkpoint`` + ``convbn.save_checkpoint`` (timed as
``convert``). Memory is the peak resident set of that process (``ru_maxrss``), reported whole and
as the growth over the resident set right after the imports, which is what the conversion itself
costs (a framework import alone can take more than the checkpoint's size).

A conversion whose API or format module is not available is skipped with the reason.
``python -m benchmarks.conversion`` runs this part alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The conversions measured: (source format, target format).
PAIRS = (("torch", "safetensors"), ("torch", "slim"), ("slim", "torch"), ("torch", "flax"))
#: Framework modules each format needs; imported (torch first) before the conversion is timed.
_FORMAT_IMPORTS = {
    "torch": ("torch",),
    "safetensors": ("safetensors.numpy",),
    "slim": ("tensorflow",),
    "flax": ("jax", "flax.serialization"),
}
_SUFFIX = {"torch": "pt", "safetensors": "safetensors", "flax": "msgpack"}
#: ResNet-50 stages: (blocks, bottleneck width, output channels).
_STAGES = ((3, 64, 256), (4, 128, 512), (6, 256, 1024), (3, 512, 2048))


def resnet50_convs() -> list[tuple[str, str, tuple[int, int, int, int]]]:
    """``(conv name, BatchNorm name, OIHW shape)`` for every conv of a torchvision ResNet-50."""
    convs = [("conv1", "bn1", (64, 3, 7, 7))]
    in_ch = 64
    for stage, (blocks, width, out_ch) in enumerate(_STAGES, start=1):
        for b in range(blocks):
            prefix = f"layer{stage}.{b}"
            convs += [
                (f"{prefix}.conv1", f"{prefix}.bn1", (width, in_ch, 1, 1)),
                (f"{prefix}.conv2", f"{prefix}.bn2", (width, width, 3, 3)),
                (f"{prefix}.conv3", f"{prefix}.bn3", (out_ch, width, 1, 1)),
            ]
            if b == 0:
                convs.append((f"{prefix}.downsample.0", f"{prefix}.downsample.1", (out_ch, in_ch, 1, 1)))
            in_ch = out_ch
    return convs


def make_source(path: Path) -> dict[str, Any]:
    """Write the synthetic torch checkpoint; returns its description."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    state: dict[str, Any] = {}
    conv_params = 0
    for conv, bn, shape in resnet50_convs():
        fan_in = shape[1] * shape[2] * shape[3]
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        state[f"{conv}.weight"] = torch.from_numpy(w)
        conv_params += w.size
        c = shape[0]
        state[f"{bn}.weight"] = torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(np.float32))
        state[f"{bn}.bias"] = torch.from_numpy(rng.standard_normal(c).astype(np.float32) * 0.1)
        state[f"{bn}.running_mean"] = torch.from_numpy(rng.standard_normal(c).astype(np.float32) * 0.1)
        state[f"{bn}.running_var"] = torch.from_numpy(rng.uniform(0.5, 2.0, c).astype(np.float32))
        state[f"{bn}.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)
    torch.save(state, path)
    return {"pairs": len(resnet50_convs()), "conv_parameters": conv_params, "bytes": path.stat().st_size}


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _convert_worker(src: str, src_format: str, dst: str, dst_format: str) -> dict[str, Any]:
    """Runs in the child process: import, then convert; returns timings and memory."""
    start = time.perf_counter()
    for fmt in sorted({src_format, dst_format}, key=lambda f: f != "torch"):  # torch before tensorflow
        for module in _FORMAT_IMPORTS[fmt]:
            __import__(module)
    import convbn

    import_s = time.perf_counter() - start
    rss_after_import = _rss_mb()
    load = getattr(convbn, "load_checkpoint", None)
    save = getattr(convbn, "save_checkpoint", None)
    if load is None or save is None:
        return {"skipped": "convbn.load_checkpoint/save_checkpoint are not available in this checkout"}
    for fmt in (src_format, dst_format):
        if importlib.util.find_spec(f"convbn.formats.{fmt}") is None:
            return {"skipped": f"the {fmt!r} format module (convbn.formats.{fmt}) is not available"}
    start = time.perf_counter()
    ckpt = load(src, src_format)
    load_s = time.perf_counter() - start
    save(ckpt, dst, dst_format)
    convert_s = time.perf_counter() - start
    return {
        "import_s": import_s,
        "load_s": load_s,
        "convert_s": convert_s,
        "rss_after_import_mb": rss_after_import,
        "peak_rss_mb": _peak_rss_mb(),
        "layers": len(ckpt.layers),
    }


def _run_child(args: list[str]) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.conversion", *args], cwd=root, env=env,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"the conversion process failed: {tail}"}
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def _target_path(folder: Path, fmt: str, tag: str) -> Path:
    if fmt == "slim":
        (folder / f"slim_{tag}").mkdir(exist_ok=True)
        return folder / f"slim_{tag}" / "model.ckpt"
    return folder / f"{tag}.{_SUFFIX[fmt]}"


def run_all() -> dict[str, Any]:
    """Every conversion in :data:`PAIRS`; results and the source's description."""
    if importlib.util.find_spec("torch") is None:
        return {"source": None, "results": [], "skipped": ["torch is not installed: no source checkpoint"]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = folder / "resnet50.pt"
        described = _run_child(["--make-source", str(source)])
        if "skipped" in described:
            return {"source": None, "results": [], "skipped": [described["skipped"]]}
        sources = {"torch": source}
        results = []
        for src_fmt, dst_fmt in PAIRS:
            row: dict[str, Any] = {"from": src_fmt, "to": dst_fmt}
            missing = [m for f in (src_fmt, dst_fmt) for m in _FORMAT_IMPORTS[f]
                       if importlib.util.find_spec(m.split(".")[0]) is None]
            if src_fmt not in sources:
                row["skipped"] = f"no {src_fmt} source (the conversion to {src_fmt} did not run)"
            elif missing:
                row["skipped"] = f"{', '.join(missing)} not installed"
            else:
                dst = _target_path(folder, dst_fmt, f"{src_fmt}_to_{dst_fmt}")
                row.update(_run_child(["--convert", str(sources[src_fmt]), src_fmt, str(dst), dst_fmt]))
                if "skipped" not in row:
                    sources.setdefault(dst_fmt, dst)
            if "skipped" in row:
                print(f"  conversion {src_fmt} -> {dst_fmt}: skipped ({row['skipped']})", file=sys.stderr)
            else:
                print(f"  conversion {src_fmt} -> {dst_fmt}: import {row['import_s']:.2f} s, "
                      f"convert {row['convert_s']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MiB",
                      file=sys.stderr)
            results.append(row)
    return {"source": described, "results": results, "skipped": []}


def markdown(report: dict[str, Any]) -> str:
    source = report.get("source")
    if not source:
        return "Skipped: " + "; ".join(report.get("skipped", []))
    size_mb = source["bytes"] / 2**20
    lines = [
        f"Source: torch state_dict, {source['pairs']} conv+BatchNorm pairs, "
        f"{source['conv_parameters'] / 1e6:.1f} M conv parameters, {size_mb:.1f} MiB on disk.",
        "",
        "| conversion | import | convert (load + save) | peak RSS | RSS growth after import | growth / checkpoint size |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        name = f"{row['from']} -> {row['to']}"
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} | | | | |")
            continue
        growth = row["peak_rss_mb"] - row["rss_after_import_mb"]
        lines.append(
            f"| {name} | {row['import_s']:.2f} s | {row['convert_s']:.2f} s (load {row['load_s']:.2f} s) | "
            f"{row['peak_rss_mb']:.0f} MiB | {growth:.0f} MiB | {growth / size_mb:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--make-source"]:
        print(json.dumps(make_source(Path(args[1]))))
        return 0
    if args[:1] == ["--convert"]:
        src, src_fmt, dst, dst_fmt = args[1:5]
        print(json.dumps(_convert_worker(src, src_fmt, dst, dst_fmt)))
        return 0
    print(markdown(run_all()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
