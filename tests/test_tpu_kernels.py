"""The TPU grouped matmul (jmoe/pallas/megablox_grouped_matmul.py: JAX's megablox Pallas TPU
kernels under jmoe's VJP) against a float64 per-group loop and jax.lax.ragged_dot: forward,
dx, dw, rows past the groups, empty groups, all rows dropped, sizes off the TPU tiles; the
dropless layer with it equals the scan layer on one device and on an expert mesh; it lowers
for TPU without one; "auto" on TPU; the interpret policy (no silent interpreter).

Off TPU the kernels run in Pallas's TPU interpret mode (``pltpu.InterpretParams``: VMEM, SMEM
and DMAs simulated, uninitialised memory NaN; inside ``shard_map`` the plain interpreter);
on a TPU, compiled (benchmarks/tpu_check.sh).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import platform
from jmoe.pallas import megablox_grouped_matmul as mb
from tests.test_grouped_matmul import loop_gmm, loop_tgmm, random_case, sin_loss_grads

ON_TPU = jax.default_backend() == "tpu"
SMALL = mb.MegabloxConfig(block_m=16)  # several row tiles at test sizes

needs_8_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices of the default backend "
                                     "(the emulated CPU devices when CPU is the default)")

# rows, K, F, group sizes (sum <= rows: the rest are rows past the groups)
CASES = {
    "straddling": (70, 24, 40, [5, 0, 33, 1, 31]),      # empty group, groups across 16-row tiles, rows padded to 80
    "padding-rows": (64, 32, 16, [10, 0, 20, 0]),       # 34 rows past the groups, trailing empty group
    "odd-dims-past-tiles": (37, 136, 130, [7, 11, 13, 6]),  # K, F > one 128 tile: zero-padded to 256
    "all-dropped": (32, 8, 8, [0, 0, 0]),               # no row in any group
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tpu_megablox_kernels_match_loop(name):
    """gmm, its transposed-weight form (dx) and tgmm (dw) against float64 loops; rows past
    the groups exactly 0, an empty expert's dw exactly 0."""
    n, k, f, sizes = CASES[name]
    x, w, gs, dy = random_case(1, n, k, f, sizes)
    total = sum(sizes)
    out = mb.megablox_gmm(x, w, gs, config=SMALL)
    assert out.shape == (n, f) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float64), loop_gmm(x, w, sizes), rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(out[total:]) == 0.0)
    dx = mb.megablox_gmm(dy, w, gs, transpose_w=True, config=SMALL)
    np.testing.assert_allclose(np.asarray(dx, np.float64), loop_gmm(dy, np.swapaxes(np.asarray(w), 1, 2), sizes),
                               rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(dx[total:]) == 0.0)
    dw = mb.megablox_tgmm(x, dy, gs, config=SMALL)
    assert dw.shape == (len(sizes), k, f)
    np.testing.assert_allclose(np.asarray(dw, np.float64), loop_tgmm(x, dy, sizes, len(sizes)), rtol=2e-5, atol=2e-5)
    for e, size in enumerate(sizes):
        if size == 0:
            assert np.all(np.asarray(dw[e]) == 0.0), f"expert {e} has no rows: dw must be exactly 0"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_megablox_gradients_match_ragged_dot(dtype):
    """jax.grad through the one grouped-matmul VJP == jax.grad through ragged_dot, for a
    nonlinear loss (dy varies per row), rows past the groups included."""
    n, k, f, sizes = CASES["straddling"]
    x, w, gs, c = random_case(3, n, k, f, sizes, dtype)

    got, want = sin_loss_grads(lambda a, b: mb.megablox_grouped_matmul(a, b, gs, SMALL), x, w, gs, c)
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    for g, r in zip(got, want):
        assert g.dtype == dtype
        r = np.asarray(r, np.float64)
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=tol, atol=tol * max(1.0, np.abs(r).max()))
    assert np.all(np.asarray(got[0][sum(sizes):], np.float32) == 0.0)  # rows past the groups: no gradient
    assert np.all(np.asarray(got[1][1], np.float32) == 0.0)  # expert 1 got no rows


def test_tpu_megablox_float16_runs_in_float32():
    n, k, f, sizes = CASES["padding-rows"]
    x, w, gs, _ = random_case(4, n, k, f, sizes, jnp.float16)
    out = mb.megablox_gmm(x, w, gs, config=SMALL)
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float64), loop_gmm(x, w, sizes), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bad, match", [
    (dict(block_m=24), "block_m must be a positive multiple of 16"),
    (dict(block_k=64), "block_k must be a positive multiple of 128"),
])
def test_tpu_megablox_bad_config_fails_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        mb.MegabloxConfig(**bad)


def test_tpu_megablox_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"x \[N, K\] and w \[E, K, F\]"):
        mb.megablox_gmm(jnp.zeros((16, 8)), jnp.zeros((2, 4, 8)), jnp.array([8, 8], jnp.int32))


def test_tpu_megablox_lowers_for_tpu():
    """Forward + backward at the default tiles and at sizes off the tiles lower to Mosaic TPU
    custom calls without a TPU (Pallas's TPU lowering: block shapes, the scalar-prefetch
    schedule; Mosaic's own compiler runs on the TPU host only)."""
    x, w, gs, _ = random_case(5, 300, 200, 384, [100, 0, 150, 20], jnp.bfloat16)
    config = mb.MegabloxConfig(interpret=False)
    traced = jax.jit(lambda x, w: jax.value_and_grad(
        lambda x, w: jnp.sum(mb.megablox_grouped_matmul(x, w, gs, config).astype(jnp.float32)),
        argnums=(0, 1))(x, w)).trace(x, w)
    text = traced.lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("custom_call @tpu_custom_call") == 3, "forward, dx and dw kernels"


def _layers(mesh_sizes, matmuls, **options):
    from flax import nnx

    import jmoe
    from jmoe import parallel

    layers = []
    for mesh_size, matmul in zip(mesh_sizes, matmuls):
        mesh = parallel.make_mesh(**mesh_size) if mesh_size else None
        layer = jmoe.MoE(64, 128, num_experts=4, k=2, capacity_factor=None, grouped_matmul=matmul, mesh=mesh,
                         deterministic=True, rngs=nnx.Rngs(0, router=1), **options)
        if mesh is not None:
            parallel.shard_moe_params(layer, mesh)
        layers.append(layer)
    return layers


def _inputs():
    kx, kr = jax.random.split(jax.random.key(5))
    return jax.random.normal(kx, (4, 16, 64)), jax.random.normal(kr, (4, 16, 64))


def test_tpu_dropless_layer_with_megablox_matches_scan():
    """A SwiGLU dropless layer with grouped_matmul="megablox": output, aux and gradients
    (input, router, expert weights) equal the same layer with "scan"."""
    from tests.test_parallel import assert_tree_close, values_and_grads

    x, r = _inputs()
    expected, actual = values_and_grads(_layers([None, None], ["scan", "megablox"], activation="swiglu"), x, None, r)
    assert float(np.max(np.abs(actual[2]["experts.w_in"]))) > 0
    assert_tree_close(actual, expected, rtol=1e-4)


@needs_8_devices
def test_tpu_dropless_mesh_with_megablox_matches_one_device_scan():
    """On a 2 data x 2 expert x 2 model mesh (ragged exchange, the kernels inside shard_map,
    the hidden dim split over "model"): forward and gradients equal the one-device scan layer."""
    from tests.test_parallel import assert_tree_close, values_and_grads

    x, r = _inputs()
    layers = _layers([None, dict(data=2, expert=2, model=2)], ["scan", "megablox"], dropless_exchange="ragged")
    expected, actual = values_and_grads(layers, x, None, r)
    assert_tree_close(actual, expected, rtol=1e-4)
    assert float(actual[1]["dropped_fraction"]) == 0.0


def test_tpu_dropless_layer_with_megablox_lowers_for_tpu(monkeypatch):
    """The bf16 SwiGLU dropless layer's forward + backward lowers for TPU with the kernels
    compiled: 3 forward, 3 dx and 3 dw kernel calls, each a Mosaic TPU custom call."""
    from tests.lowering import dropless_layer_grad_text

    monkeypatch.setattr(mb, "interpret", lambda flag, args=(): False)  # as on a TPU
    text = dropless_layer_grad_text("megablox", "tpu")
    # megablox's gmm / tgmm are jitted: one private function per shape, called per use
    calls = re.findall(r"call @(t?gmm)(?:_\d+)?\(", text)
    assert calls.count("gmm") == 6 and calls.count("tgmm") == 3, calls
    assert text.count("custom_call @tpu_custom_call") == len(re.findall(r"func.func private @t?gmm(?:_\d+)?\(", text))


def test_tpu_auto_choices(monkeypatch):
    """On TPU "auto" is megablox for the grouped matmul and gather for dispatch/combine."""
    from jmoe.dispatch import BACKENDS
    from jmoe.grouped_matmul import GROUPED_MATMULS

    monkeypatch.setattr(platform, "current", lambda: "tpu")
    assert GROUPED_MATMULS.resolve("auto") == "megablox"
    assert BACKENDS.resolve("auto") == "gather"


# ----------------------------------------------------------------------------
# no silent interpreter (jmoe.platform.interpret)
# ----------------------------------------------------------------------------


def _gmm_case():
    x, w, gs, _ = random_case(6, 32, 8, 8, [16, 16])
    return x, w, gs


@pytest.mark.skipif(ON_TPU, reason="megablox runs compiled here")
def test_tpu_kernel_off_tpu_is_an_error_unless_tests_opt_in(monkeypatch):
    from jmoe.grouped_matmul import grouped_matmul

    monkeypatch.delenv(platform.ALLOW_INTERPRET_ENV, raising=False)
    x, w, gs = _gmm_case()
    with pytest.raises(platform.UnsupportedPlatformError, match=r"grouped_matmul='megablox'.*compiled only on tpu"):
        grouped_matmul(x, w, gs, "megablox")
    with platform.allow_interpret():  # the explicit opt-in
        np.testing.assert_allclose(np.asarray(grouped_matmul(x, w, gs, "megablox")), loop_gmm(x, w, [16, 16]),
                                   rtol=2e-5, atol=2e-5)
    # an explicit interpret flag is a choice too
    mb.megablox_gmm(x, w, gs, config=mb.MegabloxConfig(interpret=True))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU kernels run compiled here")
@pytest.mark.parametrize("what", ["dispatch-pallas", "dispatch-mosaic", "gmm-pallas", "gmm-mosaic"])
def test_tpu_or_mosaic_gpu_kernels_off_gpu_are_an_error_unless_tests_opt_in(monkeypatch, what):
    """dispatch="pallas" and grouped_matmul pallas / mosaic off GPU: an error naming the
    platform, not the interpreter (each raises before any kernel runs)."""
    from flax import nnx

    import jmoe

    monkeypatch.delenv(platform.ALLOW_INTERPRET_ENV, raising=False)
    kind, name = what.split("-")
    options = dict(dispatch=name) if kind == "dispatch" else dict(capacity_factor=None, grouped_matmul=name)
    dtype = jnp.bfloat16 if what == "gmm-mosaic" else jnp.float32
    layer = jmoe.MoE(64, 128, num_experts=4, k=2, dtype=dtype, deterministic=True, rngs=nnx.Rngs(0), **options)
    with pytest.raises(platform.UnsupportedPlatformError, match="compiled only on gpu.*JMOE_ALLOW_INTERPRET=1"):
        jax.eval_shape(layer, jnp.zeros((2, 16, 64), dtype))
