"""The LM's pieces against slow independent references: rotary, RMSNorm, causal masking, losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe.routing import TokensChoose
from jmoe.training import model as model_lib


def _tiny_lm(num_experts=4, dtype=jnp.float32, **kw):
    return model_lib.LM(
        vocab_size=256, d_model=32, num_layers=2, num_heads=2, d_ff=64, num_experts=num_experts,
        moe_every=2, dtype=dtype, rngs=nnx.Rngs(0), **kw,
    )


@nnx.jit
def forward(lm, tokens):
    return lm(tokens)


def rotary_reference(x: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """Slow: for each position p and channel pair (i, i + H/2), multiply by the 2x2 rotation
    matrix of angle p * base^(-2i/H)."""
    b, s, n, h = x.shape
    out = np.empty_like(x, dtype=np.float64)
    for p in range(s):
        for i in range(h // 2):
            a = p * base ** (-2.0 * i / h)
            rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            pair = np.stack([x[:, p, :, i], x[:, p, :, i + h // 2]], axis=-1)  # [B, N, 2]
            r = pair @ rot.T
            out[:, p, :, i], out[:, p, :, i + h // 2] = r[..., 0], r[..., 1]
    return out


def test_rotary_matches_slow_reference():
    x = np.random.default_rng(0).normal(size=(2, 7, 3, 8)).astype(np.float32)
    got = model_lib.apply_rotary(jnp.asarray(x), jnp.arange(7))
    np.testing.assert_allclose(np.asarray(got), rotary_reference(x), atol=1e-5)


def test_rotary_dot_product_depends_on_relative_position_only():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(1, 1, 1, 16)), rng.normal(size=(1, 1, 1, 16))

    def score(m, n):
        qm = model_lib.apply_rotary(jnp.asarray(np.repeat(q, 20, 1), jnp.float32), jnp.arange(20))[0, m, 0]
        kn = model_lib.apply_rotary(jnp.asarray(np.repeat(k, 20, 1), jnp.float32), jnp.arange(20))[0, n, 0]
        return float(qm @ kn)

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
    assert score(0, 0) == pytest.approx(float(q.ravel() @ k.ravel()), abs=1e-4)


def test_rms_norm_matches_numpy():
    x = np.random.default_rng(2).normal(size=(3, 5)).astype(np.float32)
    scale = np.linspace(0.5, 2.0, 5).astype(np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(model_lib.rms_norm(jnp.asarray(x), jnp.asarray(scale))), want, rtol=1e-5)


def test_lm_loss_matches_numpy_cross_entropy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 4, 7))
    targets = rng.integers(0, 7, size=(2, 4))
    logz = np.log(np.exp(logits).sum(-1))
    want = np.mean(logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0])
    got = model_lib.lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    "num_experts, moe_kwargs",
    [
        (0, None),
        (4, None),
    ],
)
def test_changing_a_future_token_leaves_earlier_logits_unchanged(num_experts, moe_kwargs):
    # Top-1 choice-major routing fills an expert's slots in token order, so a later token can't
    # take an earlier token's slot: the MoE model is causal too.
    lm = _tiny_lm(num_experts, moe_kwargs=moe_kwargs)
    lm.eval()
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, size=(2, 16)), jnp.int32)
    changed = tokens.at[:, 9].set((tokens[:, 9] + 17) % 256)
    a, _ = forward(lm, tokens)
    b, _ = forward(lm, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :9]), np.asarray(b[:, :9]))
    assert not np.allclose(np.asarray(a[:, 9:]), np.asarray(b[:, 9:]))


def count_causality_violations(lm, trials):
    """How many (batch, position) edits change the logits of some earlier position."""
    rng = np.random.default_rng(0)
    violations = 0
    for _ in range(trials):
        tokens = jnp.asarray(rng.integers(0, 256, size=(4, 16)), jnp.int32)
        base, _ = forward(lm, tokens)
        for pos in range(4, 14):
            changed = tokens.at[:, pos].set((tokens[:, pos] + 1 + rng.integers(0, 255)) % 256)
            logits, _ = forward(lm, changed)
            violations += int(np.sum(np.any(np.asarray(logits[:, :pos]) != np.asarray(base[:, :pos]), axis=(1, 2))))
    return violations


def test_top2_needs_token_major_priority_to_stay_causal():
    # Choice-major top-2: a later token's 1st choice beats an earlier token's 2nd choice for the
    # last slot, so editing a future token can change an earlier token's output. Token-major puts
    # all of an earlier token's choices first: causal. Train mode, factor 0.5: slots run out.
    kwargs = dict(k=2, capacity_factor=0.5)
    choice = _tiny_lm(4, moe_kwargs=dict(router=TokensChoose(priority="choice"), **kwargs))
    token = _tiny_lm(4, moe_kwargs=dict(router=TokensChoose(priority="token"), **kwargs))
    assert count_causality_violations(choice, trials=3) > 0  # the check has teeth
    assert count_causality_violations(token, trials=3) == 0


def test_moe_every_places_moe_layers_and_dense_baseline_has_none():
    lm = model_lib.LM(vocab_size=256, d_model=32, num_layers=4, num_heads=2, d_ff=64, num_experts=4,
                      moe_every=2, rngs=nnx.Rngs(0))
    kinds = [isinstance(b.ffn, jmoe.MoE) for b in lm.blocks]
    assert kinds == [False, True, False, True]
    assert _tiny_lm(0).num_moe_layers == 0


def test_aux_sums_layer_losses_and_stacks_metrics():
    lm = model_lib.LM(
        vocab_size=256, d_model=32, num_layers=4, num_heads=2, d_ff=64, num_experts=4, moe_every=2,
        rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 256, size=(2, 16)), jnp.int32)
    _, aux = forward(lm, tokens)

    @nnx.jit
    def by_hand(lm, tokens):  # each MoE layer's aux from its own input, running the blocks by hand
        x, per_layer = lm.embed(tokens), []
        for block in lm.blocks:
            h = block.ffn_norm(x + block.attn(block.attn_norm(x)))
            if isinstance(block.ffn, jmoe.MoE):
                per_layer.append(block.ffn(h)[1])
            x, _ = block(x)
        return per_layer

    per_layer = by_hand(lm, tokens)
    assert float(aux["load_balancing_loss"]) == pytest.approx(
        sum(float(a["load_balancing_loss"]) for a in per_layer), rel=1e-6)
    assert float(aux["z_loss"]) == pytest.approx(sum(float(a["z_loss"]) for a in per_layer), rel=1e-6)
    assert aux["tokens_per_expert"].shape == (2, 4)
    np.testing.assert_allclose(np.asarray(aux["tokens_per_expert"][1]), np.asarray(per_layer[1]["tokens_per_expert"]))
    assert float(aux["importance_loss"]) == 0.0 and float(aux["load_loss"]) == 0.0  # not a noisy router
    total = model_lib.total_loss(jnp.float32(2.0), aux, 0.01, 0.001)
    assert float(total) == pytest.approx(2.0 + 0.01 * float(aux["load_balancing_loss"]) + 0.001 * float(aux["z_loss"]))


def test_bf16_activations_keep_router_and_logits_float32():
    lm = _tiny_lm(4, dtype=jnp.bfloat16)
    tokens = jnp.zeros((1, 8), jnp.int32)
    logits, aux = forward(lm, tokens)
    assert logits.dtype == jnp.float32
    moe = lm.blocks[1].ffn
    assert moe.router_weight[...].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(lm, nnx.Param)))
    assert np.isfinite(float(aux["load_balancing_loss"]))


def test_active_params_count_k_of_e_experts():
    lm = _tiny_lm(4)
    dense = _tiny_lm(0)
    # Same active size, up to the router [d, E]: one expert of width 64 replaces a dense FFN of width 64.
    assert model_lib.active_params_per_token(lm) == model_lib.active_params_per_token(dense) + 32 * 4
    assert model_lib.count_params(lm) == model_lib.count_params(dense) + 3 * (2 * 32 * 64) + 32 * 4


# ----------------------------------------------------------------------------
# Implementation choices (issue 16): attention implementation, one-hot embedding
# ----------------------------------------------------------------------------


def test_attention_auto_picks_cudnn_only_on_a_gpu_when_dtype_and_head_dim_allow(monkeypatch):
    from jmoe import platform

    assert model_lib.attention_impl("auto", jnp.bfloat16, 64) == "xla"  # this CPU
    assert model_lib.attention_impl("cudnn", jnp.float32, 64) == "cudnn"  # named: as asked
    monkeypatch.setattr(platform, "current", lambda: "gpu")
    assert model_lib.attention_impl("auto", jnp.bfloat16, 64) == "cudnn"
    assert model_lib.attention_impl("auto", jnp.float16, 128) == "cudnn"
    assert model_lib.attention_impl("auto", jnp.float32, 64) == "xla"  # cuDNN's kernel is bf16/fp16
    assert model_lib.attention_impl("auto", jnp.bfloat16, 160) == "xla"  # head dim > 128
    assert model_lib.attention_impl("auto", jnp.bfloat16, 36) == "xla"  # not a multiple of 8
    assert model_lib.attention_impl("xla", jnp.bfloat16, 64) == "xla"
    with pytest.raises(ValueError, match="attention='flash'"):
        model_lib.attention_impl("flash", jnp.bfloat16, 64)
    with pytest.raises(ValueError, match="embedding='table'"):
        _tiny_lm(0, embedding="table")
    with pytest.raises(ValueError, match="attention='flash'"):
        _tiny_lm(0, attention="flash")


def test_attention_xla_equals_auto_on_cpu():
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    a, _ = forward(_tiny_lm(4, attention="auto"), tokens)
    b, _ = forward(_tiny_lm(4, attention="xla"), tokens)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_onehot_embedding_equals_gather_logits_and_grads(dtype):
    """Same parameters (same init), same logits bit for bit; the embedding's gradient is the float32 sum
    of the rows' gradients (gather's scatter-add sums in the activation dtype: equal in float32 up to the
    order of the sum, and the one-hot sum is the closer one in bf16)."""
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 256).at[:, :6].set(7)  # repeated rows
    gather, onehot = _tiny_lm(4, dtype=dtype), _tiny_lm(4, dtype=dtype, embedding="onehot")
    state_g, state_o = nnx.state(gather, nnx.Param), nnx.state(onehot, nnx.Param)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state_g, state_o)
    assert all(jax.tree.leaves(same))

    def loss_and_grads(lm):
        graphdef, params, rest = nnx.split(lm, nnx.Param, ...)

        def loss(p):
            logits, _ = nnx.merge(graphdef, p, rest)(tokens)
            return model_lib.lm_loss(logits, jnp.roll(tokens, -1, 1)), logits

        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return value, logits, grads

    lg, logits_g, grads_g = loss_and_grads(gather)
    lo, logits_o, grads_o = loss_and_grads(onehot)
    np.testing.assert_array_equal(np.asarray(logits_o), np.asarray(logits_g))
    assert float(lo) == float(lg)
    eg, eo = grads_g["embed"]["embedding"][...], grads_o["embed"]["embedding"][...]
    assert eo.dtype == jnp.float32 and eo.shape == (256, 32)
    # every other parameter's gradient is the same computation (XLA may fuse its sums in another order)
    flat_g, flat_o = nnx.to_flat_state(grads_g), nnx.to_flat_state(grads_o)
    for (path, g), (_, o) in zip(flat_g, flat_o):
        if path[0] != "embed":
            np.testing.assert_allclose(np.asarray(o[...]), np.asarray(g[...]), rtol=1e-4, atol=1e-7,
                                       err_msg=str(path))

    # the reference: the float32 sum over positions of d loss / d x (x the embedded tokens, in dtype)
    graphdef, params, rest = nnx.split(gather, nnx.Param, ...)

    def loss_of_x(x):
        model = nnx.merge(graphdef, params, rest)
        for block in model.blocks:
            x, _ = block(x)
        logits = model.head(model.final_norm(x)).astype(jnp.float32)
        return model_lib.lm_loss(logits, jnp.roll(tokens, -1, 1))

    x = params["embed"]["embedding"][...].astype(dtype)[tokens]
    gx = np.asarray(jax.jit(jax.grad(loss_of_x))(x).astype(jnp.float32), np.float64)  # [B, S, d]
    ref = np.zeros((256, 32))
    np.add.at(ref, np.asarray(tokens).ravel(), gx.reshape(-1, 32))
    np.testing.assert_allclose(np.asarray(eo), ref, rtol=1e-5, atol=1e-7)
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(eo), np.asarray(eg), rtol=1e-5, atol=1e-7)
    else:  # gather's bf16 scatter-add rounds: within bf16's precision of the float32 sum
        np.testing.assert_allclose(np.asarray(eg), ref, rtol=2e-2, atol=1e-3)


def test_flops_per_token_counts_the_causal_half_of_attention():
    lm = _tiny_lm(4)
    active, layers, d, s = model_lib.active_params_per_token(lm), 2, 32, 64
    assert model_lib.flops_per_token(lm, s) == 6 * active + 6 * layers * s * d
    assert model_lib.flops_per_token(lm, s, causal=False) == 6 * active + 12 * layers * s * d


def test_attention_auto_falls_back_to_xla_where_cudnn_refuses(monkeypatch):
    """On this CPU, pretend to be a GPU: auto picks cuDNN, which refuses at trace time ('cuDNN is not
    detected'); auto then runs XLA's path (same logits as xla), an explicit cudnn raises."""
    from jmoe import platform

    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 256)
    want, _ = forward(_tiny_lm(0, dtype=jnp.bfloat16, attention="xla"), tokens)
    monkeypatch.setattr(platform, "current", lambda: "gpu")
    got, _ = jax.jit(lambda t: _tiny_lm(0, dtype=jnp.bfloat16, attention="auto")(t))(tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(RuntimeError):
        jax.jit(lambda t: _tiny_lm(0, dtype=jnp.bfloat16, attention="cudnn")(t))(tokens)
