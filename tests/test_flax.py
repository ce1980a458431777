"""jmoe in the Flax world (issue 14): explicit and Auto meshes, sharding metadata, scan over
stacked layers, Rngs, sow, tabulate, Linen, decode.

The model is written the way Flax's tutorials write them: norms and dense layers with
``out_sharding`` metadata on a ``model`` axis, an MoE FFN per block. Trained a few steps on
8 emulated devices, its losses equal the same model on one device.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jmoe
from jmoe.routing import TokensChoose

VOCAB, D, SEQ, BATCH, EXPERTS = 32, 16, 8, 8, 4
MOE_INPUT_TYPES = []


class Block(nnx.Module):
    def __init__(self, *, sharded: bool, moe_kw: dict, rngs: nnx.Rngs):
        meta = {"kernel_metadata": {"out_sharding": (None, "model")}} if sharded else {}
        self.norm1 = nnx.RMSNorm(D, rngs=rngs)
        self.proj = nnx.Linear(D, D, rngs=rngs, **meta)
        self.norm2 = nnx.RMSNorm(D, rngs=rngs)
        self.moe = jmoe.MoE(D, 2 * D, EXPERTS, k=2, rngs=rngs, **moe_kw)

    def __call__(self, x):
        h = x + self.proj(self.norm1(x))
        MOE_INPUT_TYPES.append(jax.typeof(h))  # at trace time
        y, aux = self.moe(self.norm2(h))
        return h + y, aux["load_balancing_loss"]


class Model(nnx.Module):
    def __init__(self, *, sharded: bool, moe_kw: dict, layers: int = 2, stacked: bool = False, rngs: nnx.Rngs):
        self.embed = nnx.Linear(VOCAB, D, use_bias=False, rngs=rngs)  # on one-hot tokens: no gather
        self.stacked = stacked
        if stacked:
            @nnx.split_rngs(splits=layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
            def make(rngs):
                return Block(sharded=sharded, moe_kw=moe_kw, rngs=rngs)

            self.blocks = make(rngs)
        else:
            self.blocks = nnx.List([Block(sharded=sharded, moe_kw=moe_kw, rngs=rngs) for _ in range(layers)])
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(jax.nn.one_hot(tokens, VOCAB))
        if self.stacked:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            def run(x, block):
                return block(x)

            x, lb = run(x, self.blocks)
            lb = jnp.sum(lb)
        else:
            lb = 0.0
            for block in self.blocks:
                x, l = block(x)
                lb = lb + l
        return self.head(x), lb


def train_losses(mesh, moe_kw, *, stacked=False, batch_spec=P("data"), steps=3, layers=2):
    """Losses of a few Adam steps; the model is built (and its data placed) under ``mesh``."""
    tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ + 1), 0, VOCAB)

    def build():
        # the scan carry must keep its type: no "model" split of the dense layers in the stacked model
        model = Model(sharded=mesh is not None and not stacked, moe_kw=moe_kw, layers=layers, stacked=stacked,
                      rngs=nnx.Rngs(params=0))
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(model):
            logits, lb = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + 0.01 * lb

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    if mesh is None:
        model, opt = build()
        x, y = tokens[:, :-1], tokens[:, 1:]
        return [float(step(model, opt, x, y)) for _ in range(steps)], model
    with jax.set_mesh(mesh):
        model, opt = build()
        x, y = (jax.device_put(t, batch_spec) for t in (tokens[:, :-1], tokens[:, 1:]))
        return [float(step(model, opt, x, y)) for _ in range(steps)], model


MESHES = {
    "explicit-data": (lambda: jax.make_mesh((8, 1), ("data", "model")), P("data"), {}),
    "tutorial-batch-model": (lambda: jax.make_mesh((4, 2), ("batch", "model")), P("batch"), {}),
    "explicit-data-expert-model": (lambda: jax.make_mesh((2, 2, 2), ("data", "expert", "model")), P(("data", "expert")),
                                   {}),
    "explicit-dropless": (lambda: jax.make_mesh((2, 2, 2), ("data", "expert", "model")), P(("data", "expert")),
                          {"capacity_factor": None}),
}


@pytest.mark.parametrize("name", list(MESHES))
def test_tutorial_model_trains_on_a_mesh_as_on_one_device(name):
    make, batch_spec, moe_kw = MESHES[name]
    mesh = make()
    want, _ = train_losses(None, moe_kw)
    got, model = train_losses(mesh, moe_kw, batch_spec=batch_spec)
    np.testing.assert_allclose(got, want, rtol=2e-4)
    w_in = model.blocks[0].moe.experts.w_in[...]
    expert_axes = tuple(a for a in ("expert",) if a in mesh.axis_names)
    assert w_in.sharding.spec == P(expert_axes or None, None, "model" if dict(mesh.shape)["model"] > 1 else None)


EXPLICIT, AUTO = (jax.sharding.AxisType.Explicit,) * 2, (jax.sharding.AxisType.Auto,) * 2
# The grouped matmuls that run on CPU: XLA's two natively, the Pallas GPU and TPU kernels in Pallas's
# interpreter (conftest opts in). Mosaic GPU takes 16-bit dtypes only: tests/test_mosaic_grouped_matmul.py.
CPU_MATMULS = ("scan", "ragged_dot", "pallas", "megablox")
MODEL_SHARDED_CASES = [
    *[(kind, shape, gmm) for kind in ("explicit",) for shape in ((8, 1), (4, 2)) for gmm in CPU_MATMULS],
    # An Auto mesh runs the layer's one-device path under XLA's partitioner; the interpreted kernels'
    # host callbacks there meet collectives that 8 emulated devices on 2 cores can time out: XLA's two only.
    ("auto", (8, 1), "scan"), ("auto", (4, 2), "ragged_dot"),
]


@functools.cache
def one_device_losses(moe_items: tuple) -> list[float]:
    return train_losses(None, dict(moe_items), layers=1)[0]


@pytest.mark.parametrize("kind, shape, gmm", MODEL_SHARDED_CASES,
                         ids=[f"{k}-{s[0]}x{s[1]}-{g}" for k, s, g in MODEL_SHARDED_CASES])
def test_dropless_with_model_sharded_activations_trains_as_on_one_device(kind, shape, gmm):
    """Issue 22: the tutorial model's dense layers split their outputs over "model", so the MoE
    input is P("data", None, "model"); a dropless layer on ("data", "model") meshes trains as on
    one device with each grouped matmul that runs on CPU (its backward once failed in the scan's
    accumulate)."""
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=AUTO if kind == "auto" else EXPLICIT)
    moe_kw = {"capacity_factor": None, "grouped_matmul": gmm}
    want = one_device_losses(tuple(sorted(moe_kw.items())))
    MOE_INPUT_TYPES.clear()
    got, _ = train_losses(mesh, moe_kw, layers=1)
    np.testing.assert_allclose(got, want, rtol=2e-4)
    assert got[-1] < got[0]
    if kind == "explicit":
        assert MOE_INPUT_TYPES and all(t.sharding.spec == P("data", None, "model") for t in MOE_INPUT_TYPES)


@pytest.mark.parametrize("shape", [(4, 2)])
def test_capacity_layer_on_an_auto_mesh_with_model_sharded_dense_layers(shape):
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=AUTO)
    got, _ = train_losses(mesh, {}, layers=1)
    np.testing.assert_allclose(got, one_device_losses(()), rtol=2e-4)


def test_stacked_layers_under_scan_on_an_expert_mesh():
    """nnx.vmap-stacked blocks run with nnx.scan: the expert dim is sharded, not the layer dim."""
    mesh = jax.make_mesh((2, 4, 1), ("data", "expert", "model"))
    want, _ = train_losses(None, {}, stacked=True)
    got, model = train_losses(mesh, {}, stacked=True, batch_spec=P(("data", "expert")))
    np.testing.assert_allclose(got, want, rtol=2e-4)
    w_in = model.blocks.moe.experts.w_in
    assert w_in[...].shape[:2] == (2, EXPERTS)
    assert P(*w_in.get_metadata("out_sharding")) == P(None, "expert", None, None)  # the layer dim unsplit
    assert w_in[...].sharding.spec == P(None, "expert", None, None)


def test_created_under_set_mesh_the_parameters_are_placed_and_reported():
    mesh = jax.make_mesh((2, 2, 2), ("data", "expert", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        moe = jmoe.MoE(D, 2 * D, EXPERTS, activation="swiglu", use_bias=True, rngs=nnx.Rngs(params=0))
    specs = nnx.get_partition_spec(nnx.state(moe))
    want = {"w_in": P("expert", None, "model"), "w_gate": P("expert", None, "model"),
            "w_out": P("expert", "model", None), "b_in": P("expert", "model"), "b_out": P("expert", None)}
    for name, spec in want.items():
        variable = getattr(moe.experts, name)
        assert P(*variable.get_metadata("out_sharding")) == spec, name
        assert variable[...].sharding.spec == spec, name
        assert specs["experts"][name].get_value() == spec, name  # what nnx.get_partition_spec reports
    assert moe.router_weight[...].sharding.spec == P(None, None)
    assert specs["router_weight"].get_value() == P(None, None)


def test_rngs_only_when_the_router_draws():
    x = jax.random.normal(jax.random.key(0), (2, 4, D))
    y, _ = jmoe.MoE(D, 2 * D, EXPERTS, rngs=nnx.Rngs(params=0))(x)  # like nnx.Linear: params alone
    assert y.shape == x.shape
    with pytest.raises(ValueError, match="'router' \\(or 'default'\\) stream"):
        jmoe.MoE(D, 2 * D, EXPERTS, router=TokensChoose(jitter=0.1), rngs=nnx.Rngs(params=0))
    jmoe.MoE(D, 2 * D, EXPERTS, router=TokensChoose(jitter=0.1), rngs=nnx.Rngs(0))  # the default stream serves


def test_sow_makes_a_drop_in_mlp_for_sequential_and_collects_the_losses():
    x = jax.random.normal(jax.random.key(1), (2, 4, D))
    layers = [jmoe.MoE(D, 2 * D, EXPERTS, k=2, rngs=nnx.Rngs(params=i)) for i in range(2)]
    sown = [jmoe.MoE(D, 2 * D, EXPERTS, k=2, sow_aux=True, rngs=nnx.Rngs(params=i)) for i in range(2)]
    model = nnx.Sequential(*sown)
    y = model(x)
    h, aux0 = layers[0](x)
    want, aux1 = layers[1](h)
    np.testing.assert_allclose(y, want, rtol=1e-6)
    losses = jmoe.sown_aux(model)
    np.testing.assert_allclose(losses["load_balancing_loss"], aux0["load_balancing_loss"] + aux1["load_balancing_loss"],
                               rtol=1e-6)
    np.testing.assert_allclose(losses["z_loss"], aux0["z_loss"] + aux1["z_loss"], rtol=1e-6)
    assert jmoe.sown_aux(model) == {}  # popped
    y2, intermediates = nnx.capture(model, nnx.Intermediate)(x)  # Flax's newer way to collect sown values
    np.testing.assert_allclose(y2, want, rtol=1e-6)
    np.testing.assert_allclose(jmoe.sown_aux(intermediates)["load_balancing_loss"], losses["load_balancing_loss"],
                               rtol=1e-6)


def test_tabulate_and_linen_bridge():
    x = jnp.ones((2, 4, D))
    table = nnx.tabulate(jmoe.MoE(D, 2 * D, EXPERTS, rngs=nnx.Rngs(params=0)), x)
    assert "MoE" in table and "4,160" in table  # d E + 2 E d f parameters
    linen = nnx.bridge.ToLinen(jmoe.MoE, args=(D, 2 * D, EXPERTS), kwargs={"sow_aux": True})
    variables = linen.init({"params": jax.random.key(0)}, x)
    y, _ = linen.apply(variables, x, mutable=["intermediates"])
    assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()


def test_one_token_decode_step_in_eval_mode():
    """A [B, 1, d] step of a layer built with group_size=4 routes one sequence per group in
    eval mode; in train mode the same call is an error (the group size is a training choice)."""
    moe = jmoe.MoE(D, 2 * D, EXPERTS, k=2, group_size=4, rngs=nnx.Rngs(params=0))
    step = jax.random.normal(jax.random.key(2), (3, 1, D))
    with pytest.raises(ValueError, match="group_size=4"):
        moe(step)
    moe.eval()
    y, aux = moe(step)
    ref = jmoe.MoE(D, 2 * D, EXPERTS, k=2, rngs=nnx.Rngs(params=0))  # default: one sequence per group
    ref.eval()
    want, _ = ref(step)
    np.testing.assert_allclose(y, want, rtol=1e-6)
    assert float(aux["dropped_fraction"]) == 0.0
