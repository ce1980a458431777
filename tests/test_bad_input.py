"""Bad input gives a clear error or a well-defined result, never a silent wrong one (issue 15)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe import parallel, routing
from jmoe.options import layer_arguments


def layer(**kw):
    if "num_experts_on_mesh" in kw:  # the mesh is known at construction: its sizes are checked there
        return jmoe.MoE(8, 16, kw.pop("num_experts_on_mesh"), mesh=parallel.make_mesh(expert=4), rngs=nnx.Rngs(0))
    return jmoe.MoE(8, 16, 4, rngs=nnx.Rngs(0), **layer_arguments(kw))  # flat keys, as a config's


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=1.5), "k=1.5"),
        (dict(dtype="bogus"), "dtype"),
        (dict(param_dtype=jnp.int32), "param_dtype"),
        (dict(capacity_factor=float("inf")), "capacity_factor"),
        (dict(eval_capacity_factor=float("nan")), "eval_capacity_factor"),
        (dict(min_capacity=1.5), "min_capacity"),
        (dict(capacity_multiple_of=0), "capacity_multiple_of"),
        (dict(a2a_chunks=0), "a2a_chunks"),
        (dict(grouped_matmul="cublas"), "grouped_matmul"),
        (dict(dropless_exchange="smoke"), "dropless_exchange"),
        (dict(router="experts_choose", normalize=True), "normalize=True needs router='tokens_choose'"),
        (dict(router="noisy_top_k", importance_loss_weight=float("inf")), "importance_loss_weight"),
        (dict(capacity_factor=None, dropless_buffer_factor=float("inf")), "buffer_factor must be finite"),
        (dict(num_experts_on_mesh=6), "num_experts=6 is not divisible"),
        (dict(expert_axes="expert"), "expert_axes must be a tuple"),
    ],
)
def test_bad_layer_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layer(**kwargs)


@pytest.mark.parametrize("name, value", [("d_model", 0), ("d_ff", 0), ("num_experts", 0), ("d_model", 2.5)])
def test_bad_sizes_name_the_argument(name, value):
    sizes = dict(d_model=8, d_ff=16, num_experts=4) | {name: value}
    with pytest.raises(ValueError, match=name):
        jmoe.MoE(sizes["d_model"], sizes["d_ff"], sizes["num_experts"], rngs=nnx.Rngs(0))


def test_expert_capacity_rejects_non_integers_and_infinite_factors():
    with pytest.raises(ValueError, match="multiple_of"):
        routing.expert_capacity(8, 4, multiple_of=2.5)
    with pytest.raises(ValueError, match="tokens_per_group"):
        routing.expert_capacity(8.0, 4)
    with pytest.raises(ValueError, match="capacity_factor"):
        routing.expert_capacity(8, 4, capacity_factor=float("inf"))


def test_huge_capacity_factor_is_clamped_to_what_a_group_can_fill():
    """C = min(ceil(k f S / E), S rounded up to multiple_of): 1e9 gives S, and the layer runs
    (dropping nothing) as with the smallest factor that holds every token."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    huge = layer(k=2, capacity_factor=1e9)
    assert huge.capacity(6) == 6
    assert layer(k=2, capacity_factor=1e9, capacity_multiple_of=4).capacity(6) == 8
    exact = layer(k=2, capacity_factor=2.0)  # C = 2 * 2 * 6 / 4 = 6 = S
    assert exact.capacity(6) == 6
    (y_huge, aux_huge), (y_exact, _) = huge(x), exact(x)
    np.testing.assert_allclose(y_huge, y_exact, rtol=1e-6)
    assert float(aux_huge["dropped_fraction"]) == 0.0


def test_integer_input_empty_batch_and_float_mask_are_errors():
    moe = layer()
    with pytest.raises(ValueError, match="floating point, got int32"):
        moe(jnp.ones((2, 4, 8), jnp.int32))
    with pytest.raises(ValueError, match="no tokens"):
        moe(jnp.ones((0, 4, 8)))
    with pytest.raises(ValueError, match="token_mask must be boolean"):
        moe(jnp.ones((2, 4, 8)), token_mask=jnp.full((2, 4), 0.5))


@pytest.mark.parametrize("backend", ["einsum", "gather", "pallas"])
def test_nan_stays_with_its_token_for_every_backend(backend):
    """A NaN in one token's input: that token's output is NaN, every other token's output
    equals the gather backend's on the same input (finite), for every backend."""
    x = jax.random.normal(jax.random.key(1), (2, 8, 8)).at[0, 3, 5].set(jnp.nan)
    kw = dict(k=2, capacity_factor=4.0, eval_capacity_factor=4.0, deterministic=True)
    y, _ = layer(dispatch=backend, **kw)(x)
    want, _ = layer(dispatch="gather", **kw)(x)
    y, want = np.asarray(y), np.asarray(want)
    bad = np.isnan(y).any(-1)
    assert bad[0, 3] and bad.sum() == 1, f"NaN reached tokens {np.argwhere(bad).tolist()}"
    np.testing.assert_allclose(y[~bad], want[~bad], rtol=1e-5, atol=1e-6)


def test_inf_in_an_expert_slot_stays_with_its_tokens_in_einsum_combine():
    """The einsum combine keeps +inf / -inf / NaN of a slot to the tokens combining it."""
    from jmoe import dispatch

    logits = jax.random.normal(jax.random.key(2), (1, 6, 3))
    plan = routing.tokens_choose(logits, k=1, capacity=6)
    out = jax.random.normal(jax.random.key(3), (3, 6, 4))
    e, c = int(plan.token_expert[0, 2, 0]), int(plan.token_slot[0, 2, 0])
    out = out.at[e, c, 0].set(jnp.inf).at[e, c, 1].set(jnp.nan)
    got = np.asarray(dispatch.einsum_combine(out, plan))
    want = np.asarray(dispatch.gather_combine(out, plan))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-6)
    assert np.isinf(got[0, 2, 0]) and np.isnan(got[0, 2, 1]) and np.isfinite(np.delete(got[0], 2, 0)).all()


@pytest.mark.parametrize("router", ["tokens_choose", "noisy_top_k", "experts_choose"])
def test_masked_nan_reaches_no_output_loss_or_gradient(router):
    """A NaN in a masked-out token: outputs, every aux value and every gradient are finite,
    and equal the run where that token holds zeros instead."""
    x = jax.random.normal(jax.random.key(4), (2, 8, 8))
    mask = jnp.ones((2, 8), bool).at[1, 6].set(False)
    def run(x):  # a fresh layer each time: the same weights and the same train-mode draws
        moe = layer(k=2, router=router)

        def loss(model, x):
            y, aux = model(x, token_mask=mask)
            return jnp.sum(y) + sum(v.sum() for v in aux.values()), (y, aux)

        (_, (y, aux)), grads = nnx.value_and_grad(loss, has_aux=True)(moe, x)
        return y, aux, nnx.state(grads)

    poisoned = run(x.at[1, 6].set(jnp.nan))
    clean = run(x.at[1, 6].set(0.0))
    for leaf in jax.tree.leaves(poisoned):
        assert np.isfinite(np.asarray(leaf)).all()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), poisoned, clean)


def test_indivisible_experts_and_stacked_layers_in_the_placement_rule():
    mesh = parallel.make_mesh(data=2, expert=4)
    path = ("blocks", "ffn", "experts", "w_in")
    assert parallel.moe_param_spec(path, mesh, (3, 8, 16, 32)) == jax.P(None, ("expert",), None, None)
    assert parallel.moe_param_spec(path, mesh, (8, 16, 32)) == jax.P(("expert",), None, None)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
        parallel.moe_param_spec(path, mesh, (6, 16, 32))
    with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
        parallel.shard_moe_params(jmoe.MoE(8, 16, 6, rngs=nnx.Rngs(0)), mesh)


def test_an_infinite_entry_keeps_its_sign_through_einsum_dispatch_and_combine():
    """+inf and -inf entries in one token's input (dispatch) and in one slot's expert output
    (combine): the einsum backend gives exactly the gather backend's values, signs included,
    and nothing non-finite reaches another token."""
    from jmoe import dispatch

    logits = jax.random.normal(jax.random.key(4), (1, 6, 3))
    plan = routing.tokens_choose(logits, k=1, capacity=6)
    x = jax.random.normal(jax.random.key(5), (1, 6, 4))
    x = x.at[0, 2, 0].set(jnp.inf).at[0, 2, 1].set(-jnp.inf).at[0, 4, 3].set(-jnp.inf)
    got, want = np.asarray(dispatch.einsum_dispatch(x, plan)), np.asarray(dispatch.gather_dispatch(x, plan))
    np.testing.assert_array_equal(got, want)  # equal arrays: every inf with its sign
    assert (got == jnp.inf).sum() == 1 and (got == -jnp.inf).sum() == 2

    out = jax.random.normal(jax.random.key(6), (3, 6, 4))
    e, c = int(plan.token_expert[0, 2, 0]), int(plan.token_slot[0, 2, 0])
    out = out.at[e, c, 0].set(jnp.inf).at[e, c, 1].set(-jnp.inf)
    got, want = np.asarray(dispatch.einsum_combine(out, plan)), np.asarray(dispatch.gather_combine(out, plan))
    assert got[0, 2, 0] == jnp.inf and got[0, 2, 1] == -jnp.inf
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_array_equal(got[~np.isfinite(want)], want[~np.isfinite(want)])
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)
