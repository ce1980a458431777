"""The newer expert activations against float64 references on random inputs: squared ReLU (a
plain, non-gated FFN), SwiGLU with GPT-OSS's clamps but without its alpha and + 1 (DeepSeek-V4's
``_apply_gate`` in transformers) or with the gate clamped after its activation (Step-3.7's), and Inkling-2's softcapped SwiGLU; the experts' OutputNorm (per expert: Ergo's; one tied weight:
Muse Spark's); and their bad options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe.experts import Activation


def silu64(v):
    return v / (1.0 + np.exp(-v))


REFERENCES = {
    "relu2": lambda up, gate, a: np.maximum(up, 0.0) ** 2,
    "limited_swiglu": lambda up, gate, a: silu64(np.minimum(gate, a.swiglu_limit))
    * np.clip(up, -a.swiglu_limit, a.swiglu_limit),
    "post_limited_swiglu": lambda up, gate, a: np.minimum(silu64(gate), a.swiglu_limit)
    * np.clip(up, -a.swiglu_limit, a.swiglu_limit),
    "softcapped_swiglu": lambda up, gate, a: (a.gate_softcap * np.tanh(gate / a.gate_softcap) / (1.0 + np.exp(-gate))
                                              * a.up_softcap * np.tanh(up / a.up_softcap)),
}


@pytest.mark.parametrize("activation", [Activation("relu2"), Activation("limited_swiglu", swiglu_limit=1.5),
                                        Activation("post_limited_swiglu", swiglu_limit=1.5),
                                        Activation("softcapped_swiglu", gate_softcap=2.0, up_softcap=1.5)],
                         ids=lambda a: a.name)
def test_activation_matches_float64(activation):
    rng = np.random.default_rng(0)
    up, gate = rng.normal(size=(2, 64)) * 3.0  # beyond the limit and the cap
    got = np.asarray(activation(jnp.asarray(up, jnp.float32), jnp.asarray(gate, jnp.float32)), np.float64)
    want = REFERENCES[activation.name](up, gate, activation)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if "limited" in activation.name:  # the clamps bind somewhere
        assert np.any(np.abs(up) > 1.5) and np.any(gate > 2.0)  # silu(2) > 1.5


@pytest.mark.parametrize("name", ["relu2", "limited_swiglu"])
def test_expert_bank_with_the_activation_matches_a_loop_over_experts(name):
    """Squared ReLU is a plain FFN (no gate weight), limited SwiGLU a gated one."""
    act = Activation(name, swiglu_limit=0.5)
    bank = jmoe.ExpertBank(3, 4, 6, activation=act, rngs=nnx.Rngs(0))
    assert hasattr(bank, "w_gate") == (name == "limited_swiglu")
    x = jax.random.normal(jax.random.key(3), (3, 5, 4))
    y = np.asarray(bank(x), np.float64)
    p = {n: np.asarray(v, np.float64) for n, v in bank.params().items()}
    for e in range(3):
        xe = np.asarray(x[e], np.float64)
        gate = xe @ p["w_gate"][e] if "w_gate" in p else None
        want = REFERENCES[name](xe @ p["w_in"][e], gate, act) @ p["w_out"][e]
        np.testing.assert_allclose(y[e], want, rtol=1e-5, atol=1e-6)


def scaled_rms64(y, scale, eps):
    return scale * y / np.sqrt(np.mean(y ** 2, axis=-1, keepdims=True) + eps)


def normed_bank(eps=0.05):
    """A squared-ReLU bank of 3 experts whose outputs are RMS-normalised, its scales random."""
    bank = jmoe.ExpertBank(3, 4, 6, activation=Activation("relu2", output_norm=jmoe.OutputNorm(eps, per_expert=True)), rngs=nnx.Rngs(0))
    bank.norm_weight[...] = jax.random.normal(jax.random.key(4), (3, 4))
    return bank


def ffn_ref(x, p, e, eps):
    """Expert e's squared-ReLU FFN with its output norm, float64: x [N, d] -> [N, d]."""
    return scaled_rms64(REFERENCES["relu2"](x @ p["w_in"][e], None, None) @ p["w_out"][e], p["norm_weight"][e], eps)


def test_output_norm_matches_float64_in_the_bank_the_grouped_ffn_and_the_shared_expert():
    """``s_e * z / sqrt(mean_d(z^2) + eps)`` on each expert's output z with its own scale s_e
    (eps 0.05: it changes the result), in the capacity path's bank, the dropless path's grouped
    FFN on rows sorted by expert, and the shared expert (one scale [d])."""
    from jmoe.dropless import grouped_ffn
    from jmoe.experts import SharedExpert
    bank = normed_bank()
    p = {n: np.asarray(v, np.float64) for n, v in bank.params().items()}
    x = jax.random.normal(jax.random.key(3), (3, 5, 4))
    want = np.stack([ffn_ref(np.asarray(x[e], np.float64), p, e, 0.05) for e in range(3)])  # [E, N, d]
    np.testing.assert_allclose(np.asarray(bank(x), np.float64), want, rtol=1e-5, atol=1e-6)
    assert np.abs(want - np.stack([ffn_ref(np.asarray(x[e], np.float64), p, e, 1e-9) for e in range(3)])).max() > 1e-3
    rows, sizes = x[:, :4].reshape(12, 4), jnp.array([4, 4, 4])  # 4 rows per expert, in expert order
    got = grouped_ffn(rows, jnp.repeat(jnp.arange(3), 4), sizes, bank.params(), bank.activation)
    np.testing.assert_allclose(np.asarray(got, np.float64).reshape(3, 4, 4), want[:, :4], rtol=1e-5, atol=1e-6)
    shared = SharedExpert(4, 6, activation=Activation("relu2", output_norm=jmoe.OutputNorm(0.05, per_expert=True)), rngs=nnx.Rngs(1))
    shared.norm_weight[...] = jax.random.normal(jax.random.key(5), (4,))
    q = {n: np.asarray(v, np.float64)[None] for n, v in shared.params().items()}
    np.testing.assert_allclose(np.asarray(shared(x[0]), np.float64), ffn_ref(np.asarray(x[0], np.float64), q, 0, 0.05),
                               rtol=1e-5, atol=1e-6)


def test_output_norm_reads_all_of_d_when_the_hidden_dim_is_split_over_a_model_axis():
    """With f split over ``model`` the norm comes after the psum of the output: 2 shards give the
    unsplit bank's output."""
    from jax.sharding import PartitionSpec as P
    from jmoe.experts import expert_ffn
    bank = normed_bank()
    params = bank.params()
    x = jax.random.normal(jax.random.key(6), (3, 5, 4))
    mesh = jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    specs = {"w_in": P(None, None, "model"), "w_out": P(None, "model", None), "norm_weight": P()}
    split = jax.jit(jax.shard_map(lambda x, p: expert_ffn(x, p, bank.activation, "model"), mesh=mesh,
                                  in_specs=(P(), specs), out_specs=P()))
    np.testing.assert_allclose(np.asarray(split(x, params)), np.asarray(bank(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, match", [
    (lambda: Activation("softcapped_swiglu", gate_softcap=2.0), "needs gate_softcap and up_softcap"),
    (lambda: Activation("softcapped_swiglu", gate_softcap=2.0, up_softcap=0.0), "up_softcap must be"),
    (lambda: Activation("limited_swiglu", swiglu_limit=-1.0), "swiglu_limit"),
    (lambda: Activation("relu3"), "activation must be one of"),
    (lambda: Activation("relu2", output_norm=jmoe.OutputNorm(0.0, per_expert=True)), "OutputNorm.eps"),
])
def test_bad_activation_options_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------- an RMSNorm on every expert's output


def output_norm64(y, g, norm):
    """The OutputNorm of one expert output y [N, d] in float64."""
    scale = norm.offset + g
    if norm.scale_first:
        y = y * scale
        return y / np.sqrt(np.mean(y ** 2, -1, keepdims=True) + norm.eps)
    return y / np.sqrt(np.mean(y ** 2, -1, keepdims=True) + norm.eps) * scale


@pytest.mark.parametrize("norm", [jmoe.OutputNorm(1e-6, scale_first=True, offset=1.0), jmoe.OutputNorm(0.3)],
                         ids=["muse_spark", "plain-large-eps"])
@pytest.mark.parametrize("capacity_factor", [None, 4.0], ids=["dropless", "capacity"])
def test_expert_output_norm_matches_float64(norm, capacity_factor):
    """y = sum_k w_k n(FFN_{e_k}(x)): each expert's output normed (its one shared weight g) before
    its combine weight; a float64 loop over tokens and choices with the layer's own weights and
    routing, in both paths (the capacity path's per-expert FFN, the dropless grouped FFN)."""
    act = Activation("swiglu", output_norm=norm)
    moe = jmoe.MoE(6, 5, 4, k=2, capacity_factor=capacity_factor, router="tokens_choose", activation=act,
                   rngs=nnx.Rngs(0))
    moe.eval()
    rng = np.random.default_rng(1)
    moe.experts.tied_norm_weight[...] = jnp.asarray(rng.normal(size=6) * 0.5 + (1.0 - norm.offset), jnp.float32)
    x = jax.random.normal(jax.random.key(2), (2, 7, 6))
    y, _ = nnx.jit(lambda m, x: m(x))(moe, x)
    plan = moe.route(x)
    xs = np.asarray(x, np.float64).reshape(-1, 6)
    p = {n: np.asarray(v, np.float64) for n, v in moe.experts.params().items()}
    experts = np.asarray(plan.token_expert).reshape(-1, 2)
    weights = np.asarray(plan.token_weight, np.float64).reshape(-1, 2)
    want = np.zeros_like(xs)
    for t in range(len(xs)):
        for e, w in zip(experts[t], weights[t]):
            h = silu64(xs[t] @ p["w_gate"][e]) * (xs[t] @ p["w_in"][e])
            want[t] += w * output_norm64((h @ p["w_out"][e])[None], p["tied_norm_weight"], norm)[0]
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, 6), want, rtol=1e-5, atol=1e-6)
    assert not hasattr(jmoe.MoE(6, 5, 4, k=2, activation=act, shared=jmoe.Shared(3), rngs=nnx.Rngs(0)).shared_expert,
                       "norm_weight")  # the experts' norm, not the shared expert's


def test_expert_output_norm_on_a_mesh_matches_one_device():
    """The norm's weight is replicated (no expert dim): on a 2 x 4 (data, expert) mesh, after the
    dropless row exchange, the same output as one device."""
    from jmoe import parallel
    act = Activation("swiglu", output_norm=jmoe.OutputNorm(1e-6, scale_first=True, offset=1.0))
    x = jax.random.normal(jax.random.key(4), (8, 4, 6))
    forward = nnx.jit(lambda m, x: m(x)[0])

    def make(mesh=None):
        moe = jmoe.MoE(6, 5, 8, k=2, capacity_factor=None, activation=act, mesh=mesh, rngs=nnx.Rngs(0))
        moe.experts.tied_norm_weight[...] = jnp.linspace(-0.5, 0.5, 6)
        return moe

    ep = make(parallel.make_mesh(data=2, expert=4))
    assert ep.experts.tied_norm_weight[...].sharding.spec == jax.sharding.PartitionSpec(None)
    np.testing.assert_allclose(np.asarray(forward(ep, x)), np.asarray(forward(make(), x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, match", [
    (lambda: jmoe.OutputNorm(eps=0.0), "OutputNorm.eps"),
    (lambda: jmoe.OutputNorm(offset=float("nan")), "OutputNorm.offset"),
])
def test_bad_output_norm_options_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_per_expert_output_norm_with_scale_first_and_offset_matches_float64():
    """OutputNorm's options together: per expert (each its own g), scaled first, offset 1: in the
    bank and the dropless path's grouped FFN, ``g`` initialised so that ``offset + g = 1``."""
    from jmoe.dropless import grouped_ffn
    norm = jmoe.OutputNorm(0.05, scale_first=True, offset=1.0, per_expert=True)
    bank = jmoe.ExpertBank(3, 4, 6, activation=Activation("relu2", output_norm=norm), rngs=nnx.Rngs(0))
    assert not hasattr(bank, "tied_norm_weight") and np.all(np.asarray(bank.norm_weight[...]) == 0.0)
    bank.norm_weight[...] = 0.5 * jax.random.normal(jax.random.key(7), (3, 4))
    p = {n: np.asarray(v, np.float64) for n, v in bank.params().items()}
    x = jax.random.normal(jax.random.key(8), (3, 4, 4))
    want = np.stack([output_norm64(REFERENCES["relu2"](np.asarray(x[e], np.float64) @ p["w_in"][e], None, None)
                                   @ p["w_out"][e], p["norm_weight"][e], norm) for e in range(3)])  # [E, N, d]
    np.testing.assert_allclose(np.asarray(bank(x), np.float64), want, rtol=1e-5, atol=1e-6)
    got = grouped_ffn(x.reshape(12, 4), jnp.repeat(jnp.arange(3), 4), jnp.array([4, 4, 4]), bank.params(),
                      bank.activation)
    np.testing.assert_allclose(np.asarray(got, np.float64).reshape(3, 4, 4), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_expert", [True, False], ids=["per_expert", "tied"])
def test_output_norm_weights_and_their_placement(per_expert):
    """Per expert: ``experts.norm_weight [E, d]`` on the expert axes, and a shared expert without an
    activation of its own inherits the norm with its own ``norm_weight [d]``; tied: one
    ``experts.tied_norm_weight [d]``, replicated (also stacked over layers), not the shared expert's."""
    from jmoe import parallel
    act = Activation("relu2", output_norm=jmoe.OutputNorm(0.05, per_expert=per_expert))
    moe = jmoe.MoE(6, 5, 4, k=2, activation=act, shared=jmoe.Shared(3), rngs=nnx.Rngs(0))
    name = "norm_weight" if per_expert else "tied_norm_weight"
    assert getattr(moe.experts, name)[...].shape == ((4, 6) if per_expert else (6,))
    assert hasattr(moe.shared_expert, "norm_weight") == per_expert
    mesh = parallel.make_mesh(data=2, expert=4)
    stacked = (3, 8, 6) if per_expert else (3, 6)  # layers stacked with nnx.vmap
    want = jax.P(None, ("expert",), None) if per_expert else jax.P(None, None)
    assert parallel.moe_param_spec(("moe", "experts", name), mesh, stacked) == want


def test_jitter_experts_needs_the_router_input_of_the_experts_width():
    with pytest.raises(ValueError, match="jitter_experts=True .* router_d_model == d_model"):
        jmoe.MoE(4, 6, 8, k=2, router=jmoe.routing.TokensChoose(jitter=0.1, jitter_experts=True), router_d_model=6,
                 rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="OutputNorm.per_expert must be a bool"):
        jmoe.OutputNorm(per_expert=1)
