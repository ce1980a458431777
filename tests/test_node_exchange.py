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


@pytest.mark.parametrize("exchange", ["padded", "ragged"])
def test_node_exchange_equals_one_device(exchange):
    """Random routing (E = 16, k = 4, a token mask) on 2 nodes x 4 devices, c = 1.25; then
    every token's experts on device 0 at c = 1.0 (rounds >= 2): values, every aux value and
    every gradient equal one device, nothing dropped."""
    mesh = parallel.make_mesh(expert_outer=2, expert=4)
    x, mask, r = inputs(31, batch=16, seq=8, with_mask=True)
    options = dict(num_experts=16, k=4, capacity_factor=None, activation="swiglu", use_bias=True)
    ref = make_moe(None, **options)
    ep = make_moe(mesh, hierarchical_a2a=True, dropless_exchange=exchange, dropless_buffer_factor=1.25, **options)
    ep.router_weight[...] = ref.router_weight[...]
    parallel.shard_moe_params(ep, mesh)
    expected, actual = values_and_grads([ref, ep], x, mask, r)
    assert_tree_close(actual, expected)
    assert float(actual[1]["dropped_fraction"]) == 0.0

    adv = make_moe(mesh, hierarchical_a2a=True, dropless_exchange=exchange, dropless_buffer_factor=1.0, **options)
    x_adv, w = adversarial(ref, x)
    adv.router_weight[...] = w
    parallel.shard_moe_params(adv, mesh)
    expected, actual = values_and_grads([ref, adv], x_adv, mask, r)
    assert_tree_close(actual, expected)
    assert float(actual[1]["dropped_fraction"]) == 0.0
    assert int(actual[1]["exchange_rounds"]) >= 2
