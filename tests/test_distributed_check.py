"""The ``distributed`` group's checks themselves, with NumPy pieces: replicas that share the whole
batch's statistics pass, replicas that each normalize with their own batch fail, and a piece that
travelled through JSON (as drivers' subprocesses return them) checks the same."""

from __future__ import annotations

import numpy as np
import pytest

from convbn.conformance import distributed as dist
from convbn.conformance import reference


def _synced_pieces(task: dist.DistTask) -> list[dist.Piece]:
    """What exact synchronized replicas give: the whole batch's results, sliced; the parameter
    gradients all on replica 0 (only their sum over replicas is checked)."""
    x, params, dy = dist.inputs(task)
    f = reference.forward(x, params, True)
    g = reference.gradients(x, params, dy, True)
    out = []
    for rank in range(len(task.splits)):
        grads = {k: dist.shard(task, v, rank) if k == "x" else (v if rank == 0 else np.zeros_like(v))
                 for k, v in g.items()}
        out.append(dist.Piece(rank, dist.shard(task, f.y, rank), f.moving_mean, f.moving_var, grads))
    return out


def _local_pieces(task: dist.DistTask) -> list[dist.Piece]:
    """Replicas that never talk: each normalizes with its own slice's statistics."""
    x, params, dy = dist.inputs(task)
    out = []
    for rank in range(len(task.splits)):
        xs, dys = dist.shard(task, x, rank), dist.shard(task, dy, rank)
        f = reference.forward(xs, params, True)
        out.append(dist.Piece(rank, f.y, f.moving_mean, f.moving_var, reference.gradients(xs, params, dys, True)))
    return out


def _uneven_multi_value_tasks(world: int) -> list[dist.DistTask]:
    # Local statistics exist only where every replica has two or more values per channel.
    return [t for t in dist.tasks(world) if 0 not in t.splits and t.case.name != "dist_one_value"]


@pytest.mark.parametrize("world", [2, 3])
def test_synchronized_replicas_pass(world: int) -> None:
    for task in dist.tasks(world):
        results = dist.check("numpy", f"cpu x{world}", task, _synced_pieces(task))
        assert [r.status for r in results] == ["pass"] * 4, [r.message() for r in results]


@pytest.mark.parametrize("world", [2, 3])
def test_replicas_with_their_own_statistics_fail(world: int) -> None:
    for task in _uneven_multi_value_tasks(world):
        failed = {r.quantity for r in dist.check("numpy", f"cpu x{world}", task, _local_pieces(task)) if r.failed}
        assert "y" in failed and "moving stats equal on every replica" in failed, (task.label, failed)


def test_a_missing_replica_or_gradient_fails() -> None:
    task = dist.tasks(3)[0]
    pieces = _synced_pieces(task)
    [result] = dist.check("numpy", "cpu x3", task, pieces[:2])
    assert result.failed and "ranks [0, 1], expected 0..2" in result.detail
    del pieces[1].grads["gamma"]
    assert dist.check("numpy", "cpu x3", task, pieces)[-1].failed


def test_pieces_survive_json() -> None:
    task = dist.tasks(3)[0]
    pieces = _synced_pieces(task)
    back = [dist.Piece.from_dict(p.as_dict()) for p in pieces]
    for a, b in zip(pieces, back, strict=True):
        assert a.y.dtype == b.y.dtype and np.array_equal(a.y, b.y)
        assert all(np.array_equal(a.grads[k], b.grads[k]) for k in a.grads)
    assert [r.error for r in dist.check("numpy", "cpu x3", task, back)] == [
        r.error for r in dist.check("numpy", "cpu x3", task, pieces)
    ]


def test_splits_cover_the_batch() -> None:
    for world in (1, 2, 3, 4):
        for s in dist.splits(world):
            assert len(s) == world and sum(s) == dist.BATCH and min(s) >= 0
    assert (5, 0, 1) in dist.splits(3) and (3, 2, 1) in dist.splits(3) and (3, 3) in dist.splits(2)


def test_combined_variance_keeps_float32_accuracy_at_a_large_mean() -> None:
    """|mean| = 1e3, std = 1, three uneven replicas and an empty one in float32: the moving variance
    updated from the combined (count, mean, M2) is within the float32 stats tolerance of the
    float64 oracle when each replica's moments are taken about the replicas' common mean (as the
    JAX and TF backends take them), and far outside it with E[x^2] - E[x]^2."""
    from convbn.backends._common import combine_moments
    from convbn.conformance.tolerances import tolerance

    rng = np.random.default_rng(0)
    values = (rng.standard_normal((700, 5)) + 1e3).astype(np.float32)
    shards = np.split(values, [400, 650, 700])  # 400, 250, 50 and no values per channel
    counts = np.array([[len(s)] for s in shards], np.float32)

    def psum(parts: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        return tuple(np.sum(p, axis=0, dtype=np.float32) for p in parts)

    raw = np.array([s.sum(axis=0, dtype=np.float32) / max(len(s), 1) for s in shards])
    total, weighted = psum((counts, raw * counts))
    shift = weighted / total
    means = np.array([(s - shift).sum(axis=0, dtype=np.float32) / max(len(s), 1) for s in shards])
    m2s = np.array([((s - shift - m) ** 2).sum(axis=0, dtype=np.float32) for s, m in zip(shards, means, strict=True)])
    n, mean, m2 = combine_moments(counts, means, m2s, psum)
    assert mean.dtype == np.float32 and m2.dtype == np.float32
    old = np.ones(5)
    exact = values.astype(np.float64)
    expected = 0.9 * old + 0.1 * exact.var(axis=0, ddof=1)
    err, _ = reference.var_error(0.9 * old + 0.1 * (m2 / (n - 1)), expected, expected)
    assert err <= tolerance("stats", "float32"), err
    naive = (values**2).mean(axis=0, dtype=np.float32) - values.mean(axis=0, dtype=np.float32) ** 2
    naive_err, _ = reference.var_error(0.9 * old + 0.1 * naive * 700 / 699, expected, expected)
    assert naive_err > 100 * tolerance("stats", "float32"), naive_err
