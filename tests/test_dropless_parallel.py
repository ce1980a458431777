"""Dropless expert parallelism (count exchange, then the rows each way: padded all-to-all or
ragged all-to-all) against the one-device dropless layer, on 8 emulated CPU devices: output,
aux, and gradients w.r.t. the input, the router weight and the expert weights. On CPU the
ragged exchange runs ``parallel.ragged_all_to_all_emulated`` (XLA:CPU has no ragged
all-to-all); on a GPU the one-device test below runs XLA's own op."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmoe import parallel, routing
from tests.test_parallel import (D_MODEL, _collectives, assert_tree_close, inputs, make_moe, trace_on_mesh,
                                 value_and_grads, values_and_grads)


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
    pytest.param(dict(data=1, expert=8),
                 dict(num_experts=8, k=1, deterministic=False, router=routing.TokensChoose(jitter=0.1)),
                 False, False, id="1x8-E8-k1-jitter"),
    # 2x2 expert x 2 model: hidden dim split, psum over model.
    pytest.param(dict(data=2, expert=2, model=2),
                 dict(num_experts=8, k=2, use_bias=True, router=routing.TokensChoose(normalize=True)),
                 False, True, id="2x2x2model-E8-k2-bias-skewed"),
    # The ragged exchange: worst-case skew with a mask, and the model axis.
    pytest.param(dict(data=2, expert=4), dict(num_experts=8, k=2, activation="swiglu", use_bias=True,
                                              dropless_exchange="ragged"),
                 True, True, id="ragged-2x4-E8-k2-swiglu-bias-mask-skewed"),
    pytest.param(dict(data=1, expert=4, model=2), dict(num_experts=16, k=2, dropless_exchange="ragged"),
                 False, False, id="ragged-1x4x2model-E16-k2"),
    # noisy top-k in train mode (eps drawn over the global batch) and GShard's random policy
    pytest.param(dict(data=2, expert=4), dict(num_experts=8, k=2, router="noisy_top_k", deterministic=False),
                 True, False, id="2x4-E8-k2-noisy-train-mask"),
    pytest.param(dict(data=2, expert=4),
                 dict(num_experts=8, k=2, router=routing.TokensChoose(second_expert_policy="random"),
                      deterministic=False, dropless_exchange="ragged"),
                 False, False, id="ragged-2x4-E8-gshard-random"),
    # jmoe's Pallas grouped matmul in the exchange (off GPU: its jnp reference inside shard_map).
    pytest.param(dict(data=2, expert=2, model=2),
                 dict(num_experts=8, k=2, dropless_exchange="ragged", grouped_matmul="pallas"),
                 False, True, id="ragged-pallas-gmm-2x2x2model-E8-k2-skewed"),
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

    expected, actual = values_and_grads([ref, ep], x, mask, r)
    assert_tree_close(actual, expected)
    _, aux, grads = actual
    assert float(aux["dropped_fraction"]) == 0.0 and float(aux["padding_fraction"]) == 0.0
    valid = 16 * 8 if mask is None else int(np.sum(mask))
    if getattr(options.get("router"), "second_expert_policy", "all") == "random":  # skipped 2nd choices hold none
        assert valid < np.sum(aux["tokens_per_expert"]) < valid * options["k"]
    else:
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
    """Forward: one all-gather of the counts [n, n, E_l] int32, then (in the rounds loop) 2
    all-to-alls of cells [n, P, d] (data out, data home), P = ceil(c * A / n) rounded up to 8
    (c = 1.25: 16 rows, half of A = T_l * K = 32, the worst case the padded exchange used to
    move per destination). The capacity path with C = group size: [E, G_l * S, d]."""
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
    assert ops["all-to-all"] == 2, ops
    assert ops["all-gather"] == 1, ops
    n, e_l, a = 4, num_experts // 4, 16 * k
    cell = parallel.exchange_sizes(a, n, parallel.DEFAULT_BUFFER_FACTOR, k=k, local_experts=e_l).cell_rows
    assert cell == 16 and cell < a
    dropless_a2a = _a2a_bytes(texts["dropless"])
    assert sorted(dropless_a2a) == sorted([("f32", 4 * n * cell * d), ("f32", 4 * n * cell * d)])
    capacity_a2a = _a2a_bytes(texts["capacity"])
    assert capacity_a2a == [("f32", 4 * num_experts * 2 * 8 * d)] * 2, capacity_a2a
    print(f"per-device all-to-all bytes: dropless {dropless_a2a}, capacity C=S {capacity_a2a}")


def test_dropless_rejects_chunks_and_hierarchical_without_two_expert_axes():
    mesh = parallel.make_mesh(data=2, expert_outer=2, expert=2)
    x, _, _ = inputs(23, batch=8, seq=8, with_mask=False)
    with pytest.raises(ValueError, match="dropless .* does not support a2a_chunks > 1"):
        trace_on_mesh(mesh, x, num_experts=8, capacity_factor=None, a2a_chunks=2)
    with pytest.raises(ValueError, match="hierarchical all-to-all needs two expert axes"):
        trace_on_mesh(parallel.make_mesh(data=2, expert=4), x, num_experts=8, capacity_factor=None,
                      hierarchical_a2a=True)


def _ragged_all_to_all_loop(operands, outputs, starts, sizes, targets):
    """numpy, one loop per (source, slice): the documented semantics of
    ``jax.lax.ragged_all_to_all`` over n devices (slice s goes to device s // (N / n))."""
    n, num_slices = starts.shape
    result = outputs.copy()
    for src in range(n):
        for s in range(num_slices):
            dst = s // (num_slices // n)
            a, b, t = starts[src, s], sizes[src, s], targets[src, s]
            result[dst, t : t + b] = operands[src, a : a + b]
    return result


def _run_emulated(mesh, operands, outputs, starts, sizes, targets, recv):
    spec = jax.sharding.PartitionSpec("expert")

    def local(op, out, io, ss, oo, rs):
        return parallel.ragged_all_to_all_emulated(op[0], out[0], io[0], ss[0], oo[0], rs[0], axis_name="expert")[None]

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec))
    put = lambda a: jax.device_put(jnp.asarray(a), jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
    return np.asarray(fn(*map(put, (operands, outputs, starts, sizes, targets, recv))))


def test_ragged_all_to_all_emulated_docstring_example():
    """The example of ``jax.lax.ragged_all_to_all``'s docstring, axis of size 2."""
    mesh = parallel.make_mesh(data=1, expert=2, devices=jax.devices()[:2])
    got = _run_emulated(
        mesh,
        np.array([[1.0, 2, 2], [3, 4, 0]]), np.zeros((2, 4)),
        np.array([[0, 1], [0, 1]], np.int32), np.array([[1, 2], [1, 1]], np.int32),
        np.array([[0, 0], [1, 2]], np.int32), np.array([[1, 1], [2, 1]], np.int32),
    )
    np.testing.assert_array_equal(got, [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_ragged_all_to_all_emulated_random():
    """4 devices, 2 slices per peer, random sizes and gaps: equals the loop over slices;
    rows of ``output`` nobody writes keep their (non-zero) values."""
    rng = np.random.default_rng(7)
    n, per_peer, rows_in, rows_out, d = 4, 2, 24, 40, 3
    num_slices = n * per_peer
    sizes = rng.integers(0, 3, size=(n, num_slices)).astype(np.int32)  # [src, slice]
    starts = np.zeros_like(sizes)
    for src in range(n):  # increasing, with random gaps, inside the operand
        starts[src] = np.cumsum(sizes[src] + rng.integers(0, 2, num_slices)) - sizes[src]
    assert starts.max() + sizes.max() <= rows_in
    targets = np.zeros_like(sizes)  # receiver dst packs its slices (by source, then slice) with gaps
    recv = np.zeros_like(sizes)  # [dst, src * per_peer + j]
    for dst in range(n):
        at = int(rng.integers(0, 3))
        for src in range(n):
            for j in range(per_peer):
                s = dst * per_peer + j
                targets[src, s] = at
                recv[dst, src * per_peer + j] = sizes[src, s]
                at += int(sizes[src, s]) + int(rng.integers(0, 2))
    assert at <= rows_out
    operands = rng.normal(size=(n, rows_in, d))
    outputs = rng.normal(size=(n, rows_out, d))
    mesh = parallel.make_mesh(data=1, expert=n, devices=jax.devices()[:n])
    got = _run_emulated(mesh, operands, outputs, starts, sizes, targets, recv)
    np.testing.assert_allclose(got, _ragged_all_to_all_loop(operands, outputs, starts, sizes, targets), rtol=1e-6)


def test_ragged_exchange_offsets_hand_example():
    """2 devices, 2 local experts each: counts_all[i, j, e] rows from i to expert e of j."""
    counts_all = jnp.array([[[1, 2], [0, 3]],   # device 0 sends 1, 2 to device 0's experts; 0, 3 to device 1's
                            [[2, 0], [1, 1]]])  # device 1
    off = parallel.ragged_exchange_offsets(counts_all, 1)
    send_in, send_sizes, send_out, recv_sizes = (np.asarray(v).tolist() for v in off["fwd"])
    assert send_in == [0, 2, 2, 3]  # device 1's rows, sorted by global expert: sizes 2, 0, 1, 1
    assert send_sizes == [2, 0, 1, 1]
    # On device 0 the rows land as (expert 0: src 0 [1 row], src 1 [2 rows]), (expert 1: src 0 [2], src 1 [0]);
    # on device 1: (expert 0: src 0 [0], src 1 [1]), (expert 1: src 0 [3], src 1 [1]).
    assert send_out == [1, 5, 0, 4]  # (dev 0, e1) from src 1 is empty: it would start after src 0's 2 rows
    assert recv_sizes == [0, 3, 1, 1]  # what device 1 receives, from (src 0: e0, e1), (src 1: e0, e1)
    assert np.asarray(off["group_sizes"]).tolist() == [1, 4]
    back_in, back_sizes, back_out, back_recv = (np.asarray(v).tolist() for v in off["back"])
    assert back_in == [0, 1, 0, 4] and back_sizes == [0, 3, 1, 1]
    assert back_out == [3, 3, 2, 3]  # where those rows sat in their senders' sorted buffers
    assert back_recv == [2, 0, 1, 1]


@pytest.mark.parametrize("exchange", ["ragged", "padded"])
def test_dropless_exchange_one_expert_device_matches_dropless(exchange):
    """A 1-device ``expert`` axis under shard_map: on a GPU this runs XLA's
    ``ragged_all_to_all`` itself (forward and its transpose in the gradient); the result
    equals :func:`jmoe.dropless.dropless_experts`."""
    from jmoe import dropless

    mesh = parallel.make_mesh(data=1, expert=1, devices=jax.devices()[:1])
    t, k, e, d, f = 24, 2, 4, 8, 16
    keys = jax.random.split(jax.random.key(31), 5)
    tokens = jax.random.normal(keys[0], (t, d))
    token_expert = jax.random.randint(keys[1], (t, k), 0, e).astype(jnp.int32).at[:, 0].set(0)  # expert 0: many
    token_expert = jnp.where(token_expert == 3, 2, token_expert)  # expert 3: none
    token_weight = jax.random.uniform(keys[2], (t, k))
    params = {"w_in": jax.random.normal(keys[3], (e, d, f)) / d**0.5, "w_out": jax.random.normal(keys[4], (e, f, d)) / f**0.5}
    cot = jax.random.normal(jax.random.key(32), (t, d))

    def on_mesh(tokens, params):
        rows, whole = jax.sharding.PartitionSpec("expert"), jax.sharding.PartitionSpec()
        fn = jax.shard_map(
            lambda x, te, tw, p: parallel.dropless_exchange_experts(
                x, te, tw, p, "gelu", num_experts=e, expert_axes=("expert",), expert_size=1, exchange=exchange)[0],
            mesh=mesh, in_specs=(rows, rows, rows, whole), out_specs=rows)
        return jnp.sum(fn(tokens, token_expert, token_weight, params) * cot)

    def reference(tokens, params):
        return jnp.sum(dropless.dropless_experts(tokens, token_expert, token_weight, params, "gelu") * cot)

    got = jax.jit(jax.value_and_grad(on_mesh, argnums=(0, 1)))(tokens, params)
    want = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))(tokens, params)
    assert_tree_close(got, want)
    assert float(jnp.max(jnp.abs(got[1][1]["w_in"][3]))) == 0.0  # expert 3 got no rows: zero gradient


def test_fit_to_buffer_hand_example():
    """counts[i, e] (2 sources, 2 local experts) = [[3, 1], [2, 4]]: each (source, expert)
    chunk keeps up to a common cap L, spare rows go to the first cut chunks in (expert,
    source) order."""
    counts = jnp.array([[3, 1], [2, 4]], jnp.int32)
    np.testing.assert_array_equal(parallel.fit_to_buffer(counts, 7), [[2, 1], [2, 2]])  # L = 2, no spare
    np.testing.assert_array_equal(parallel.fit_to_buffer(counts, 8), [[3, 1], [2, 2]])  # L = 2, 1 spare -> (0, 0)
    np.testing.assert_array_equal(parallel.fit_to_buffer(counts, 4), [[1, 1], [1, 1]])  # L = 1
    np.testing.assert_array_equal(parallel.fit_to_buffer(counts, 10), counts)  # everything fits
    np.testing.assert_array_equal(parallel.fit_to_buffer(counts, 0), [[0, 0], [0, 0]])
    # a hot expert (25 rows from each of 4 sources) before a cold one (1 row each), 32 rows:
    # the cold expert keeps all of its rows (a cut at the end of the layout would drop them)
    hot_cold = jnp.array([[25, 1]] * 4, jnp.int32)
    np.testing.assert_array_equal(parallel.fit_to_buffer(hot_cold, 32), [[7, 1]] * 4)
    assert parallel.receive_buffer_rows(30, 4, None) == 120
    assert parallel.receive_buffer_rows(30, 4, 1.0) == 32  # rounded up to 8
    assert parallel.receive_buffer_rows(30, 4, 1.3) == 40
    assert parallel.receive_buffer_rows(30, 4, 9.0) == 120  # never past the worst case
    with pytest.raises(ValueError, match=">= 1"):
        parallel.receive_buffer_rows(30, 4, 0.5)
    # A token sends at most min(K, E_l) rows to one device: T_l = 8 tokens, K = 4, n = 4.
    assert parallel.receive_buffer_rows(32, 4, None, k=4, local_experts=2) == 4 * 8 * 2
    assert parallel.receive_buffer_rows(32, 4, None, k=4, local_experts=8) == 4 * 8 * 4
    assert parallel.receive_buffer_rows(32, 4, 1.0, k=4, local_experts=2) == 32


@pytest.mark.parametrize("exchange", ["ragged", "padded"])
def test_worst_case_buffer_min_k_local_experts_is_reached_and_drops_nothing(exchange):
    """k = 4 > E_l = 2 on a 1 x 4 expert mesh; every token of every device puts its two
    best experts on device 0 (experts 0, 1): device 0 receives n * T_l * 2 rows, exactly the
    worst-case buffer n * T_l * min(K, E_l) (half of n * T_l * K). Nothing is dropped and
    the layer equals one device."""
    mesh = parallel.make_mesh(data=1, expert=4, devices=jax.devices()[:4])
    x, _, r = inputs(23, batch=8, seq=8, with_mask=False)
    options = dict(num_experts=8, k=4, capacity_factor=None, activation="swiglu")
    ref = make_moe(None, **options)
    w = 0.2 * jax.random.normal(jax.random.key(24), (D_MODEL, 8))
    w = w.at[:, 0].add(1.5).at[:, 1].add(1.4)
    ref.router_weight[...] = w
    x = x + 1.0  # every token: experts 0 and 1 first
    expected = value_and_grads(ref, x, None, r)
    ep = make_moe(mesh, dropless_exchange=exchange, **options)
    ep.router_weight[...] = w
    parallel.shard_moe_params(ep, mesh)
    actual = value_and_grads(ep, x, None, r)
    assert_tree_close(actual, expected)
    _, aux, _ = actual
    assert float(aux["dropped_fraction"]) == 0.0
    tokens = np.asarray(aux["tokens_per_expert"])
    assert tokens[0] == tokens[1] == x.shape[0] * x.shape[1]  # device 0: 2 rows from every token


def kept_by_buffer(token_expert, token_weight, *, data, expert, num_experts, buffer_rows, cell_rows=None):
    """numpy reference of one round of bounded buffers (``dropless_overflow="drop"``): [G, S, K]
    bool, True where the assignment is computed. Token shard s = data index * expert + expert
    index (the groups' sharding); within a data row, receiver j keeps ``fit_to_buffer`` rows
    of each (source, local expert) chunk out of ``buffer_rows`` (ragged), or, with
    ``cell_rows`` P (padded), each source's cell to j keeps ``fit_to_buffer`` of its own
    chunks out of P; a source keeps its first assignments (flat order t * K + k) for each
    expert."""
    te = np.asarray(token_expert).reshape(data * expert, -1)  # [shards, T_l * K]
    valid = np.asarray(token_weight).reshape(data * expert, -1) != 0
    e_l = num_experts // expert
    keep = np.zeros(te.shape, bool)
    for dd in range(data):
        shards = [dd * expert + i for i in range(expert)]
        for j in range(expert):
            counts = np.array([[np.sum(valid[s] & (te[s] == j * e_l + e)) for e in range(e_l)] for s in shards])
            if cell_rows is None:
                kept = np.asarray(parallel.fit_to_buffer(jnp.asarray(counts), buffer_rows))
            else:
                kept = np.stack([np.asarray(parallel.fit_to_buffer(jnp.asarray(c[None]), cell_rows))[0]
                                 for c in counts])
            for i, s in enumerate(shards):
                for e in range(e_l):
                    rows = np.flatnonzero(valid[s] & (te[s] == j * e_l + e))
                    keep[s, rows[: kept[i, e]]] = True
    return keep.reshape(np.shape(token_expert))


@pytest.mark.parametrize("exchange, factor", [("ragged", 1.0), ("padded", 1.0), ("ragged", 1.5)])
def test_bounded_receive_buffer_drops_and_counts(exchange, factor):
    """dropless_overflow="drop" (one round) with dropless_buffer_factor on a 2 x 4 mesh with
    the skewed router (half the tokens all want one device) and a token mask: output,
    dropped_fraction and gradients (input, router, expert weights) equal a one-device
    reference that computes exactly the assignments a numpy model of the buffer keeps
    (masked tokens take no buffer space)."""
    from jmoe import dropless
    from jmoe.layer import group_tokens
    from tests.test_parallel import _value_and_grads

    mesh = parallel.make_mesh(data=2, expert=4)
    x, mask, r = inputs(22, batch=16, seq=8, with_mask=True)
    options = dict(num_experts=8, k=2, activation="swiglu", capacity_factor=None)
    ref = make_moe(None, **options)
    ep = make_moe(mesh, dropless_exchange=exchange, dropless_buffer_factor=factor, dropless_overflow="drop",
                  **options)
    x, w = skewed(ref, x)
    ep.router_weight[...] = w
    parallel.shard_moe_params(ep, mesh)
    y_ep, aux_ep, grads_ep = jax.device_get(nnx.jit(_value_and_grads)(ep, x, mask, r))

    groups, _ = group_tokens(x, ref.group_size)  # [G, S, d]
    group_mask = mask.reshape(groups.shape[:2])
    router_in = groups.astype(jnp.float32)
    plan = ref.router.plan(router_in @ w, router_in, {}, {}, group_mask, ref.capacity(groups.shape[1]))
    a_local = groups.shape[0] * groups.shape[1] * 2 // 8
    sizes = parallel.exchange_sizes(a_local, 4, factor, k=2, local_experts=2)
    keep = kept_by_buffer(plan.token_expert, plan.token_weight, data=2, expert=4, num_experts=8,
                          buffer_rows=sizes.receive_rows, cell_rows=sizes.cell_rows if exchange == "padded" else None)
    requested = np.sum(np.asarray(plan.token_weight) != 0)
    dropped = requested - np.sum(keep & (np.asarray(plan.token_weight) != 0))
    assert dropped > 0.1 * requested  # the skew overflows the buffer
    np.testing.assert_allclose(aux_ep["dropped_fraction"], dropped / requested, rtol=1e-6)

    def reference(x, router_w, params):
        groups, _ = group_tokens(x, ref.group_size)
        router_in = groups.astype(jnp.float32)
        plan = ref.router.plan(router_in @ router_w, router_in, {}, {}, group_mask, ref.capacity(groups.shape[1]))
        tokens = groups.reshape(-1, D_MODEL)
        y = dropless.dropless_experts(tokens, plan.token_expert.reshape(tokens.shape[0], -1),
                                      (plan.token_weight * keep).reshape(tokens.shape[0], -1), params, "swiglu")
        aux = routing.complete_aux(plan.aux())
        total = (jnp.sum(y.reshape(x.shape) * r) + aux["load_balancing_loss"] + aux["z_loss"]
                 + aux["router_entropy"] + aux["importance_loss"] + aux["load_loss"])
        return total, y.reshape(x.shape)

    params = ref.experts.params()
    (_, y_ref), (g_x, g_router, g_params) = jax.device_get(
        jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2), has_aux=True))(x, w, params))
    assert_tree_close(y_ep, y_ref)
    assert_tree_close(grads_ep, {"x": g_x, "router_weight": g_router,
                                 **{f"experts.{name}": g for name, g in g_params.items()}})


def test_buffer_factor_bad_values_fail_at_construction():
    with pytest.raises(ValueError, match="capacity_factor=None"):
        make_moe(None, num_experts=8, capacity_factor=1.25, dropless_buffer_factor=2.0)
    with pytest.raises(ValueError, match=">= 1"):
        make_moe(None, num_experts=8, capacity_factor=None, dropless_buffer_factor=0.5)


# ----------------------------------------------------------------------------
# Overflow rounds: bounded buffers, nothing dropped (issue 25)
# ----------------------------------------------------------------------------


def adversarial(layer, x):
    """Router weight and inputs that send every token's two experts to experts 0 and 1:
    one device's experts (E_l >= 2) or the first two devices'."""
    w = 0.2 * jax.random.normal(jax.random.key(24), (D_MODEL, layer.num_experts))
    w = w.at[:, 0].add(1.5).at[:, 1].add(1.4)
    layer.router_weight[...] = w
    return x + 1.0, w


@pytest.mark.parametrize("exchange", ["padded", "ragged"])
@pytest.mark.parametrize("mesh_sizes", [dict(data=1, expert=8), dict(expert_outer=2, expert=4)], ids=["1x8", "2x4"])
def test_rounds_adversarial_routing_equals_one_device(exchange, mesh_sizes):
    """Every token's experts on one device (E=16, E_l = 2 on 8 devices: experts 0 and 1 both
    on device 0), a token mask, c = 1.0 and 1.25: values, every aux value and every gradient
    equal one device, nothing is dropped, and the bounded buffers take >= 2 rounds (device 0
    must compute n x its buffer's rows)."""
    mesh = parallel.make_mesh(**mesh_sizes)
    x, mask, r = inputs(25, batch=16, seq=16, with_mask=True)
    options = dict(num_experts=16, k=2, capacity_factor=None, activation="swiglu", use_bias=True)
    ref = make_moe(None, **options)
    x, w = adversarial(ref, x)
    layers = [ref]
    for factor in (1.0, 1.25):
        ep = make_moe(mesh, dropless_exchange=exchange, dropless_buffer_factor=factor, **options)
        ep.router_weight[...] = w
        parallel.shard_moe_params(ep, mesh)
        layers.append(ep)
    expected, *actual = values_and_grads(layers, x, mask, r)
    tokens = np.asarray(expected[1]["tokens_per_expert"])
    assert tokens[0] == tokens[1] == int(np.sum(mask))  # every valid token: experts 0 and 1
    for factor, got in zip((1.0, 1.25), actual):
        assert_tree_close(got, expected)
        assert float(got[1]["dropped_fraction"]) == 0.0
        assert int(got[1]["exchange_rounds"]) >= 2, (factor, got[1]["exchange_rounds"])
    assert int(actual[0][1]["exchange_rounds"]) >= int(actual[1][1]["exchange_rounds"])  # a smaller c: more rounds


def test_rounds_balanced_routing_takes_one_round_and_skew_on_some_devices_only():
    """Balanced routing (a random-init router, E = 8 on 8 devices) needs one round; the same
    layer with the first 64 tokens (4 of 8 token shards) pulled to experts 0 and 1 takes
    more rounds on every device (the others run the same collectives, with nothing or
    little to send) and still equals one device. Masked tokens take no buffer space: with
    every token sent to device 0 (256 rows for a buffer of R = 80) and all but 4 tokens of
    each sequence masked (64 rows), one round suffices."""
    mesh = parallel.make_mesh(data=1, expert=8)
    x, _, r = inputs(26, batch=16, seq=16, with_mask=False)
    options = dict(num_experts=8, k=2, capacity_factor=None, dropless_buffer_factor=1.25)
    ref, ep = make_moe(None, **options), make_moe(mesh, dropless_exchange="ragged", **options)
    parallel.shard_moe_params(ep, mesh)
    expected, actual = values_and_grads([ref, ep], x, None, r)
    assert_tree_close(actual, expected)
    assert int(actual[1]["exchange_rounds"]) == 1

    w = ep.router_weight[...]
    w = w.at[:, 0].add(3.0).at[:, 1].add(2.9)
    ref.router_weight[...] = w
    ep.router_weight[...] = w
    skewed_x = x.at[:4].add(1.0)  # rows 0-3 of the batch: token shards 0-3
    expected, actual = values_and_grads([ref, ep], skewed_x, None, r)
    assert_tree_close(actual, expected)
    assert int(actual[1]["exchange_rounds"]) >= 2 and float(actual[1]["dropped_fraction"]) == 0.0
    x_adv, w = adversarial(ref, x)
    ep.router_weight[...] = w
    assert parallel.exchange_sizes(64, 8, 1.25, k=2, local_experts=1).receive_rows == 80
    mask = jnp.zeros(x.shape[:2], bool).at[:, :4].set(True)
    expected, actual = values_and_grads([ref, ep], x_adv, mask, r)
    assert_tree_close(actual, expected)
    assert np.asarray(expected[1]["tokens_per_expert"])[0] == 64
    assert int(actual[1]["exchange_rounds"]) == 1


def test_count_rounds_hand_example():
    """Two devices, one local expert each; ragged, R = 8: device 0 receives 10 + 6 rows ->
    rounds of 8 (4 + 4), then 8 (the rest); padded cells of P = 4: the largest cell (10
    rows) takes 3 rounds."""
    from jmoe.parallel.dropless_exchange import count_rounds
    from jmoe.parallel.row_exchanges import PaddedExchange, RaggedExchange

    counts_all = jnp.array([[[10], [1]], [[6], [2]]], jnp.int32)  # [src, dst, E_l]
    rounds, left = count_rounds(RaggedExchange(8, ()), counts_all, limit=100)
    assert int(rounds) == 2 and int(jnp.sum(left)) == 0
    kept = RaggedExchange(8, ()).plan_round(counts_all)
    np.testing.assert_array_equal(kept[:, 0, 0], [4, 4])  # common cap over sources
    np.testing.assert_array_equal(kept[:, 1, 0], [1, 2])
    rounds, left = count_rounds(PaddedExchange(4, ()), counts_all, limit=100)
    assert int(rounds) == 3 and int(jnp.sum(left)) == 0
    rounds, left = count_rounds(PaddedExchange(4, ()), counts_all, limit=1)  # overflow="drop"
    assert int(rounds) == 1 and np.asarray(left).ravel().tolist() == [6, 0, 2, 0]
    sizes = parallel.exchange_sizes(4096, 64, 1.25, k=8, local_experts=4)  # DeepSeek-V3 shape, EP 64
    assert sizes.receive_rows == 5120 and sizes.cell_rows == 80


def test_dropless_overflow_bad_values():
    with pytest.raises(ValueError, match="dropless_overflow must be one of"):
        make_moe(None, num_experts=8, capacity_factor=None, dropless_overflow="spill")
    with pytest.raises(ValueError, match="capacity_factor=None"):
        make_moe(None, num_experts=8, capacity_factor=1.25, dropless_overflow="drop")
