"""The dropless node exchange (``hierarchical_a2a=True`` on ``expert_outer`` x ``expert``):
one row per (token, destination node) across the outer axis, the node's experts combined
on its gateway; against the one-device dropless layer (values, aux, every gradient) on 8
emulated CPU devices, and its pieces by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import parallel
from jmoe.parallel.node_exchange import node_rows
from jmoe.parallel.row_exchanges import fit_to_buffer
from tests.test_dropless_parallel import adversarial
from tests.test_parallel import assert_tree_close, inputs, make_moe, values_and_grads


@pytest.mark.parametrize("exchange, mesh_sizes", [("padded", dict(expert_outer=2, expert=4)),
                                                   ("ragged", dict(expert_outer=2, expert=2, model=2))],
                         ids=["padded-2x4", "ragged-2x2x2model"])
def test_node_exchange_equals_one_device(exchange, mesh_sizes):
    """Random routing (E = 16, k = 4, a token mask) on 2 nodes x 4 devices (or 2 x 2, each
    expert's hidden dim split over ``model``), c = 1.25; then (padded) every token's experts on
    device 0 at c = 1.0 (rounds >= 2): values, every aux value and every gradient equal one
    device, nothing dropped."""
    mesh = parallel.make_mesh(**mesh_sizes)
    x, mask, r = inputs(31, batch=16, seq=8, with_mask=True)
    options = dict(num_experts=16, k=4, capacity_factor=None, activation="swiglu", use_bias=True)
    ref = make_moe(None, **options)
    ep = make_moe(mesh, hierarchical_a2a=True, dropless_exchange=exchange, dropless_buffer_factor=1.25, **options)
    ep.router_weight[...] = ref.router_weight[...]
    parallel.shard_moe_params(ep, mesh)
    expected, actual = values_and_grads([ref, ep], x, mask, r)
    assert_tree_close(actual, expected)
    assert float(actual[1]["dropped_fraction"]) == 0.0
    if exchange == "ragged":  # the adversarial rounds once (a compile each: the suite's time)
        return

    adv = make_moe(mesh, hierarchical_a2a=True, dropless_exchange=exchange, dropless_buffer_factor=1.0, **options)
    x_adv, w = adversarial(ref, x)
    adv.router_weight[...] = w
    parallel.shard_moe_params(adv, mesh)
    expected, actual = values_and_grads([ref, adv], x_adv, mask, r)
    assert_tree_close(actual, expected)
    assert float(actual[1]["dropped_fraction"]) == 0.0
    assert int(actual[1]["exchange_rounds"]) >= 2


def test_node_rows_hand_example():
    """4 experts per node: token 0's experts 1, 2 (node 0) and 9 (node 2) -> 2 rows, costs
    2 and 1; token 1: experts 5, 4, 7 (all node 1) -> 1 row of cost 3; token 2: experts 0
    and 3 (node 0) -> 1 row of cost 2, and nothing for its weight-0 choice (node 3)."""
    expert = jnp.array([[1, 9, 2], [5, 4, 7], [0, 13, 3]], jnp.int32)
    weight = jnp.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2], [0.7, 0.0, 0.3]], jnp.float32)
    node, cost, first = node_rows(expert, weight, 4)
    np.testing.assert_array_equal(node, [[0, 2, 0], [1, 1, 1], [0, 3, 0]])
    np.testing.assert_array_equal(first, [[True, True, False], [True, False, False], [True, False, False]])
    np.testing.assert_array_equal(np.where(first, cost, 0), [[2, 1, 0], [3, 0, 0], [2, 0, 0]])
    assert int(jnp.sum(first)) == 4  # rows across the outer axis; a flat exchange sends 8


def test_fit_to_buffer_with_costs_hand_example():
    """A receiver takes 10 assignments; rows of class 0 cost 1, class 1 cost 3. Sources send
    [4, 2] and [1, 3] rows (cost 10 + 10): level L = 3 keeps min(counts, L // cost) =
    [3, 1] and [1, 1] (cost 3 + 3 + 1 + 3 = 10): nothing is spare. With L = 4 it would
    be 4 + 3 + 1 + 3 = 11 > 10."""
    counts = jnp.array([[4, 2], [1, 3]], jnp.int32)  # [n_src, class]
    kept = fit_to_buffer(counts, 10, (1, 3))
    np.testing.assert_array_equal(kept, [[3, 1], [1, 1]])
    assert int(jnp.sum(kept * jnp.array([1, 3]))) <= 10
    kept = fit_to_buffer(counts, 12, (1, 3))  # L = 4: [4, 1], [1, 1] = 11; 1 spare: no cut chunk costs 1
    np.testing.assert_array_equal(kept, [[4, 1], [1, 1]])
    kept = fit_to_buffer(jnp.array([[0, 5]], jnp.int32), 3, (1, 3))  # one row of cost 3: the least progress
    np.testing.assert_array_equal(kept, [[0, 1]])
    np.testing.assert_array_equal(fit_to_buffer(counts, 8), fit_to_buffer(counts, 8, (1, 1)))


def test_node_exchange_drop_keeps_one_round_and_counts():
    """``dropless_overflow="drop"`` on the node exchange: one expert pass. Adversarial routing
    (all 256 assignments to experts 0, 1 on device 0) at c = 1.0 (A = 32 per device): device
    0 computes its R = 32 rows, so 224 / 256 are dropped (counted); c = 16 reaches both hops'
    worst cases: nothing dropped, equal to one device."""
    mesh = parallel.make_mesh(expert_outer=2, expert=4)
    x, mask, r = inputs(32, batch=16, seq=8, with_mask=False)
    options = dict(num_experts=16, k=2, capacity_factor=None)
    ref = make_moe(None, **options)
    x_adv, w = adversarial(ref, x)
    layers = [ref]
    for factor in (1.0, 16.0):
        ep = make_moe(mesh, hierarchical_a2a=True, dropless_overflow="drop", dropless_buffer_factor=factor, **options)
        ep.router_weight[...] = w
        parallel.shard_moe_params(ep, mesh)
        layers.append(ep)
    expected, tight, roomy = values_and_grads(layers, x_adv, mask, r)
    assert int(tight[1]["exchange_rounds"]) == 1 and int(roomy[1]["exchange_rounds"]) == 1
    assert float(tight[1]["dropped_fraction"]) == 224 / 256
    assert float(roomy[1]["dropped_fraction"]) == 0.0
    assert_tree_close(roomy, expected)


def test_node_exchange_hlo_buffers():
    """Forward on 2 nodes x 4 devices, T_l = 16, k = 4, c = 1.5 (A = 64): across nodes one
    all-to-all of cells [N_o, P1, d] each way (P1 = min(T_l, ceil(c A / N_o)) = 16: a source
    sends a node at most one row per token) and the rows' expert ids and weights [N_o, P1, K];
    within the node cells [n_i, P2, d] each way for the gateway's S = ceil(c A) = 96 slots
    (P2 = 96 / 4 = 24). The flat exchange moves [8, 16, d] each way, half of it across nodes."""
    from flax import nnx

    from tests.test_dropless_parallel import _a2a_bytes
    from tests.test_parallel import D_MODEL, _collectives

    mesh = parallel.make_mesh(expert_outer=2, expert=4)
    x, _, _ = inputs(33, batch=16, seq=8, with_mask=False)
    moe = make_moe(mesh, num_experts=16, k=4, capacity_factor=None, hierarchical_a2a=True, dropless_buffer_factor=1.5)
    parallel.shard_moe_params(moe, mesh)
    graphdef, state = nnx.split(moe)
    text = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x).compile().as_text()
    d, k = D_MODEL, 4
    assert _collectives(text)["all-to-all"] == 6
    expected = [("f32", 4 * 2 * 16 * d)] * 2 + [("f32", 4 * 2 * 16 * k), ("s32", 4 * 2 * 16 * k)]
    expected += [("f32", 4 * 4 * 24 * d)] * 2
    assert sorted(_a2a_bytes(text)) == sorted(expected)
