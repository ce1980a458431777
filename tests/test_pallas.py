"""Pallas dispatch / combine kernels against their references and the gather backend.

Off GPU the kernels run in interpret mode (slow: small shapes); on a GPU the
same tests run the compiled Triton kernels (``resolve_interpret`` decides).

Unwritten elements: in interpret mode Pallas initialises every un-aliased
float output with NaN, and ``poison=True`` (used in the kernel tests) passes a
NaN buffer aliased to the output on any backend, so an element a kernel forgot
to write is NaN; the inputs here are finite, so "no NaN in the output" proves
every element was written. ``test_poison_catches_unwritten`` shows the check
bites.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jmoe import dispatch as dispatch_lib
from jmoe import routing
from jmoe.layer import MoE
from jmoe.pallas import kernels
from jmoe.pallas.dispatch import (
    combine_reference,
    dispatch_reference,
    pallas_combine,
    pallas_dispatch,
)

@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """The gather / einsum references contract with einsum: on a GPU a float32
    einsum may run in TF32 by default, which is not the comparison we want."""
    with jax.default_matmul_precision("highest"):
        yield


# Small tiles so that a few rows / columns already span several blocks and
# partial (masked) tiles.
SMALL = kernels.KernelConfig(block_rows=8, block_d=8)


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)


def assert_close(a, b, dtype=jnp.float32):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol(dtype))


def no_nan(*arrays):
    for a in arrays:
        assert not np.isnan(np.asarray(a, np.float32)).any(), "an output element was never written"


# ----------------------------------------------------------------------------
# the row kernels vs their references
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_row_kernels_match_reference(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(11, 13)), dtype)  # N=11, d=13 (odd, 2 blocks of 8)
    src = jnp.asarray(rng.integers(-1, 11, size=(19,)), jnp.int32)  # R=19: partial last block
    scale = jnp.asarray(rng.normal(size=(19,)), jnp.float32)
    idx = jnp.asarray(rng.integers(-1, 11, size=(9, 3)), jnp.int32)  # T=9, K=3
    idx = idx.at[4].set(-1)  # a row with no valid term: exactly 0
    w = jnp.asarray(rng.normal(size=(9, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(9, 13)), dtype)

    @jax.jit
    def run(x, src, scale, idx, w, y):
        return (
            kernels.gather_rows(x, src, config=SMALL, poison=True),
            kernels.gather_rows(x, src, scale, config=SMALL, poison=True),
            kernels.gather_sum_rows(x, idx, w, config=SMALL, poison=True),
            kernels.gather_dot_rows(y, x, idx, config=SMALL, poison=True),
        )

    copy, scaled, summed, dots = run(x, src, scale, idx, w, y)
    np.testing.assert_array_equal(np.asarray(copy, np.float32), np.asarray(kernels.gather_rows_reference(x, src), np.float32))
    no_nan(copy, scaled, summed, dots)
    assert_close(scaled, kernels.gather_rows_reference(x, src, scale), dtype)
    assert_close(summed, kernels.gather_sum_rows_reference(x, idx, w), dtype)
    assert_close(dots, kernels.gather_dot_rows_reference(y, x, idx), dtype)
    assert np.all(np.asarray(summed[4]) == 0)
    assert np.all(np.asarray(copy)[np.asarray(src) < 0] == 0)


@pytest.mark.parametrize("poison", [True, False])
def test_poison_catches_unwritten(poison):
    """A kernel that writes only its first row leaves NaN in the others: with
    ``poison=True`` on any backend, and without it in interpret mode (Pallas's
    interpreter starts un-aliased float outputs as NaN)."""
    if not poison and not kernels.resolve_interpret(None):
        pytest.skip("a compiled kernel's output starts uninitialised, not NaN")

    def half_kernel(x_ref, out_ref):
        out_ref[0, :] = x_ref[0, :]

    x = jnp.ones((4, 8), jnp.float32)
    out = kernels._call(
        half_kernel, jax.ShapeDtypeStruct((4, 8), jnp.float32), (1,), (x,), SMALL, "half", poison=poison
    )
    out = np.asarray(out)
    assert np.all(out[0] == 1) and np.isnan(out[1:]).all()


def test_kernel_errors():
    with pytest.raises(ValueError, match="block_rows"):
        kernels.KernelConfig(block_rows=12)
    with pytest.raises(ValueError, match="block_d"):
        kernels.KernelConfig(block_d=0)
    x = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match="int32"):
        kernels.gather_rows(x, jnp.zeros((3,), jnp.float32))
    with pytest.raises(ValueError, match="weight"):
        kernels.gather_sum_rows(x, jnp.zeros((3, 2), jnp.int32), jnp.zeros((3, 1)))


# ----------------------------------------------------------------------------
# dispatch / combine of routing plans vs the gather backend, forward and grad
# ----------------------------------------------------------------------------


def make_plan(case, rng):
    G, S, E = case["G"], case["S"], case["E"]
    logits = rng.normal(size=(G, S, E)).astype(np.float32)
    if case.get("avoid_last"):
        logits[..., -1] = -30.0  # nobody picks the last expert: all its slots are padding
    logits = jnp.asarray(logits)
    if case["router"] == "experts_choose":
        return routing.experts_choose(logits, capacity=case["C"])
    mask = jnp.zeros((G, S), bool) if case.get("all_dropped") else None
    return routing.tokens_choose(logits, k=case["K"], capacity=case["C"], token_mask=mask)


CASES = {
    # drops and padding; R = 24 rows (3 full blocks), T = 20 (partial block), d = 13 (2 blocks, masked)
    "top2_drops": dict(router="tokens_choose", G=2, S=10, E=4, K=2, C=3, d=13),
    # an expert that nobody chose (all padding), d = 5 < block_d
    "empty_expert": dict(router="tokens_choose", G=1, S=12, E=4, K=1, C=6, d=5, avoid_last=True),
    # every token masked: all slots padding, every choice dropped -> exactly 0
    "all_dropped": dict(router="tokens_choose", G=2, S=6, E=3, K=2, C=2, d=7, all_dropped=True),
    # expert choice: K = E, a token in 0..E experts
    "experts_choose": dict(router="experts_choose", G=1, S=12, E=4, K=4, C=3, d=9),
}


def _both(backend_dispatch, backend_combine, x, expert_out, weight, plan, ct_slots, ct_y):
    """Forward of dispatch and combine, and their VJPs (incl. w.r.t. token_weight)."""
    slots, dispatch_vjp = jax.vjp(lambda x: backend_dispatch(x, plan), x)
    y, combine_vjp = jax.vjp(lambda o, w: backend_combine(o, plan.replace(token_weight=w)), expert_out, weight)
    (dx,) = dispatch_vjp(ct_slots)
    dout, dw = combine_vjp(ct_y)
    return slots, y, dx, dout, dw


@functools.partial(jax.jit, static_argnames=("name",))
def run_backend(name, x, expert_out, weight, plan, ct_slots, ct_y):
    if name == "pallas":
        fns = (functools.partial(pallas_dispatch, config=SMALL), functools.partial(pallas_combine, config=SMALL))
    elif name == "reference":
        fns = (dispatch_reference, combine_reference)
    else:
        fns = (dispatch_lib.BACKENDS[name].dispatch, dispatch_lib.BACKENDS[name].combine)
    return _both(*fns, x, expert_out, weight, plan, ct_slots, ct_y)


# bf16 on the most general case only (interpret mode is slow)
@pytest.mark.parametrize(
    "case_name, dtype", [(name, jnp.float32) for name in CASES] + [("top2_drops", jnp.bfloat16)]
)
def test_plan_dispatch_combine_and_grads(case_name, dtype):
    case = CASES[case_name]
    rng = np.random.default_rng(1)
    plan = make_plan(case, rng)
    G, S, E, C, d = case["G"], case["S"], case["E"], case["C"], case["d"]
    x = jnp.asarray(rng.normal(size=(G, S, d)), dtype)
    expert_out = jnp.asarray(rng.normal(size=(E, G * C, d)), dtype)
    ct_slots = jnp.asarray(rng.normal(size=(E, G * C, d)), dtype)
    ct_y = jnp.asarray(rng.normal(size=(G, S, d)), dtype)
    args = (x, expert_out, plan.token_weight, plan, ct_slots, ct_y)

    got = run_backend("pallas", *args)
    no_nan(*got)
    names = ("slots", "y", "dx", "dexpert_out", "dweight")
    for want in (run_backend("gather", *args), run_backend("reference", *args)):
        for name, a, b in zip(names, got, want):
            assert a.dtype == b.dtype, name
            assert_close(a, b, dtype)
    slots, y, dx, dout, dw = got
    # dispatch copies exactly; padding slots are exactly 0
    np.testing.assert_array_equal(np.asarray(slots, np.float32), np.asarray(dispatch_reference(x, plan), np.float32))
    padding = np.asarray(jnp.swapaxes(plan.slot_token, 0, 1).reshape(E, G * C)) < 0  # [E, G*C]
    assert np.all(np.asarray(slots, np.float32)[padding] == 0)
    assert np.all(np.asarray(dout, np.float32)[padding] == 0)
    # a token none of whose choices holds a slot gets exactly 0 (and no gradient)
    unrouted = ~np.asarray(jnp.any(plan.token_slot >= 0, axis=-1))  # [G, S]
    assert np.all(np.asarray(y, np.float32)[unrouted] == 0)
    assert np.all(np.asarray(dx, np.float32)[unrouted] == 0)
    assert np.all(np.asarray(dw)[np.asarray(plan.token_slot) < 0] == 0)
    if case.get("all_dropped"):
        assert unrouted.all()


def test_plan_errors():
    plan = make_plan(CASES["top2_drops"], np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[G, S, d\]"):
        pallas_dispatch(jnp.zeros((2, 9, 4)), plan)
    with pytest.raises(ValueError, match=r"\[E, G \* C, d\]"):
        pallas_combine(jnp.zeros((4, 5, 4)), plan)


# ----------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------


def test_layer_pallas_equals_gather():
    model = MoE(12, 16, 4, k=2, capacity_factor=1.0, dispatch="gather", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 12), jnp.float32)
    assert "pallas" in dispatch_lib.BACKENDS

    def loss(model, x):
        y, aux = model(x)
        return jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"], y

    @nnx.jit
    def forward_backward(model, x):
        (_, y), (grads, dx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        return y, grads, dx

    results = {}
    for name in ("gather", "pallas"):
        model.dispatch = name
        results[name] = forward_backward(model, x)
    (y_g, grads_g, dx_g), (y_p, grads_p, dx_p) = results["gather"], results["pallas"]
    assert_close(y_p, y_g)
    assert_close(dx_p, dx_g)
    flat_g = dict(nnx.to_flat_state(grads_g))
    flat_p = dict(nnx.to_flat_state(grads_p))
    assert set(flat_g) == set(flat_p)
    assert any("router_weight" in "/".join(map(str, k)) for k in flat_g)
    for key in flat_g:
        a, b = flat_p[key].get_value(), flat_g[key].get_value()
        assert_close(a, b)
    router_grad = [v.get_value() for k, v in flat_p.items() if "router_weight" in "/".join(map(str, k))][0]
    assert np.abs(np.asarray(router_grad)).max() > 0  # the router learns through the combine weights


# ----------------------------------------------------------------------------
# Triton lowering, checked without a GPU
# ----------------------------------------------------------------------------


def _lower_for_cuda(traced) -> str:
    """StableHLO text of ``traced`` lowered for CUDA. jax 0.10 lowers Pallas to Triton IR
    with no GPU present; from jax 0.11 the Triton lowering reads the GPU's compute
    capability, so off-GPU it raises and the test is skipped (a GPU run covers it)."""
    try:
        return traced.lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as err:
        if "No supported GPU devices found" in str(err) and jax.default_backend() != "gpu":
            pytest.skip(f"jax {jax.__version__} lowers Pallas to Triton only with a GPU present")
        raise


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton_for_cuda(dtype):
    """Forward + backward of dispatch and combine lower to Triton IR for CUDA.

    Lowering runs jax's Pallas -> Triton IR translation (power-of-two block
    shapes, supported ops, masks, index arithmetic) without a GPU; PTX
    compilation itself happens only on a GPU. Default tile config, a
    GPU-like shape with d not a power of two.
    """
    G, S, E, K, C, d = 2, 512, 8, 2, 160, 1000
    cfg = kernels.KernelConfig(interpret=False)
    plan = routing.tokens_choose(jnp.zeros((G, S, E)), k=K, capacity=C)
    x = jax.ShapeDtypeStruct((G, S, d), dtype)
    out = jax.ShapeDtypeStruct((E, G * C, d), dtype)

    def fwd_bwd(x, expert_out, plan):
        slots, vjp_d = jax.vjp(lambda x: pallas_dispatch(x, plan, config=cfg), x)
        y, vjp_c = jax.vjp(lambda o, w: pallas_combine(o, plan.replace(token_weight=w), config=cfg),
                           expert_out, plan.token_weight)
        return slots, y, vjp_d(slots), vjp_c(y)

    text = _lower_for_cuda(jax.jit(fwd_bwd).trace(x, out, plan))
    # 2 dispatch-side + 3 combine-side kernels
    for name in ("jmoe_gather_rows", "jmoe_gather_sum_rows", "jmoe_gather_dot_rows"):
        assert name in text, name


def test_integer_plan_arrays_get_float0_and_auto_backend():
    """vjp w.r.t. the whole plan: float0 for the index arrays, the weight gradient for token_weight."""
    case = CASES["empty_expert"]
    plan = make_plan(case, np.random.default_rng(2))
    expert_out = jnp.ones((case["E"], case["G"] * case["C"], case["d"]), jnp.float32)
    y, vjp = jax.vjp(lambda o, p: pallas_combine(o, p, config=SMALL), expert_out, plan)
    _, dplan = vjp(jnp.ones_like(y))
    for name in ("slot_token", "token_expert", "token_slot"):
        assert getattr(dplan, name).dtype == jax.dtypes.float0, name
    kept = np.asarray(plan.token_slot) >= 0
    np.testing.assert_allclose(np.asarray(dplan.token_weight)[kept], case["d"], rtol=1e-6)  # <1, ones row>
    assert np.all(np.asarray(dplan.token_weight)[~kept] == 0)
    on_gpu = jax.default_backend() == "gpu"
    assert kernels.resolve_interpret(None) == (not on_gpu)
    assert dispatch_lib.resolve_backend("auto") == ("pallas" if on_gpu else "gather")


# ----------------------------------------------------------------------------
# inside jax.shard_map (how jmoe.parallel calls a backend)
# ----------------------------------------------------------------------------


def _sharded_dispatch_combine(dispatch_fn, combine_fn, mesh):
    """Per device: route its groups, dispatch, scale, combine; with vjp w.r.t. x."""

    def local(x, logits):
        plan = routing.tokens_choose(logits, k=2, capacity=3)
        slots, vjp_d = jax.vjp(lambda x: dispatch_fn(x, plan), x)
        y, vjp_c = jax.vjp(lambda o, w: combine_fn(o, plan.replace(token_weight=w)), 2.0 * slots, plan.token_weight)
        dout, dw = vjp_c(y)
        return y, vjp_d(dout)[0], dw

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data")))


def test_inside_shard_map_equals_gather():
    """On GPU the compiled kernels run per device; off GPU Pallas's interpreter cannot
    run under shard_map's check_vma (jax 0.10), so the kernels' references do."""
    n = min(4, len(jax.devices()))
    mesh = jax.make_mesh((n,), ("data",))
    rng = np.random.default_rng(3)
    x = jax.device_put(jnp.asarray(rng.normal(size=(4, 8, 6)), jnp.float32), NamedSharding(mesh, P("data")))
    logits = jax.device_put(jnp.asarray(rng.normal(size=(4, 8, 4)), jnp.float32), NamedSharding(mesh, P("data")))
    got = _sharded_dispatch_combine(pallas_dispatch, pallas_combine, mesh)(x, logits)
    want = _sharded_dispatch_combine(dispatch_lib.gather_dispatch, dispatch_lib.gather_combine, mesh)(x, logits)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_lowers_to_triton_inside_shard_map():
    """The compiled path under shard_map: outputs declare how they vary over the mesh."""
    mesh = jax.make_mesh((min(4, len(jax.devices())),), ("data",))
    cfg = kernels.KernelConfig(interpret=False)
    fn = _sharded_dispatch_combine(
        functools.partial(pallas_dispatch, config=cfg), functools.partial(pallas_combine, config=cfg), mesh
    )
    spec = NamedSharding(mesh, P("data"))
    x = jax.ShapeDtypeStruct((4, 64, 100), jnp.bfloat16, sharding=spec)
    logits = jax.ShapeDtypeStruct((4, 64, 4), jnp.float32, sharding=spec)
    text = _lower_for_cuda(fn.trace(x, logits))
    assert "jmoe_gather_sum_rows" in text and "jmoe_gather_dot_rows" in text
