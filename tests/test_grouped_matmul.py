"""The grouped-matmul kernels (jmoe/pallas/grouped_matmul.py) against a per-group numpy
loop and against jax.lax.ragged_dot: forward, both gradients, rows past the groups, empty
groups, groups straddling row tiles, odd dims. Interpreted on CPU, compiled on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jmoe.grouped_matmul import grouped_matmul, scan_grouped_matmul, tile_schedule
from jmoe.pallas import grouped_matmul as gm

SMALL = gm.GmmConfig(block_m=16, block_n=16, block_k=16)  # many tiles at test sizes


def loop_gmm(x, w, sizes):
    """float64 numpy: each group's rows times its expert's matrix; 0 past the groups."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, n in enumerate(np.asarray(sizes)):
        out[start:start + n] = x[start:start + n] @ w[e]
        start += n
    return out


def loop_tgmm(x, dy, sizes, num_experts):
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    out = np.zeros((num_experts, x.shape[1], dy.shape[1]))
    start = 0
    for e, n in enumerate(np.asarray(sizes)):
        out[e] = x[start:start + n].T @ dy[start:start + n]
        start += n
    return out


def random_case(seed, n, k, f, sizes, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, k)), dtype)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, f)) / np.sqrt(k), dtype)
    dy = jnp.asarray(rng.normal(size=(n, f)), dtype)
    return x, w, jnp.asarray(sizes, jnp.int32), dy


CASES = {
    # rows, K, F, group sizes (sum <= rows; the rest is padding)
    "straddling": (70, 24, 40, [5, 0, 33, 1, 31]),      # empty group, groups across 16-row tiles
    "padding-rows": (64, 32, 16, [10, 0, 20, 0]),       # 34 rows past the groups: output 0
    "one-group-all": (48, 20, 36, [0, 48, 0]),          # one expert takes every row
    "odd-dims": (37, 19, 23, [7, 11, 13, 6]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gmm_forward_matches_loop_and_ragged_dot(name):
    n, k, f, sizes = CASES[name]
    x, w, gs, _ = random_case(1, n, k, f, sizes)
    got = np.asarray(gm.gmm(x, w, gs, config=SMALL), np.float64)
    np.testing.assert_allclose(got, loop_gmm(x, w, sizes), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got, np.asarray(jax.lax.ragged_dot(x, w, gs), np.float64), rtol=2e-5, atol=2e-5)
    assert np.all(got[sum(sizes):] == 0.0)  # rows past the groups are exactly 0
    # the transposed-weight variant (the input gradient's form)
    got_t = np.asarray(gm.gmm(x, jnp.swapaxes(w, 1, 2), gs, transpose_w=True, config=SMALL), np.float64)
    np.testing.assert_allclose(got_t, got, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tgmm_matches_loop(name):
    n, k, f, sizes = CASES[name]
    x, _, gs, dy = random_case(2, n, k, f, sizes)
    got = np.asarray(gm.tgmm(x, dy, gs, config=SMALL), np.float64)
    np.testing.assert_allclose(got, loop_tgmm(x, dy, sizes, len(sizes)), rtol=2e-5, atol=2e-5)
    for e, size in enumerate(sizes):
        if size == 0:
            assert np.all(got[e] == 0.0)


def sin_loss_grads(fn, x, w, group_sizes, c):
    """d/d(x, w) of ``sum(sin(fn(x, w)) * c)`` (a nonlinear loss, so dy varies per row), and the
    same through ``jax.lax.ragged_dot`` in float32 on the same values: (got, want)."""
    def loss(fn, x, w):
        return jnp.sum(jnp.sin(fn(x, w).astype(jnp.float32)) * c.astype(jnp.float32))

    got = jax.grad(lambda x, w: loss(fn, x, w), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: loss(lambda a, b: jax.lax.ragged_dot(a, b, group_sizes), x, w),
                    argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    return got, want


@pytest.mark.parametrize("name", ["straddling", "padding-rows"])
def test_grouped_matmul_gradients_match_ragged_dot(name):
    n, k, f, sizes = CASES[name]
    x, w, gs, dy = random_case(3, n, k, f, sizes)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * dy)

    got = jax.grad(loss(lambda x, w: gm.grouped_matmul(x, w, gs, SMALL)), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, gs)), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(got[0])[sum(sizes):] == 0.0)  # padding rows get no gradient


def test_bf16_within_bf16_tolerance():
    n, k, f, sizes = 96, 64, 48, [30, 0, 50, 16]
    x, w, gs, _ = random_case(4, n, k, f, sizes, jnp.bfloat16)
    got = np.asarray(gm.gmm(x, w, gs, config=gm.GmmConfig(block_m=32, block_n=32, block_k=32)), np.float64)
    want = loop_gmm(x, w, sizes)  # float64 from the same bf16 inputs
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_schedule_covers_every_row_once():
    """Every row lies in exactly one used work item; unused items have empty row ranges."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        num_rows, block_m, e = int(rng.integers(1, 100)), 16, int(rng.integers(1, 9))
        sizes = rng.multinomial(int(rng.integers(0, num_rows + 1)), np.ones(e) / e)
        tile, start, end, expert = (np.asarray(a) for a in tile_schedule(jnp.asarray(sizes, jnp.int32), num_rows, block_m))
        covered = np.zeros(num_rows, int)
        for t, s, en, ex in zip(tile, start, end, expert):
            rows = np.arange(t * block_m, (t + 1) * block_m)
            rows = rows[(rows >= s) & (rows < en)]
            covered[rows] += 1
            bounds = np.concatenate([[0], np.cumsum(sizes), [num_rows]])
            if len(rows):
                assert bounds[ex] <= rows.min() and rows.max() < bounds[ex + 1]
        np.testing.assert_array_equal(covered, 1)


def test_rejects_bad_shapes():
    x = jnp.zeros((8, 4))
    with pytest.raises(ValueError, match="contracting dims"):
        gm.gmm(x, jnp.zeros((2, 5, 3)), jnp.array([4, 4], jnp.int32))
    with pytest.raises(ValueError, match="group_sizes"):
        gm.gmm(x, jnp.zeros((2, 4, 3)), jnp.array([4, 4, 0], jnp.int32))


def test_lowers_to_triton_for_cuda():
    """gmm, its transposed form and tgmm (the whole VJP) lower to Triton IR for CUDA at
    GPU-like sizes with the default tiles (no GPU needed on jax 0.10; skipped on 0.11+)."""
    from tests.test_pallas import _lower_for_cuda

    cfg = gm.GmmConfig(interpret=False)
    x = jax.ShapeDtypeStruct((1000, 300), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((8, 300, 500), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((8,), jnp.int32)

    def fwd_bwd(x, w, gs):
        y, vjp = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, gs, cfg), x, w)
        return y, vjp(y)

    text = _lower_for_cuda(jax.jit(fwd_bwd).trace(x, w, gs))
    assert text.count("jmoe_gmm") >= 2 and "jmoe_tgmm" in text


# ----------------------------------------------------------------------------
# The plain-XLA item loop (jmoe/grouped_matmul.py): same checks, any backend.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_scan_grouped_matmul_forward_and_gradients(name):
    n, k, f, sizes = CASES[name]
    x, w, gs, dy = random_case(6, n, k, f, sizes)
    got = np.asarray(scan_grouped_matmul(x, w, gs, 16), np.float64)
    np.testing.assert_allclose(got, loop_gmm(x, w, sizes), rtol=2e-5, atol=2e-5)
    assert np.all(got[sum(sizes):] == 0.0)
    grads = jax.grad(lambda x, w: jnp.sum(scan_grouped_matmul(x, w, gs, 16) * dy), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, gs) * dy), argnums=(0, 1))(x, w)
    for g, r in zip(grads, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(grads[1], np.float64), loop_tgmm(x, dy, sizes, len(sizes)),
                               rtol=2e-5, atol=2e-5)
    for e, size in enumerate(sizes):
        if size == 0:
            assert np.all(np.asarray(grads[1][e]) == 0.0)


def test_scan_grouped_matmul_bf16_and_jit():
    n, k, f, sizes = 96, 64, 48, [30, 0, 50, 16]
    x, w, gs, _ = random_case(7, n, k, f, sizes, jnp.bfloat16)
    got = np.asarray(jax.jit(scan_grouped_matmul, static_argnums=3)(x, w, gs, 32), np.float64)
    assert np.linalg.norm(got - loop_gmm(x, w, sizes)) / np.linalg.norm(got) < 1e-2


SHARDINGS = {  # rows [N, K] and w [E, K, F] on an explicit ("data", "model") mesh
    "8x1-rows-K-on-model": ((8, 1), P(None, "model"), P()),  # a tutorial dense layer's output
    "4x2-rows-K-on-model": ((4, 2), P(None, "model"), P()),
    "4x2-rows-N-on-data-w-F-on-model": ((4, 2), P("data", None), P(None, None, "model")),
    "4x2-rows-N-data-K-model-w-K-model": ((4, 2), P("data", "model"), P(None, "model", None)),
}


@pytest.mark.parametrize("matmul", ["scan", "ragged_dot"])
@pytest.mark.parametrize("case", sorted(SHARDINGS))
def test_grouped_matmul_on_explicitly_sharded_operands(case, matmul):
    """Issue 22: outside shard_map, operands whose types carry a sharding (rows split over
    "model" along K by a user's dense layers) gave "Incompatible types for broadcasting" in
    the scan's backward. Values and both gradients equal the unsharded ones, and each
    gradient comes back in its operand's sharding."""
    shape, row_spec, w_spec = SHARDINGS[case]
    x, w, gs, _ = random_case(7, 64, 32, 48, [10, 0, 30, 20])  # 4 rows past the groups

    def loss(x, w):
        return jnp.sum(jnp.sin(grouped_matmul(x, w, gs, matmul)))

    want = jax.value_and_grad(loss, (0, 1))(x, w)
    mesh = jax.make_mesh(shape, ("data", "model"))  # explicit axes, jax.make_mesh's default
    with jax.set_mesh(mesh):
        xs, ws = jax.device_put(x, row_spec), jax.device_put(w, w_spec)
        value, (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1)))(xs, ws)
    np.testing.assert_allclose(value, want[0], rtol=1e-5)
    np.testing.assert_allclose(dx, want[1][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, want[1][1], rtol=1e-5, atol=1e-5)
    assert jax.typeof(dx).sharding.spec == jax.typeof(xs).sharding.spec
    assert jax.typeof(dw).sharding.spec == jax.typeof(ws).sharding.spec
