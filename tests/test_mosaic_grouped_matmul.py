"""The Mosaic GPU grouped matmul (jmoe/pallas/mosaic_grouped_matmul.py, JAX's Hopper
ragged-dot kernels under jmoe's VJP) against a float64 per-group loop and against
jax.lax.ragged_dot: forward, dx, dw, rows past the groups, empty groups, argument checks.

Off GPU the kernels run in Mosaic GPU's interpret mode (shared memory, TMA and
barriers simulated on the CPU); on a GPU, compiled. The backward kernels are
interpreted only on jax >= 0.11 (jax 0.10's interpreter has no transposed wgmma
operand and no ``layout_cast``); their lowering to Mosaic GPU custom calls is checked
on every version.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.pallas import mosaic_grouped_matmul as mg
from tests import test_grouped_matmul
from tests.test_grouped_matmul import loop_gmm, loop_tgmm

ON_GPU = jax.default_backend() == "gpu"
JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:2])
needs_interpreter_011 = pytest.mark.skipif(
    not ON_GPU and JAX_VERSION < (0, 11),
    reason=f"jax {jax.__version__}'s Mosaic GPU interpreter can't run the backward kernels (no transposed "
           "wgmma operand, no layout_cast); a GPU or jax >= 0.11 runs them")

needs_8_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices of the default backend "
                                     "(the emulated CPU devices when CPU is the default)")

# Small tiles so the test shapes span several row and column tiles.
SMALL = mg.MosaicGmmConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2)

# rows, K, F, group sizes (sum <= rows: the rest are rows past the groups)
CASES = {
    "straddling": (256, 128, 128, [70, 0, 101, 1, 40]),   # empty group, groups across 64-row tiles
    "one-group-all": (192, 64, 128, [0, 192, 0]),        # one expert takes every row
    "rows-not-tiled": (200, 64, 128, [50, 0, 90]),       # 200 rows: the last tile runs past the array
}


@pytest.fixture
def sm_count(monkeypatch):
    """The dw kernel sizes its persistent grid by ``jax.devices()[0].core_count``, which
    CPU devices lack: off GPU, its module sees 4 SMs (the interpreter simulates that
    many); everything else sees the real devices."""
    if hasattr(jax.devices()[0], "core_count"):
        return
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    class FakeGpu:
        core_count = 4

    class JaxWithSms:
        def __getattr__(self, name):
            return getattr(jax, name)

        @staticmethod
        def devices(*args, **kwargs):
            return [FakeGpu()]

    monkeypatch.setattr(transposed_ragged_dot_mgpu, "jax", JaxWithSms())


def random_case(seed, n, k, f, sizes):
    return test_grouped_matmul.random_case(seed, n, k, f, sizes, jnp.bfloat16)


def assert_bf16_close(got, want):
    """bf16 outputs of float32 accumulations: within a few bf16 ulps of the float64 value."""
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * max(1.0, float(np.abs(want).max())) / 8)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_kernel_matches_loop(name):
    n, k, f, sizes = CASES[name]
    x, w, gs, _ = random_case(1, n, k, f, sizes)
    out = mg.mosaic_gmm(x, w, gs, config=SMALL)
    assert out.shape == (n, f) and out.dtype == jnp.bfloat16
    assert_bf16_close(out, loop_gmm(x, w, sizes))
    assert np.all(np.asarray(out[sum(sizes):], np.float32) == 0.0)  # the kernel leaves them unwritten: zeroed


@needs_interpreter_011
@pytest.mark.parametrize("name", sorted(CASES))
def test_dx_kernel_matches_loop(name):
    n, k, f, sizes = CASES[name]
    _, w, gs, dy = random_case(1, n, k, f, sizes)
    total = sum(sizes)
    dx = mg.mosaic_gmm(dy, w, gs, transpose_w=True, config=SMALL)  # dy @ w^T per group
    assert_bf16_close(dx, loop_gmm(dy, np.swapaxes(np.asarray(w, np.float64), 1, 2), sizes))
    assert np.all(np.asarray(dx[total:], np.float32) == 0.0)


@needs_interpreter_011
@pytest.mark.parametrize("name", sorted(CASES))
def test_dw_kernel_matches_loop(name, sm_count):
    n, k, f, sizes = CASES[name]
    x, _, gs, dy = random_case(2, n, k, f, sizes)
    dw = mg.mosaic_tgmm(x, dy, gs, config=SMALL)
    assert dw.shape == (len(sizes), k, f)
    assert_bf16_close(dw, loop_tgmm(x, dy, sizes, len(sizes)))
    for e, size in enumerate(sizes):
        if size == 0:
            assert np.all(np.asarray(dw[e], np.float32) == 0.0), f"expert {e} has no rows: dw must be exactly 0"


@needs_interpreter_011
def test_gradients_match_ragged_dot(sm_count):
    """jax.grad through the custom VJP == jax.grad through ragged_dot (float32 on the same
    bf16 values), for a nonlinear loss so dy varies per row."""
    n, k, f, sizes = CASES["straddling"]
    x, w, gs, c = random_case(3, n, k, f, sizes)

    got, want = test_grouped_matmul.sin_loss_grads(lambda a, b: mg.mosaic_grouped_matmul(a, b, gs, SMALL), x, w, gs, c)
    for g, r in zip(got, want):
        assert g.dtype == jnp.bfloat16
        assert_bf16_close(g, np.asarray(r, np.float64))
    assert np.all(np.asarray(got[1][1], np.float32) == 0.0)  # expert 1 got no rows


def test_all_kernels_lower_to_mosaic_gpu_for_cuda(sm_count):
    """Forward + backward at the default tiles lower to Mosaic GPU custom calls for CUDA
    without a GPU (Mosaic GPU's own lowering: tiles, shared memory layout, pipeline)."""
    n, k, f, sizes = 1024, 256, 512, [300, 0, 500, 100]
    x, w, gs, _ = random_case(4, n, k, f, sizes)
    config = mg.MosaicGmmConfig(interpret=False)
    traced = jax.jit(lambda x, w: jax.value_and_grad(
        lambda x, w: jnp.sum(mg.mosaic_grouped_matmul(x, w, gs, config).astype(jnp.float32)),
        argnums=(0, 1))(x, w)).trace(x, w)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 3, "forward, dx and dw kernels"


@pytest.mark.parametrize("bad, match", [
    (dict(dtype=jnp.float32), "bfloat16 or both float16"),
    (dict(k=96), "contraction dim = 96 must be a multiple of 64"),
    (dict(w_k=64), r"x \[N, K\] and w \[E, K, F\]"),
])
def test_bad_arguments_fail_clearly(bad, match):
    k = bad.get("k", 128)
    x = jnp.zeros((64, k), bad.get("dtype", jnp.bfloat16))
    w = jnp.zeros((2, bad.get("w_k", k), 128), bad.get("dtype", jnp.bfloat16))
    with pytest.raises(ValueError, match=match):
        mg.mosaic_gmm(x, w, jnp.array([32, 32], jnp.int32))


def test_layer_rejects_mosaic_with_float32():
    from flax import nnx

    import jmoe

    with pytest.raises(ValueError, match="needs dtype bfloat16 or float16, got float32"):
        jmoe.MoE(64, 128, num_experts=4, capacity_factor=None, grouped_matmul="mosaic", rngs=nnx.Rngs(0))


def _layers(mesh_sizes, matmuls, **options):
    from flax import nnx

    import jmoe
    from jmoe import parallel

    layers = []
    for mesh_size, matmul in zip(mesh_sizes, matmuls):
        mesh = parallel.make_mesh(**mesh_size) if mesh_size else None
        layer = jmoe.MoE(64, 256, num_experts=8, k=2, capacity_factor=None, dtype=jnp.bfloat16,
                         grouped_matmul=matmul, mesh=mesh, deterministic=True, rngs=nnx.Rngs(0, router=1),
                         **options)
        if mesh is not None:
            parallel.shard_moe_params(layer, mesh)
        layers.append(layer)
    return layers


@needs_interpreter_011
def test_dropless_layer_with_mosaic_matches_scan(sm_count):
    """A bf16 SwiGLU dropless layer with grouped_matmul="mosaic": output, aux and
    gradients (input, router, expert weights) equal the same layer with "scan"."""
    from tests.test_parallel import assert_tree_close, values_and_grads

    layers = _layers([None, None], ["scan", "mosaic"], activation="swiglu")
    kx, kr = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (4, 32, 64))
    r = jax.random.normal(kr, (4, 32, 64))
    expected, actual = values_and_grads(layers, x, None, r)
    assert float(np.max(np.abs(actual[2]["experts.w_in"]))) > 0
    assert_tree_close(actual, expected, rtol=3e-2)


@needs_8_devices
@pytest.mark.skipif(not ON_GPU and JAX_VERSION < (0, 11),
                    reason=f"jax {jax.__version__}'s Mosaic GPU interpreter deadlocks on a mesh (its ordered "
                           f"callbacks meet the mesh's all-reduce)")
@pytest.mark.skipif(not ON_GPU and JAX_VERSION >= (0, 12),
                    reason=f"jax {jax.__version__}'s XLA rejects the Mosaic GPU interpreter's io_callbacks inside "
                           f"shard_map (RET_CHECK: side-effect HLO cannot have a replicated sharding); runs "
                           f"compiled on a GPU and interpreted on jax 0.11")
def test_dropless_mesh_with_mosaic_forward_matches_one_device(sm_count):
    """On a 2 x 2 expert x 2 model mesh (ragged exchange, kernels inside shard_map, the
    hidden dim split over "model") the forward equals the one-device mosaic layer.
    (jax 0.10's interpreter deadlocks here: its ordered callbacks meet the mesh's
    all-reduce; jax 0.11.2 passed 4 of 4 runs.)"""
    from flax import nnx

    from tests.test_parallel import assert_tree_close

    one, ep = _layers([None, dict(data=2, expert=2, model=2)], ["mosaic", "mosaic"], dropless_exchange="ragged")
    x = jax.random.normal(jax.random.key(6), (4, 32, 64))
    expected, actual = jax.device_get(nnx.jit(lambda a, b, x: [a(x), b(x)])(one, ep, x))
    assert_tree_close(actual, expected, rtol=3e-2)
    assert float(actual[1]["dropped_fraction"]) == 0.0


@needs_8_devices
def test_dropless_mesh_with_mosaic_gradient_traces(sm_count):
    """The gradient of the mesh layer traces: the VJP's outputs carry the mesh axes their
    inputs vary over (a custom VJP inside shard_map must say so) and dx / dw are summed
    over the axes they vary over beyond their input's.

    Not run: Mosaic GPU's interpreter (jax 0.11.2) is not safe with several devices
    interpreting the dw kernel at once ("Barrier remains allocated" in 2 of 5 runs on 2
    CPU devices; never on one device); a multi-GPU run covers it."""
    from flax import nnx

    ep, = _layers([dict(data=2, expert=2, model=2)], ["mosaic"], dropless_exchange="ragged")
    x = jax.random.normal(jax.random.key(6), (4, 32, 64))

    def loss(model, x):
        y, _ = model(x)
        return jnp.sum(y.astype(jnp.float32))

    graphdef, state = nnx.split(ep)
    grads = jax.eval_shape(lambda state, x: nnx.grad(loss, argnums=(0, 1))(nnx.merge(graphdef, state), x), state, x)
    assert grads[1].shape == x.shape
    assert grads[0].experts.w_in.shape == ep.experts.w_in[...].shape


def test_dropless_layer_with_mosaic_lowers_for_cuda(sm_count, monkeypatch):
    """The bf16 SwiGLU dropless layer's forward + backward (w.r.t. the input and every
    weight) lowers for CUDA with the kernels compiled, not interpreted: 3 forward, 3 dx and
    3 dw Mosaic GPU calls (Mosaic's own lowering checks tiles and shared memory)."""
    from tests.lowering import dropless_layer_grad_text

    monkeypatch.setattr(mg, "interpret", lambda flag: False)  # as on a GPU
    text = dropless_layer_grad_text("mosaic", "cuda")
    assert text.count("custom_call @mosaic_gpu") == 9
