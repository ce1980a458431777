"""The Mosaic GPU dispatch/combine kernels (jmoe/pallas/mosaic_dispatch.py, the opt-in
``dispatch="mosaic"`` backend) against the pure-jnp references and the gather backend:
the three row kernels, dispatch / combine values and every gradient (input, expert outputs,
combine weights) with drops, padding slots, all tokens dropped, partial row blocks and odd
widths; the layer equals the einsum layer; forward + backward lower to Mosaic GPU for CUDA.

Off GPU the kernels run in Mosaic GPU's interpret mode (jax 0.10 and 0.12); on a GPU, compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import dispatch as dispatch_lib
from jmoe.pallas import kernels
from jmoe.pallas import mosaic_dispatch as md
from jmoe.pallas.dispatch import combine_reference, dispatch_reference
from tests.test_pallas import CASES, _both, assert_close, make_plan


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mosaic_row_kernels_match_references(dtype):
    """gather_rows (with and without a scale, -1 and out-of-range sources), gather_sum_rows,
    gather_dot_rows; 40 / 35 rows (partial 32-row blocks), width 13 (one partial column block)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(20, 13)), dtype)
    src = jnp.asarray(rng.integers(-1, 21, 40), jnp.int32)  # -1 and 20 name no row
    scale = jnp.asarray(rng.normal(size=40), jnp.float32)
    idx = jnp.asarray(rng.integers(-1, 20, (35, 3)), jnp.int32)
    idx = idx.at[0].set(-1)  # a row with no term: exactly 0
    weight = jnp.asarray(rng.normal(size=(35, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(35, 13)), dtype)
    got = md.mosaic_gather_rows(x, src)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(kernels.gather_rows_reference(x, src), np.float32))
    assert_close(md.mosaic_gather_rows(x, src, scale, out_dtype=jnp.float32),
                 kernels.gather_rows_reference(x, src, scale, out_dtype=jnp.float32))
    summed = md.mosaic_gather_sum_rows(x, idx, weight)
    assert_close(summed, kernels.gather_sum_rows_reference(x, idx, weight), dtype)
    assert np.all(np.asarray(summed[0], np.float32) == 0.0)
    assert_close(md.mosaic_gather_dot_rows(y, x, idx), kernels.gather_dot_rows_reference(y, x, idx))


@pytest.mark.parametrize("case_name", ["top2_drops", "all_dropped"])
def test_mosaic_dispatch_combine_and_grads(case_name):
    """Forward and VJPs (x, expert_out, token_weight) equal the jnp references and gather."""
    case = CASES[case_name]
    rng = np.random.default_rng(1)
    plan = make_plan(case, rng)
    G, S, E, C, d = case["G"], case["S"], case["E"], case["C"], case["d"]
    x = jnp.asarray(rng.normal(size=(G, S, d)), jnp.float32)
    expert_out = jnp.asarray(rng.normal(size=(E, G * C, d)), jnp.float32)
    ct_slots = jnp.asarray(rng.normal(size=(E, G * C, d)), jnp.float32)
    ct_y = jnp.asarray(rng.normal(size=(G, S, d)), jnp.float32)
    args = (x, expert_out, plan.token_weight, plan, ct_slots, ct_y)
    got = jax.jit(lambda *a: _both(md.mosaic_dispatch, md.mosaic_combine, *a))(*args)
    gather = dispatch_lib.BACKENDS["gather"]
    for want in (_both(dispatch_reference, combine_reference, *args), _both(gather.dispatch, gather.combine, *args)):
        for name, a, b in zip(("slots", "y", "dx", "dexpert_out", "dweight"), got, want):
            assert a.dtype == b.dtype, name
            assert_close(a, b)
    slots, y, dx, dout, dw = got
    padding = np.asarray(jnp.swapaxes(plan.slot_token, 0, 1).reshape(E, G * C)) < 0
    assert np.all(np.asarray(slots)[padding] == 0) and np.all(np.asarray(dout)[padding] == 0)
    unrouted = ~np.asarray(jnp.any(plan.token_slot >= 0, axis=-1))
    assert np.all(np.asarray(y)[unrouted] == 0) and np.all(np.asarray(dx)[unrouted] == 0)
    assert np.all(np.asarray(dw)[np.asarray(plan.token_slot) < 0] == 0)


def test_mosaic_layer_equals_einsum():
    """A capacity layer with dispatch="mosaic": output and gradients (input, router, experts)
    equal the same layer with "einsum"."""
    from flax import nnx

    from jmoe import MoE
    from tests.test_parallel import assert_tree_close, values_and_grads

    layers = [MoE(64, 128, 4, k=2, capacity_factor=1.0, dispatch=name, deterministic=True,
                  rngs=nnx.Rngs(0, router=1)) for name in ("einsum", "mosaic")]
    kx, kr = jax.random.split(jax.random.key(2))
    x, r = jax.random.normal(kx, (2, 16, 64)), jax.random.normal(kr, (2, 16, 64))
    expected, actual = values_and_grads(layers, x, None, r)
    assert float(np.max(np.abs(actual[2]["router_weight"]))) > 0  # the router learns through combine
    assert_tree_close(actual, expected, rtol=1e-5)


def test_mosaic_dispatch_lowers_to_mosaic_gpu_for_cuda():
    """Dispatch + combine forward and backward (bf16, d 256) lower for CUDA without a GPU:
    dispatch, combine, and the backward's gather-sum, scaled gather and gather-dot kernels."""
    from jmoe import routing

    config = md.MosaicDispatchConfig(interpret=False)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 4)), jnp.float32)
    plan = routing.tokens_choose(logits, k=2, capacity=40)

    def loss(x, w):
        p = plan.replace(token_weight=w)
        slots = md.mosaic_dispatch(x, p, config=config)
        return jnp.sum(md.mosaic_combine(slots * 2, p, config=config).astype(jnp.float32) ** 2)

    x = jax.ShapeDtypeStruct((2, 64, 256), jnp.bfloat16)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, plan.token_weight).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 5


def test_mosaic_config_checks():
    with pytest.raises(ValueError, match="block_rows must be a positive multiple of 32"):
        md.MosaicDispatchConfig(block_rows=16)
    with pytest.raises(ValueError, match="block_d must be a positive multiple of 64"):
        md.MosaicDispatchConfig(block_d=32)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices of the default backend")
def test_mosaic_layer_on_expert_mesh_equals_one_device_einsum():
    """On a 2 data x 4 expert mesh (off GPU the kernels' jnp references run inside shard_map;
    on GPUs the compiled kernels) forward and gradients equal the one-device einsum layer."""
    from flax import nnx

    from jmoe import MoE, parallel
    from tests.test_parallel import assert_tree_close, values_and_grads

    mesh = parallel.make_mesh(data=2, expert=4)
    one = MoE(64, 128, 8, k=2, capacity_factor=1.0, dispatch="einsum", deterministic=True, rngs=nnx.Rngs(0, router=1))
    ep = MoE(64, 128, 8, k=2, capacity_factor=1.0, dispatch="mosaic", mesh=mesh, deterministic=True,
             rngs=nnx.Rngs(0, router=1))
    parallel.shard_moe_params(ep, mesh)
    kx, kr = jax.random.split(jax.random.key(3))
    x, r = jax.random.normal(kx, (8, 16, 64)), jax.random.normal(kr, (8, 16, 64))
    expected, actual = values_and_grads([one, ep], x, None, r)
    assert_tree_close(actual, expected, rtol=1e-5)
