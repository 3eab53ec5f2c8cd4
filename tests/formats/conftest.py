"""Checkpoints built by real tf-slim and DCGAN graphs, shared by every module that reads or converts
them: each is built once per test session (across xdist workers) and only read afterwards."""

from __future__ import annotations

from typing import Any

import pytest

from tests.formats import slim_graphs


@pytest.fixture(scope="session")
def slim_net(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """:func:`slim_graphs.build_slim`: tf-slim conv/depthwise + BatchNorm layers, saved with a .meta."""
    slim_graphs.need_slim()
    return slim_graphs.shared_build(tmp_path_factory, "slim", slim_graphs.build_slim)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def dcgan_net(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """:func:`slim_graphs.build_dcgan`: a DCGAN-style discriminator (conv ``w`` + ``biases``, BatchNorm
    with gamma, eps 1e-5), saved as ``dcgan.ckpt`` with a .meta."""
    slim_graphs.need_slim()
    return slim_graphs.shared_build(tmp_path_factory, "dcgan", slim_graphs.build_dcgan)  # type: ignore[no-any-return]
