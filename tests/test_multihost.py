"""The expert-parallel layer across 2 processes (jax.distributed, CPU collectives over gloo).

The test starts 2 local processes (127.0.0.1, a free port), each with 2 emulated
CPU devices; they build one 4-device expert mesh across both, run the layer's
forward and backward, and process 0 writes the results. The test compares them
with a one-device run in this process. Bounded: every wait has a timeout, and
the processes are killed if they overrun.

Run as a script (``python tests/test_multihost.py WORKER_ID PORT OUT``) it is
one of the workers.
"""

import os
import sys
import tempfile

import numpy as np

from tests.processes import cpu_env, free_port, run_all

D_MODEL, D_FF, NUM_EXPERTS, K = 16, 32, 8, 2
BATCH, SEQ = 8, 8
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
TIMEOUT_S = 240


def host_inputs():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(BATCH, SEQ, D_MODEL)).astype(np.float32)
    r = rng.normal(size=(BATCH, SEQ, D_MODEL)).astype(np.float32)
    return x, r


def build_layer(mesh):
    import jmoe
    from flax import nnx

    return jmoe.MoE(D_MODEL, D_FF, num_experts=NUM_EXPERTS, k=K, capacity_factor=1.0, dispatch="gather",
                    deterministic=True, rngs=nnx.Rngs(0), mesh=mesh)


def loss_and_grads(graphdef, state, x, r):
    """(y, aux, d loss / d state, d loss / d x) with loss = sum(y r) + load_balancing_loss."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def loss(params, rest, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * r) + aux["load_balancing_loss"], (y, aux)

    params, rest = state
    (_, (y, aux)), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)(params, rest, x)
    return y, aux, g_params, g_x


def flatten(tree, prefix=""):
    import jax

    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def worker(process_id: int, port: int, out_dir: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=NUM_PROCESSES, process_id=process_id,
        initialization_timeout=60,
    )
    try:
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec as P

        from jmoe import parallel

        assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS, jax.devices()
        mesh = parallel.make_mesh(expert=jax.device_count())  # {data: 1, expert: 4, model: 1}
        layer = build_layer(mesh)
        parallel.shard_moe_params(layer, mesh)  # experts P("expert", ...), router replicated
        graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
        rest = parallel.to_global(rest, mesh)  # the rng state: replicated global arrays
        x_host, r_host = host_inputs()
        x = parallel.to_global(x_host, mesh, P(("data", "expert")))
        replicated = NamedSharding(mesh, P())
        fn = jax.jit(lambda state, x: loss_and_grads(graphdef, state, x, r_host), out_shardings=replicated)
        y, aux, g_params, g_x = fn((params, rest), x)
        if process_id == 0:
            arrays = {"y": np.asarray(y), "g_x": np.asarray(g_x)}
            arrays.update(flatten(aux, "aux"))
            arrays.update(flatten(g_params, "grad"))
            np.savez(os.path.join(out_dir, "result.npz"), **arrays)
    finally:
        jax.distributed.shutdown()


def test_two_processes_match_one_device():
    import jax
    from flax import nnx

    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        commands = [[sys.executable, os.path.abspath(__file__), str(i), str(port), out_dir]
                    for i in range(NUM_PROCESSES)]
        for code, log in run_all(commands, cpu_env(DEVICES_PER_PROCESS), TIMEOUT_S):
            assert code == 0, f"worker exited with {code}:\n{log[-4000:]}"
        result = dict(np.load(os.path.join(out_dir, "result.npz")))

    # One device, same inputs and seed.
    layer = build_layer(None)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x, r = host_inputs()
    y, aux, g_params, g_x = jax.jit(lambda state, x: loss_and_grads(graphdef, state, x, r))((params, rest), x)
    expected = {"y": np.asarray(y), "g_x": np.asarray(g_x)}
    expected.update(flatten(aux, "aux"))
    expected.update(flatten(g_params, "grad"))
    assert sorted(result) == sorted(expected)
    for name, want in expected.items():
        scale = 1.0 + np.max(np.abs(want), initial=0.0)
        np.testing.assert_allclose(result[name], want, rtol=2e-5, atol=2e-5 * scale, err_msg=name)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
