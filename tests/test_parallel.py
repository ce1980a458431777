"""Expert parallelism on 8 emulated CPU devices against the one-device layer.

Every check compares the layer on a mesh with the same layer (same seed, so the
same weights) on one device, on random inputs: output, every aux value, and the
gradients w.r.t. the input, the router weight and the expert weights. Several
checks share one compile (compiles dominate the CPU time).
"""

import re
from collections import Counter

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe import parallel
from jmoe.routing import NoisyTopK, TokensChoose

D_MODEL, D_FF = 16, 32


def make_moe(mesh=None, **kw):
    kw.setdefault("deterministic", True)
    return jmoe.MoE(D_MODEL, D_FF, rngs=nnx.Rngs(0, router=1), mesh=mesh, **kw)


def trace_on_mesh(mesh, x, **options):
    """The layer's forward traced on ``mesh``, never compiled, from an abstract
    layer (``nnx.eval_shape``: no eager init). Errors raised here are raised
    before compilation."""
    abstract = nnx.eval_shape(lambda: make_moe(mesh, **options))
    graphdef, state = nnx.split(abstract)
    return jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, x)


def _value_and_grads(moe, x, mask, r):
    """(traced) y, aux and d(loss)/d(x, router weight, [noise weight,] expert weights).

    loss = sum(y * r) + load_balancing_loss + z_loss + router_entropy
    + importance_loss + load_loss, so the gradients see the output and the aux losses.
    """

    def loss(model, x):
        y, aux = model(x, token_mask=mask)
        total = (jnp.sum(y * r) + aux["load_balancing_loss"] + aux["z_loss"] + aux["router_entropy"]
                 + aux["importance_loss"] + aux["load_loss"])
        return total, (y, aux)

    grad_fn = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, (y, aux)), (g_model, g_x) = grad_fn(moe, x)
    grads = {"x": g_x, "router_weight": g_model.router_weight[...]}
    if hasattr(g_model, "noise_weight"):
        grads["noise_weight"] = g_model.noise_weight[...]
    grads.update({f"experts.{name}": getattr(g_model.experts, name)[...]
                  for name in ("w_in", "w_gate", "w_out", "b_in", "b_out") if hasattr(g_model.experts, name)})
    return y, aux, grads


def values_and_grads(layers, x, mask, r):
    """:func:`_value_and_grads` of each layer on the same inputs, in one ``nnx.jit`` (one
    compile), fetched to the host."""

    @nnx.jit
    def run(layers, x):
        return [_value_and_grads(layer, x, mask, r) for layer in layers]

    return jax.device_get(run(layers, x))


def value_and_grads(moe, x, mask, r):
    """:func:`_value_and_grads` of one layer, one compile."""
    return jax.device_get(nnx.jit(_value_and_grads)(moe, x, mask, r))


def _rounds_apart(tree):
    """``tree`` without its aux dicts' ``exchange_rounds`` (how many rounds a mesh's exchange
    took: a property of the exchange, not of the function), and those values."""
    found = []

    def strip(node):
        if isinstance(node, dict):
            if "exchange_rounds" in node:
                found.append(int(np.asarray(node["exchange_rounds"])))
            return {k: strip(v) for k, v in node.items() if k != "exchange_rounds"}
        if isinstance(node, (tuple, list)):
            return type(node)(strip(v) for v in node)
        return node

    return strip(tree), found


def assert_tree_close(actual, expected, rtol=2e-5):
    """Same tree structure, and every leaf close in float64 (chex), with an absolute
    tolerance scaled by the leaf's largest magnitude. An aux dict's ``exchange_rounds``
    is compared apart: present on both sides, an integer >= 1 (a mesh may take more
    rounds than one device's 1)."""
    (actual, rounds_a), (expected, rounds_e) = _rounds_apart(actual), _rounds_apart(expected)
    assert len(rounds_a) == len(rounds_e) and all(r >= 1 for r in rounds_a + rounds_e), (rounds_a, rounds_e)
    chex.assert_trees_all_equal_structs(actual, expected)
    for (path, a), (_, e) in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves_with_path(expected)):
        e = np.asarray(e, np.float64)
        scale = 1.0 + np.max(np.abs(e), initial=0.0)
        try:
            chex.assert_trees_all_close(np.asarray(a, np.float64), e, rtol=rtol, atol=rtol * scale)
        except AssertionError as err:
            raise AssertionError(f"{jax.tree_util.keystr(path)}: {err}") from None


def inputs(key, batch, seq, with_mask):
    kx, kr, km = jax.random.split(jax.random.key(key), 3)
    x = jax.random.normal(kx, (batch, seq, D_MODEL))
    r = jax.random.normal(kr, (batch, seq, D_MODEL))
    mask = jax.random.bernoulli(km, 0.8, (batch, seq)) if with_mask else None
    return x, mask, r


# (mesh sizes, layer options, token mask): each case is one EP compile + one reference compile.
CASES = [
    pytest.param(dict(data=1, expert=8),
                 dict(num_experts=8, k=1, dispatch="einsum", capacity_factor=1.0), True, id="1x8-E8-k1-einsum-mask"),
    pytest.param(dict(data=2, expert=4),
                 dict(num_experts=16, k=2, dispatch="gather", activation="swiglu", use_bias=True,
                      deterministic=False, router=TokensChoose(jitter=0.1), capacity_factor=1.0), False, id="2x4-E16-k2-gather-jitter"),
    pytest.param(dict(data=4, expert=2),
                 dict(num_experts=16, k=2, dispatch="gather", router="experts_choose"), True,
                 id="4x2-E16-expertchoice-gather-mask"),
    pytest.param(dict(data=2, expert=2, model=2),
                 dict(num_experts=8, k=2, dispatch="einsum", use_bias=True,
                      router=TokensChoose(priority="token", batch_prioritized=True, normalize=True)), False, id="2x2x2model-E8-k2-einsum"),
]


@pytest.mark.parametrize("mesh_sizes, options, with_mask", CASES)
def test_matches_one_device(mesh_sizes, options, with_mask):
    mesh = parallel.make_mesh(**mesh_sizes)
    x, mask, r = inputs(0, batch=16, seq=8, with_mask=with_mask)
    expected = value_and_grads(make_moe(None, **options), x, mask, r)
    ep = make_moe(mesh, **options)
    parallel.shard_moe_params(ep, mesh)
    actual = value_and_grads(ep, x, mask, r)
    assert_tree_close(actual, expected)
    y, aux, _ = actual
    assert float(aux["dropped_fraction"]) > 0 or options.get("router") == "experts_choose"  # capacity binds
    assert float(np.sum(aux["tokens_per_expert"])) > 0


def test_ambient_mesh_and_user_sharding_metadata():
    """jax.set_mesh: the layer finds the mesh itself, and the user's own NNX
    parameters with ``out_sharding`` metadata land on the same mesh."""
    mesh = parallel.make_mesh(data=2, expert=4)
    with jax.set_mesh(mesh):
        proj = nnx.Linear(D_MODEL, D_MODEL, rngs=nnx.Rngs(3),
                          kernel_metadata={"out_sharding": (None, "expert")})
        assert proj.kernel[...].sharding.spec == jax.P(None, "expert")
        moe = make_moe(None, num_experts=8)  # no mesh= argument: the ambient mesh is used
        assert parallel.uses_mesh(parallel.resolve_mesh(moe.mesh_options.mesh))
    x, _, _ = inputs(1, batch=8, seq=8, with_mask=False)

    @nnx.jit
    def apply(moe, x):
        return moe(x)

    with jax.set_mesh(mesh):
        y_ep, aux_ep = apply(moe, x)
    y_ref, aux_ref = apply(make_moe(None, num_experts=8), x)
    assert_tree_close((y_ep, aux_ep), (y_ref, aux_ref))


def _collectives(hlo_text):
    return Counter(re.findall(r"\b(all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)(?:-start)?\(",
                              hlo_text))


@pytest.mark.parametrize("hierarchical", [False, True])
def test_hlo_one_all_to_all_each_way_and_no_weight_gather(hierarchical):
    """Forward: 1 all-to-all per direction (2 with the hierarchical exchange), no all-gather."""
    mesh = parallel.make_mesh(data=2, expert_outer=2, expert=2)
    moe = make_moe(mesh, num_experts=8, k=2, hierarchical_a2a=hierarchical)
    parallel.shard_moe_params(moe, mesh)
    graphdef, state = nnx.split(moe)
    x, _, _ = inputs(2, batch=16, seq=8, with_mask=False)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    ops = _collectives(forward.lower(state, x).compile().as_text())
    assert ops["all-to-all"] == (4 if hierarchical else 2), ops
    assert ops["all-gather"] == 0, ops


def test_hierarchical_and_chunks_match_flat():
    """Flat, hierarchical, and hierarchical with a2a_chunks=2: one compile, same results."""
    mesh = parallel.make_mesh(data=2, expert_outer=2, expert=2)
    options = dict(num_experts=16, k=2, dispatch="gather", capacity_factor=2.0)  # C = 2*2*8/16 = 2
    layers = [make_moe(mesh, **options),
              make_moe(mesh, hierarchical_a2a=True, **options),
              make_moe(mesh, hierarchical_a2a=True, a2a_chunks=2, **options)]
    assert layers[0].capacity(8) == 2
    x, _, r = inputs(3, batch=16, seq=8, with_mask=False)

    @nnx.jit
    def all_three(layers, x):
        def loss(layer, x):
            y, aux = layer(x)
            return jnp.sum(y * r) + aux["load_balancing_loss"], (y, aux)

        return [nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x) for layer in layers]

    results = jax.device_get([(y, aux, nnx.state(g_model, nnx.Param), g_x)
                              for (_, (y, aux)), (g_model, g_x) in all_three(layers, x)])
    assert_tree_close(results[1], results[0])
    assert_tree_close(results[2], results[0])


def test_a2a_chunks_must_divide_capacity():
    mesh = parallel.make_mesh(expert=8)
    x, _, _ = inputs(4, batch=8, seq=8, with_mask=False)
    with pytest.raises(ValueError, match="a2a_chunks=2 must divide the capacity C=3"):
        trace_on_mesh(mesh, x, num_experts=8, eval_capacity_factor=3.0, a2a_chunks=2)  # C = 3 (eval mode)


# ---------------------------------------------------------------- errors, before compilation


def test_experts_not_divisible_by_expert_axis():
    mesh = parallel.make_mesh(data=2, expert=4)
    x, _, _ = inputs(5, batch=8, seq=8, with_mask=False)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the expert-parallel size"):
        trace_on_mesh(mesh, x, num_experts=6)


def test_groups_not_divisible_by_token_shards():
    mesh = parallel.make_mesh(data=2, expert=4)
    x, _, _ = inputs(6, batch=6, seq=8, with_mask=False)
    with pytest.raises(ValueError, match=r"G=6 .* not divisible by \|data\| x (\|expert_outer\| x )?\|expert\| = 8"):
        trace_on_mesh(mesh, x, num_experts=8)


def test_hierarchical_needs_expert_outer():
    mesh = parallel.make_mesh(expert=8)
    x, _, _ = inputs(7, batch=8, seq=8, with_mask=False)
    with pytest.raises(ValueError, match="expert_outer"):
        trace_on_mesh(mesh, x, num_experts=8, hierarchical_a2a=True)


def test_fewer_experts_than_devices_with_model_axis_is_accepted():
    """E=4 on 8 devices: expert=4, model=2 is supported (checked without compiling)."""
    mesh = parallel.make_mesh(expert=4, model=2)
    x, _, _ = inputs(8, batch=4, seq=8, with_mask=False)
    y, _ = trace_on_mesh(mesh, x, num_experts=4)
    assert y.shape == x.shape


# ---------------------------------------------------------------- meshes


def test_make_mesh_shapes():
    assert dict(parallel.make_mesh().shape) == {"data": 1, "expert": 8, "model": 1}
    assert dict(parallel.make_mesh(expert=4).shape) == {"data": 2, "expert": 4, "model": 1}
    assert dict(parallel.make_mesh(data=4).shape) == {"data": 4, "expert": 2, "model": 1}
    assert dict(parallel.make_mesh(expert=2, model=2).shape) == {"data": 2, "expert": 2, "model": 2}
    mesh = parallel.make_mesh(expert_outer=2, expert=2)
    assert mesh.axis_names == ("data", "expert_outer", "expert", "model")
    assert dict(mesh.shape) == {"data": 2, "expert_outer": 2, "expert": 2, "model": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(parallel.make_mesh(expert=2, devices=jax.devices()[:2]).shape)["expert"] == 2


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="does not match the 8 devices"):
        parallel.make_mesh(data=2, expert=2)
    with pytest.raises(ValueError, match="cannot be split"):
        parallel.make_mesh(expert=3)
    with pytest.raises(ValueError, match="size >= 1"):
        parallel.make_mesh(expert=0)


def test_no_mesh_or_trivial_mesh_keeps_one_device_path():
    assert not parallel.uses_mesh(None)
    assert not parallel.uses_mesh(parallel.make_mesh(data=8, expert=1))
    assert parallel.expert_parallel_size(parallel.make_mesh(expert_outer=2, expert=4)) == 8


def test_random_second_expert_policy_with_jitter_matches_one_device():
    """GShard's random 2nd-expert policy in train mode (with jitter) on a 2x4 mesh: its
    U[0, 1) draws are made over the global [G, S] and sharded, so output, aux and gradients
    equal one device's with the same keys."""
    mesh = parallel.make_mesh(data=2, expert=4)
    options = dict(num_experts=8, k=2, dispatch="gather", router=TokensChoose(second_expert_policy="random", jitter=0.1),
                   deterministic=False, capacity_factor=1.0)
    x, mask, r = inputs(9, batch=16, seq=8, with_mask=True)
    ref, ep = make_moe(None, **options), make_moe(mesh, **options)
    parallel.shard_moe_params(ep, mesh)

    expected, actual = values_and_grads([ref, ep], x, mask, r)
    assert_tree_close(actual, expected)
    # the policy really dropped some 2nd choices: fewer slots taken than k per valid token
    assert float(np.sum(expected[1]["tokens_per_expert"])) < 2 * int(np.sum(mask))


def test_noisy_top_k_matches_one_device_eval_and_train():
    """noisy_top_k on a 2x4 mesh (E=8, k=2, jitter, token mask) against one device, in eval mode
    and in train mode (jitter and the noise eps drawn over the global batch from the one-device
    keys): output, aux (importance / load losses: CV^2 of the psum of the per-device vectors)
    and gradients w.r.t. x, the router weight, the noise weight and the expert weights.
    The four layers share one compile."""
    mesh = parallel.make_mesh(data=2, expert=4)
    options = dict(num_experts=8, k=2, router=NoisyTopK(jitter=0.1), dispatch="gather",
                   capacity_factor=1.0, eval_capacity_factor=1.0)
    x, mask, r = inputs(10, batch=16, seq=8, with_mask=True)
    noise_w = 0.5 * jax.random.normal(jax.random.key(11), (D_MODEL, 8))  # W_noise is 0 at init
    layers = []
    for layer_mesh in (None, mesh):
        for deterministic in (True, False):
            layer = make_moe(layer_mesh, deterministic=deterministic, **options)
            layer.noise_weight[...] = noise_w
            if layer_mesh is not None:
                parallel.shard_moe_params(layer, mesh)
            layers.append(layer)

    ref_eval, ref_train, ep_eval, ep_train = values_and_grads(layers, x, mask, r)
    assert_tree_close(ep_eval, ref_eval)
    assert_tree_close(ep_train, ref_train)
    assert not np.allclose(ref_train[0], ref_eval[0])  # train mode is noisy
    for _, aux, grads in (ref_eval, ref_train):
        assert float(aux["importance_loss"]) > 0 and float(aux["load_loss"]) > 0
        assert float(aux["dropped_fraction"]) > 0  # capacity binds
        assert float(np.max(np.abs(grads["noise_weight"]))) > 0


def test_model_axis_without_expert_axis_traces():
    """expert=1, model=2: experts replicated, hidden dim split; no exchange (traced, not compiled)."""
    mesh = parallel.make_mesh(data=4, expert=1, model=2)
    x, _, _ = inputs(11, batch=8, seq=8, with_mask=False)
    y, _ = trace_on_mesh(mesh, x, num_experts=8)
    assert y.shape == x.shape


@pytest.mark.parametrize("dropless", [False, True])
def test_explicit_mesh_given_as_argument_needs_no_set_mesh(dropless):
    """``mesh=jax.make_mesh(...)`` (explicit axes) with no ``jax.set_mesh`` around creation
    or the call: the layer places its inputs on that mesh itself and equals one device."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "expert", "model"))
    options = dict(num_experts=8, k=2, capacity_factor=None if dropless else 1.0)
    x, mask, r = inputs(3, batch=8, seq=8, with_mask=True)
    expected = value_and_grads(make_moe(None, **options), x, mask, r)
    actual = value_and_grads(make_moe(mesh, **options), x, mask, r)
    assert_tree_close(actual, expected)


@pytest.mark.parametrize("dropless", [False, True])
def test_input_sharded_on_an_explicit_mesh_without_set_mesh(dropless):
    """No ``mesh=`` and no ``jax.set_mesh``: x placed on an explicit data mesh with
    ``jax.device_put`` carries its mesh in its type; the layer runs on that mesh (it failed
    in the routing scatter on the one-device path) and equals one device."""
    mesh = jax.make_mesh((8,), ("data",))
    options = dict(num_experts=8, k=2, capacity_factor=None if dropless else 1.0)
    x, mask, r = inputs(4, batch=8, seq=8, with_mask=False)
    expected = value_and_grads(make_moe(None, **options), x, mask, r)
    put = lambda a: jax.device_put(a, jax.NamedSharding(mesh, jax.P("data")))  # noqa: E731
    actual = value_and_grads(make_moe(None, **options), put(x), mask, put(r))
    assert_tree_close(actual, expected)
    assert actual[0].shape == x.shape
