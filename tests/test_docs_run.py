"""Every Python block of the README and docs/ either runs in a test exactly as written (read from
the page) or is marked on the page as not run, with the reason: ``<!-- not run: why -->`` on the
line before the fence. This module holds the inventory, and runs the blocks no other test runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests._support.assertions import rel_err
from tests.conftest import need, require_backend

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- not run: (\S.*?) -->\n$")

#: (page, a string only that block contains) -> the test that executes the block as written.
RUN_BY = {
    ("README.md", "y = convbn.conv_bn(x, params)"): "tests/test_docs_run.py::test_readme_example_runs",
    ("docs/dcgan-to-slim.md", "convbn.load_checkpoint("): (
        "tests/formats/test_slim.py::test_the_documented_python_conversions_run_as_written"
    ),
    ("docs/dcgan-to-slim.md", "slim.read("): (
        "tests/formats/test_slim.py::test_the_documented_python_conversions_run_as_written"
    ),
    ("docs/dcgan-to-slim.md", "def discriminator("): "tests/test_docs_run.py::test_slim_restore_snippet_runs",
    ("docs/conversion.md", 'convbn.load_checkpoint("resnet.pt")'): (
        "tests/test_docs_run.py::test_conversion_overview_runs"
    ),
    ("docs/torch.md", "ConvBN2d.from_params(p1)"): "tests/layers/test_docs_examples.py::test_page_example_runs",
    ("docs/torch.md", 'convbn.load_into(model, "block.weights.h5"'): (
        "tests/layers/test_docs_examples.py::test_page_example_runs"
    ),
    ("docs/keras.md", "ConvBN.from_params(p1)"): "tests/layers/test_docs_examples.py::test_page_example_runs",
    ("docs/keras.md", 'convbn.load_into(model, "net.pt")'): (
        "tests/layers/test_docs_examples.py::test_page_example_runs"
    ),
    ("docs/flax.md", "ConvBN.from_params(convbn.from_torch"): (
        "tests/layers/test_docs_examples.py::test_page_example_runs"
    ),
    ("docs/flax.md", 'convbn.load_into(variables, "block.pt")'): (
        "tests/layers/test_docs_examples.py::test_page_example_runs"
    ),
}


def _python_blocks(page: Path) -> list[tuple[str, str | None]]:
    """Each ```python block of ``page``: its text, and the reason it is not run (None: it runs)."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        marker = NOT_RUN.search(text, 0, match.start())
        marked = marker is not None and marker.end() == match.start()
        blocks.append((match.group(1), marker.group(1) if marked else None))
    return blocks


def doc_block(page: str, containing: str) -> str:
    """The one Python block of ``page`` (relative to the repository) that contains ``containing``."""
    (block,) = [b for b, _ in _python_blocks(ROOT / page) if containing in b]
    return block


def test_every_python_block_is_run_or_marked_not_run() -> None:
    covered = {key: 0 for key in RUN_BY}
    unaccounted = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for block, reason in _python_blocks(page):
            runs = [key for key in RUN_BY if key[0] == name and key[1] in block]
            if reason is not None:
                assert not runs, f"{name}: a block marked 'not run' ({reason}) is listed as run by {RUN_BY[runs[0]]}"
                continue
            if not runs:
                unaccounted.append(f"{name}: {block.splitlines()[0]!r}")
            for key in runs:
                covered[key] += 1
    assert not unaccounted, "Python blocks neither run by a test nor marked <!-- not run: why -->: " + "; ".join(unaccounted)
    assert all(n == 1 for n in covered.values()), {k: n for k, n in covered.items() if n != 1}
    # The tests named run what they claim: each exists, and reads its page.
    for (page, _), test in RUN_BY.items():
        path, name = test.split("::")
        source = (ROOT / path).read_text(encoding="utf-8")
        assert f"def {name}(" in source, test
        assert Path(page).name in source or Path(page).stem in source, (test, page)


def test_the_inventory_sees_a_marker_only_right_above_its_block(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- not run: a signature -->\n```python\nf(a, ...)\n```\n\n"
        "<!-- not run: too far above -->\n\n```python\ng()\n```\n```python\nh()\n```\n"
    )
    assert _python_blocks(page) == [("f(a, ...)\n", "a signature"), ("g()\n", None), ("h()\n", None)]


# -- README ----------------------------------------------------------------------------------------


def _run_readme(backend: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("CONVBN_BACKEND", backend)  # where the block's NumPy input runs
    np.random.seed(0)  # the block draws its data from NumPy's global generator
    namespace: dict[str, Any] = {}
    exec(doc_block("README.md", "y = convbn.conv_bn(x, params)"), namespace)
    return namespace


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "jax"])
def test_readme_example_runs(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's first example on each framework, against the NumPy reference on the same data."""
    require_backend(backend)
    want = _run_readme("numpy", monkeypatch)
    got = _run_readme(backend, monkeypatch)
    # y: NCHW eval with the moving statistics the training call returned; then the fused conv.
    assert got["y"].shape == (8, 32, 16, 16)
    for name in ("y", "kernel", "bias"):
        assert rel_err(got[name], want[name]) < 1e-5, name
    assert rel_err(got["params"].moving_var, want["params"].moving_var) < 1e-5
    assert not np.allclose(want["params"].moving_var, 1.0)  # training did update it



# -- docs/conversion.md: the overview --------------------------------------------------------------


def test_conversion_overview_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's first block on a ResNet-named torch checkpoint: the pair it names is read in
    HWIO, fc is a dense layer (in, out), and the Keras file written holds the same layers."""
    need("torch", "h5py")
    import torch
    from torch import nn

    torch.manual_seed(0)
    block = nn.Module()
    block.conv1, block.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    model = nn.Module()
    model.conv1, model.bn1 = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(8)
    model.layer1, model.fc = nn.Sequential(block), nn.Linear(8, 10)
    for bn in (model.bn1, block.bn1):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    monkeypatch.chdir(tmp_path)
    torch.save(model.state_dict(), "resnet.pt")
    namespace: dict[str, Any] = {}
    exec(doc_block("docs/conversion.md", 'convbn.load_checkpoint("resnet.pt")'), namespace)
    ckpt = namespace["ckpt"]
    params = ckpt.layers["layer1.0.conv1"]
    np.testing.assert_array_equal(params.kernel, block.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params.moving_var, block.bn1.running_var.numpy())
    np.testing.assert_array_equal(ckpt.others["fc"].kernel, model.fc.weight.detach().numpy().T)
    import convbn

    written = convbn.load_checkpoint("resnet.weights.h5")
    assert len(written.layers) == len(ckpt.layers) == 2
    for want, got in zip(ckpt.layers.values(), written.layers.values(), strict=True):
        np.testing.assert_array_equal(got.kernel, want.kernel)
        np.testing.assert_array_equal(got.moving_mean, want.moving_mean)


# -- docs/dcgan-to-slim.md: the restore snippet ----------------------------------------------------

DOC_WIDTHS = [("d_h0_conv", None, 64), ("d_h1_conv", "d_bn1", 128), ("d_h2_conv", "d_bn2", 256), ("d_h3_conv", "d_bn3", 512)]


def _dcgan_at_the_docs_widths(prefix: Path, x: np.ndarray) -> np.ndarray:
    """A DCGAN discriminator as DCGAN's ops.py builds it, at the page's widths, with non-trivial
    values, saved with its .meta; returns its features (the last LeakyReLU) for ``x``."""
    import tensorflow as tf

    from tests.formats.slim_graphs import import_slim, randomize

    slim = import_slim()
    tf1 = tf.compat.v1
    with tf.Graph().as_default():
        image = tf1.placeholder(tf.float32, [None, *x.shape[1:]])
        h = image
        for conv_scope, bn_scope, depth in DOC_WIDTHS:
            with tf1.variable_scope(conv_scope):
                w = tf1.get_variable("w", [5, 5, h.shape[-1], depth])
                conv = tf.nn.conv2d(h, w, strides=[1, 2, 2, 1], padding="SAME")
                h = tf.nn.bias_add(conv, tf1.get_variable("biases", [depth]))
            if bn_scope is not None:
                h = slim.batch_norm(h, decay=0.9, epsilon=1e-5, scale=True, updates_collections=None,
                                    is_training=False, scope=bn_scope)
            h = tf.nn.leaky_relu(h, 0.2)
        features = tf.identity(h)  # a fetch oneDNN's grappler fusions cannot rename
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            randomize(sess, tf1, np.random.default_rng(3))
            tf1.train.Saver().save(sess, str(prefix))
            return np.asarray(sess.run(features, {image: x}))


@pytest.mark.slow
def test_slim_restore_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """docs/dcgan-to-slim.md end to end at its own widths: the Python API snippet converts a DCGAN
    checkpoint, the restore snippet (shims included) runs as written, and its discriminator
    reproduces the DCGAN graph's features."""
    from tests.formats.slim_graphs import need_slim

    need_slim()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "slim").mkdir()
    x = np.random.default_rng(4).standard_normal((2, 64, 64, 3)).astype(np.float32)
    want = _dcgan_at_the_docs_widths(tmp_path / "checkpoint" / "DCGAN.model-1000", x)
    exec(doc_block("docs/dcgan-to-slim.md", "convbn.load_checkpoint("), {})
    printed = capsys.readouterr().out
    assert printed.count(" graph ") == 3, printed  # d_h1..d_h3 paired from the .meta graph

    # A fresh interpreter: this one has tf-slim's shims installed already (the DCGAN build above).
    # The block runs as written (its restore raises on any missing or misshapen variable), then
    # its discriminator, restored again, computes the features.
    np.save(tmp_path / "x.npy", x)
    script = doc_block("docs/dcgan-to-slim.md", "def discriminator(") + FEATURES
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # float32 graphs on both sides; a wrong eps or a lost conv bias is off by > 1e-4.
    assert rel_err(np.load(tmp_path / "features.npy"), want) < 2e-6


# Appended to the restore snippet: its own names (tf, tf1, discriminator), nothing else imported.
FEATURES = """
import numpy as np

with tf.Graph().as_default():
    image = tf1.placeholder(tf.float32, [None, 64, 64, 3])
    features = tf.identity(discriminator(image))  # an Identity: oneDNN's fusions keep its name
    with tf1.Session() as sess:
        tf1.train.Saver().restore(sess, "slim/model.ckpt")
        np.save("features.npy", sess.run(features, {image: np.load("x.npy")}))
"""


# -- the figures (benchmarks/figures.py) -----------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"


def _bars(svg: str) -> list[tuple[float, str]]:
    """(width, fill) of each bar: the rects drawn over a row, minus the background and the tracks."""
    import xml.etree.ElementTree as ET

    from benchmarks.figures import TRACK

    rects = ET.fromstring(svg).iter(f"{SVG}rect")
    return [(float(r.get("width", 0)), r.get("fill", "")) for r in rects
            if r.get("fill") not in ("white", TRACK, "#f7f8f9")]


def test_conformance_figure_draws_error_over_tolerance_on_a_log_scale() -> None:
    from benchmarks.figures import BAD, CLOSE, GOOD, conformance_svg

    def cell(dtype: str, status: str, error: float | None, tol: float | None) -> dict[str, Any]:
        return {"backend": "torch", "device": "cpu", "group": "eval", "dtype": dtype, "status": status,
                "worst_error": error, "tolerance": tol}

    report = {"backends": {"torch": {"version": "2.13.0"}}, "quick": True,
              "counts": {"checks": 4, "pass": 2, "fail": 2},
              "summary": [cell("float64", "pass", 1e-14, 1e-12), cell("float32", "pass", 1.4e-6, 2e-6),
                          cell("bfloat16", "fail", 0.5, 0.05), cell("float16", "fail", None, 5e-3)]}
    svg = conformance_svg(report)
    # 1e-2 of the tolerance: halfway along the 1e-4..1 log scale (96 px); 0.7: inside but close;
    # 10x over: clipped past the tolerance; a crash: a full red bar and "error", no number.
    assert _bars(svg) == [(48.0, GOOD), (pytest.approx(96 * (1 + np.log10(0.7) / 4), abs=0.05), CLOSE),
                          (pytest.approx(96 * 1.15, abs=0.05), BAD), (96.0, BAD)]
    assert ">0.01<" in svg and ">0.7<" in svg and ">error<" in svg
    assert "convbn conformance --quick: 2 of 4 checks passed, 2 failed" in svg


def test_benchmark_figure_draws_each_ratio_against_native() -> None:
    from benchmarks.figures import CLOSE, GOOD, benchmarks_svg

    def contest(ratio: float, q3: float) -> dict[str, Any]:
        return {"backend": "jax", "shape": "tiny", "mode": "eval", "variant": "NHWC jit",
                "timing": {"ratio": ratio, "ratio_q1": ratio * 0.9, "ratio_q3": q3}}

    report = {"date": "2026-12-01T00:00:00+00:00", "machine": {"cpu": "x", "cores": 2},
              "settings": {"quick": False, "samples": 21, "threads": 2},
              "layers": [contest(0.5, 0.6), contest(1.2, 2.1), {"backend": "jax", "timing": None}]}
    # The scale runs from 0 to 1.5 (the largest ratio rounded up to a half, at least 1.5) over 480 px;
    # widths in 0.1 px. The second whisker (q3 2.1) is clipped at the edge.
    svg = benchmarks_svg(report)
    assert _bars(svg) == [(pytest.approx(480 * 0.5 / 1.5, abs=0.05), GOOD),
                          (pytest.approx(480 * 1.2 / 1.5, abs=0.05), CLOSE)]
    assert "x2='810.0'" in svg and ">1.20<" in svg  # 330 px of labels + 480


@pytest.mark.parametrize(("page", "figure"), [("conformance.md", "conformance.svg"), ("performance.md", "benchmarks.svg")])
def test_the_docs_figures_are_drawn_from_passing_runs(page: str, figure: str) -> None:
    import xml.etree.ElementTree as ET

    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    assert f"](_static/{figure})" in text and "python -m benchmarks.figures --" in text
    root = ET.fromstring((ROOT / "docs" / "_static" / figure).read_text(encoding="utf-8"))
    lines = [t.text or "" for t in root.iter(f"{SVG}text")]
    if figure == "conformance.svg":
        assert re.fullmatch(r"convbn conformance( --quick)?: (\d+) of (\d+) checks passed, 0 failed", lines[0]), lines[0]
    else:
        assert lines[0].startswith("time of conv_bn / time of the framework's own layers")
        assert len(_bars(ET.tostring(root, encoding="unicode"))) >= 30  # every contest of a run


# -- docs/cli.md: convbn info ----------------------------------------------------------------------


def test_the_documented_info_output_is_what_info_prints() -> None:
    """docs/cli.md shows a real `convbn info`: the same header, one row per backend in the same
    columns, the same closing line, and the JSON keys it names. Run in a fresh process: info
    imports every installed framework, which a run that tests fewer backends must not."""
    import json

    def info(*argv: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "convbn", "info", *argv], capture_output=True,
                              text=True, timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    block = text.split("```console\n$ convbn info\n", 1)[1].split("```", 1)[0].splitlines()
    printed = info().splitlines()
    # The backend table ends at "NumPy input picks ..."; the lines after it name versions and the
    # oneDNN setting of the machine and the environment, so only their first words are compared.
    rows = next(i for i, line in enumerate(block) if line.startswith("NumPy input picks"))
    assert printed[0] == block[0] and printed[rows] == block[rows]
    assert [line.split()[0] for line in printed] == [line.split()[0] for line in block]
    device_column = block[0].index("device")
    for line in printed[1:rows]:  # the third column starts under "device", as on the page
        assert re.match(r"(\S+\s+){2}", line).end() == device_column, line  # type: ignore[union-attr]
    report = json.loads(info("--json"))
    assert set(report) == {"backends", "auto_order", "convbn", "python", "packages", "onednn"}
    installed = [row for row in report["backends"] if row["installed"]]
    assert installed and all(
        set(row) == {"backend", "version", "installed", "device", "max_rel_err_vs_float64"} for row in installed
    )
    assert all(f'"{key}"' in text for key in installed[0])
