"""Dropless expert parallelism (count exchange + padded all-to-all each way) against
the one-device dropless layer, on 8 emulated CPU devices: output, aux, and gradients
w.r.t. the input, the router weight and the expert weights."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmoe import parallel
from tests.test_parallel import (D_MODEL, _collectives, _value_and_grads, assert_tree_close, inputs, make_moe,
                                 trace_on_mesh)


def skewed(layer, x):
    """Router weight with a strong pull to experts 4 and 5 (both on one device of a 4-way
    expert axis) for the tokens of the first half of the batch (offset by +1 in every
    dim): those tokens' devices send all their assignments to one device, the padded
    buffer's worst case."""
    w = 0.3 * jax.random.normal(jax.random.key(21), (D_MODEL, layer.num_experts))
    layer.router_weight[...] = w.at[:, 4].add(1.0).at[:, 5].add(0.9)
    x = x.at[: x.shape[0] // 2].add(1.0)
    return x, w.at[:, 4].add(1.0).at[:, 5].add(0.9)


CASES = [
    # 2x4, E=8, k=2, swiglu + biases, token mask, skewed router (worst-case buffer).
    pytest.param(dict(data=2, expert=4), dict(num_experts=8, k=2, activation="swiglu", use_bias=True),
                 True, True, id="2x4-E8-k2-swiglu-bias-mask-skewed"),
    # 1x8, E=8, k=1, gelu, train mode with jitter.
    pytest.param(dict(data=1, expert=8), dict(num_experts=8, k=1, deterministic=False, jitter=0.1),
                 False, False, id="1x8-E8-k1-jitter"),
    # 2x2 expert x 2 model: hidden dim split, psum over model.
    pytest.param(dict(data=2, expert=2, model=2), dict(num_experts=8, k=2, use_bias=True, normalize=True),
                 False, True, id="2x2x2model-E8-k2-bias-skewed"),
]


@pytest.mark.parametrize("mesh_sizes, options, with_mask, skew", CASES)
def test_dropless_on_mesh_matches_one_device(mesh_sizes, options, with_mask, skew):
    mesh = parallel.make_mesh(**mesh_sizes)
    x, mask, r = inputs(20, batch=16, seq=8, with_mask=with_mask)
    ref = make_moe(None, capacity_factor=None, **options)
    ep = make_moe(mesh, capacity_factor=None, **options)
    if skew:
        x, w = skewed(ref, x)
        ep.router_weight[...] = w
    parallel.shard_moe_params(ep, mesh)

    @nnx.jit
    def both(ref, ep, x):
        return [_value_and_grads(layer, x, mask, r) for layer in (ref, ep)]

    expected, actual = jax.device_get(both(ref, ep, x))
    assert_tree_close(actual, expected)
    _, aux, grads = actual
    assert float(aux["dropped_fraction"]) == 0.0 and float(aux["padding_fraction"]) == 0.0
    valid = 16 * 8 if mask is None else int(np.sum(mask))
    np.testing.assert_allclose(np.sum(aux["tokens_per_expert"]), valid * options["k"])
    assert float(np.max(np.abs(grads["experts.w_in"]))) > 0
    if skew:
        # The first 4 token shards (64 tokens) send every assignment to experts 4, 5 (one device
        # when expert=4): the exchange's worst case is exercised.
        logits = np.asarray(x.reshape(-1, D_MODEL) @ w)[:64]
        top = np.argsort(-logits, axis=-1)[:, : options["k"]]
        assert set(np.unique(top)) <= {4, 5}, np.unique(top)
        tpe = np.asarray(aux["tokens_per_expert"])
        assert tpe[4] + tpe[5] > 0.6 * tpe.sum()


_BYTES = {"f32": 4, "s32": 4, "bf16": 2}


def _a2a_bytes(hlo_text):
    """Per all-to-all in compiled HLO text: (element type, bytes of its result on one device).
    XLA's CPU all-to-all is a tuple of n per-peer blocks: their bytes are summed."""
    found = []
    for line in hlo_text.splitlines():
        match = re.search(r"=\s*(.*?)\s+all-to-all(?:-start)?\(", line)
        if match:
            shapes = re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))
            total = sum(_BYTES[t] * int(np.prod([int(v) for v in dims.split(",") if v])) for t, dims in shapes)
            found.append((shapes[0][0], total))
    return found


def test_dropless_hlo_count_and_data_exchanges_no_weight_gather():
    """Forward: 3 all-to-alls (counts [n, E_l] int32, data out, data home: [n, A, d] each),
    no all-gather. The padded buffer (A = T_l * K rows per destination) against the capacity
    path with C = group size (what a dropless layer on a mesh used before): [E, G_l * S, d]."""
    mesh = parallel.make_mesh(data=2, expert=4)  # n = 4, 8 token shards
    x, _, _ = inputs(22, batch=16, seq=8, with_mask=False)  # G_l = 2, S = 8, T_l = 16
    num_experts, k, d = 16, 2, D_MODEL
    texts = {}
    for name, cf in (("dropless", None), ("capacity", 8.0)):
        moe = make_moe(mesh, num_experts=num_experts, k=k, capacity_factor=cf, eval_capacity_factor=8.0)
        if cf is not None:
            assert moe.capacity(8) == 8  # C = S
        parallel.shard_moe_params(moe, mesh)
        graphdef, state = nnx.split(moe)
        forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
        texts[name] = forward.lower(state, x).compile().as_text()
    ops = _collectives(texts["dropless"])
    assert ops["all-to-all"] == 3, ops
    assert ops["all-gather"] == 0, ops
    n, e_l, a = 4, num_experts // 4, 16 * k
    dropless_a2a = _a2a_bytes(texts["dropless"])
    assert sorted(dropless_a2a) == sorted([("s32", 4 * n * e_l), ("f32", 4 * n * a * d), ("f32", 4 * n * a * d)])
    capacity_a2a = _a2a_bytes(texts["capacity"])
    assert capacity_a2a == [("f32", 4 * num_experts * 2 * 8 * d)] * 2, capacity_a2a
    print(f"per-device all-to-all bytes: dropless {dropless_a2a}, capacity C=S {capacity_a2a}")


def test_dropless_rejects_hierarchical_and_chunks():
    mesh = parallel.make_mesh(data=2, expert_outer=2, expert=2)
    x, _, _ = inputs(23, batch=8, seq=8, with_mask=False)
    for options in (dict(hierarchical_a2a=True), dict(a2a_chunks=2)):
        with pytest.raises(ValueError, match="dropless .* supports neither hierarchical_a2a nor a2a_chunks"):
            trace_on_mesh(mesh, x, num_experts=8, capacity_factor=None, **options)
