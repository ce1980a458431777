"""jmoe.hf: a Hugging Face checkpoint's MoE layer as a jmoe.MoE, and back.

The checkpoints and transformers' recorded block outputs in tests/data/hf/ were made by
scripts/make_hf_vectors.py (transformers 5.24 / 5.25, torch 2.13 / 2.14) in a scratch environment; this
file imports neither torch nor transformers.
"""

import json
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("safetensors")

import jmoe  # noqa: E402
import jmoe.hf as hf  # noqa: E402
from jmoe import parallel  # noqa: E402
from jmoe.hf.files import Checkpoint  # noqa: E402
from jmoe.layer import RouterBuffer  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data" / "hf"
TOL = 2e-5  # relative, float32 (the bound)

# (checkpoint folder, record sub-folder, stack)
CASES = [
    ("mixtral", "", None), ("qwen2_moe", "", None), ("qwen3_moe", "", None), ("olmoe", "", None),
    ("deepseek_v3", "", None), ("deepseek_v3_fp8", "", None), ("deepseek_v2", "", None),
    ("gpt_oss", "", None), ("gpt_oss_mxfp4", "", None), ("llama4_text", "", None), ("llama4", "", None),
    ("switch_transformers", "encoder", "encoder"), ("switch_transformers", "decoder", "decoder"),
]
# transformers 5.25's families on the blocks above (tests/data/hf/README.md): d = 16, fused and per-expert layouts
NEW_FAMILIES = [
    "glm4_moe", "glm4_moe_lite", "glm4v_moe", "dots1", "deepseek_v32", "exaone_moe", "mimo_v2_flash", "qwen3_next",
    "qwen3_5_moe_text", "qwen3_vl_moe_text", "qwen3_vl_moe", "flex_olmo", "ernie4_5_moe", "hunyuan_v1_moe", "minimax",
    "minimax_m2", "dbrx", "granitemoe", "granitemoeshared", "aria_text", "cohere2_moe", "afmoe", "jamba",
    "sarvam_moe", "sarvam_mla", "solar_open", "minicpm5_moe", "glm_moe_dsa", "kimi_linear", "mistral4",
    "mistral_large4_text", "qwen4_exp_text", "qwen3_omni_moe_text", "mellum", "lara_mini", "granitemoehybrid",
    "granitemoe_swa", "qwen3_5_moe", "hy_v3", "minimax_m3_vl_text", "flint", "beam", "dots3_note_text",
    "openai_privacy_filter", "deepseek_ocr2_text", "unlimited_ocr_text", "lfm2_moe", "laguna", "kolibri1",
    "kolibri1_1", "hy_v4", "hy_v4_vl_text", "glm5_next_text", "longcat_flash", "phimoe", "step3p5", "step3p7",
    "bailing_hybrid", "inkling2_text", "inkling2_loop_text", "deepseek_v4", "ergo", "inkling_text",
    # blocks with norms / projections / a dense branch / a bias / two expert sets around the experts (jmoe.hf.blocks)
    "axk1", "axk2", "jetmoe", "muse_spark_text", "nemotron_h", "gemma4_text", "diffusion_gemma_text",
    "ernie4_5_vl_moe", "ernie4_5_vl_moe_text",
]
NEW_FAMILIES += ["doge"]  # product keys over single-neuron experts, recorded on one 16-token sequence
CASES += [(case, "", None) for case in NEW_FAMILIES]
CASES += [("deepseek_v4", "moe", None)]  # its top-k layer (the root record: a hash layer, routed by token id)
# encoder-decoder families recorded per stack (tests/data/hf/<case>/<stack>/)
CASES += [("nllb_moe", "encoder", "encoder"), ("nllb_moe", "decoder", "decoder")]


def record(case: str, sub: str = ""):
    folder = DATA / case / sub
    info = json.loads((folder / "case.json").read_text())
    return info, np.load(folder / "x.npy"), np.load(folder / "y.npy")


def recorded_token_ids(case: str, sub: str = ""):
    """The token ids transformers' block read (a hash-routed layer: DeepSeek-V4's), else None."""
    path = DATA / case / sub / "token_ids.npy"
    return np.load(path) if path.exists() else None


def rel_err(out, ref) -> float:
    return float(np.max(np.abs(np.asarray(out, np.float64) - ref)) / np.max(np.abs(ref)))


def load(case: str, layer: int, stack=None, **kwargs) -> jmoe.MoE:
    return hf.load_moe(DATA / case, layer, **({"stack": stack} if stack else {}), **kwargs)


FORWARD = nnx.jit(lambda m, x: m(x))  # one jitted function: layers of one structure (families sharing a block) share a compile
FORWARD_TYPED = nnx.jit(lambda m, x, types: m(x, token_type_ids=types))  # Ernie 4.5-VL: text / vision tokens
FORWARD_IDS = nnx.jit(lambda m, x, ids: m(x, token_ids=ids))  # a layer routed by token id


def run(moe, x, token_type_ids=None, token_ids=None):
    if token_type_ids is not None:
        y, aux = FORWARD_TYPED(moe, jax.numpy.asarray(x), jax.numpy.asarray(token_type_ids))
    elif token_ids is not None:
        y, aux = FORWARD_IDS(moe, jax.numpy.asarray(x), jax.numpy.asarray(token_ids))
    else:
        y, aux = FORWARD(moe, jax.numpy.asarray(x))
    return np.asarray(y), aux


def inner(block) -> jmoe.MoE:
    """The jmoe.MoE of what load_moe returned (itself, or a jmoe.hf.blocks module's ``moe``)."""
    return getattr(block, "moe", block)


def token_types(case: str):
    """The recorded token types of a modality-isolated case (Ernie 4.5-VL), else None."""
    path = DATA / case / "token_type_ids.npy"
    return np.load(path) if path.exists() else None


def weights(moe) -> dict:
    kinds = nnx.Any(nnx.Param, jmoe.SelectionBias, RouterBuffer)
    return {"/".join(map(str, path)): np.asarray(value) for path, value in nnx.to_flat_state(nnx.state(moe, kinds))}


@pytest.mark.parametrize("case,sub,stack", CASES, ids=[c + (f"-{s}" if s else "") for c, s, _ in CASES])
def test_reproduces_transformers_block_output(case, sub, stack):
    info, x, y_ref = record(case, sub)
    moe = load(case, info["layer"], stack)
    assert inner(moe).deterministic  # returned in eval mode
    y, aux = run(moe, x, token_types(case), recorded_token_ids(case, sub))
    assert y.shape == y_ref.shape and y.dtype == np.float32
    assert rel_err(y, y_ref) <= TOL, (case, rel_err(y, y_ref))
    if "dropped" in info:  # the capacity drops transformers made are jmoe's drops too (Switch, NLLB-MoE)
        experts = np.load(DATA / case / sub / "experts.npy")
        assert float(aux["dropped_fraction"]) == pytest.approx(np.mean(experts < 0))
        assert np.mean(experts < 0) > 0
    else:
        assert float(aux["dropped_fraction"]) == 0.0


def test_family_semantics_in_the_layer():
    """The layer carries each family's knobs (checked against config.json, not model names)."""
    deepseek = load("deepseek_v3", 1)
    assert deepseek.router.name == "group_limited" and deepseek.router.n_group == 4
    assert deepseek.router.routed_scaling_factor == 2.5 and deepseek.router.normalize
    bias = np.asarray(deepseek.selection_bias[...])
    assert bias.dtype == np.float32 and np.any(bias != 0)  # e_score_correction_bias
    assert deepseek.shared_expert.w_in[...].shape == (32, 2 * 16)  # n_shared_experts * moe_intermediate_size
    assert load("deepseek_v2", 1).router.score_function == "softmax"
    qwen2 = load("qwen2_moe", 1)
    assert qwen2.shared_expert.gate_weight[...].shape == (32, 1)
    gpt = load("gpt_oss_mxfp4", 0)
    assert gpt.router_bias[...].shape == (4,) and gpt.experts.b_gate[...].shape == (4, 32)
    assert not hasattr(load("qwen3_moe", 1), "shared_expert")
    switch = load("switch_transformers", 1)
    assert switch.capacity(8) == 3  # config.expert_capacity per sequence


def test_mxfp4_and_fp8_dequantize_to_the_stored_reference():
    """The quantized checkpoints load to the same layers as their float twins would need: the
    MXFP4 experts are exact values on the e2m1 x 2^e grid, the FP8 ones on the e4m3 grid."""
    gpt = load("gpt_oss_mxfp4", 0)
    w = np.asarray(gpt.experts.w_gate[...])
    assert np.all(np.isfinite(w)) and len(np.unique(np.abs(w))) < w.size
    fp8 = Checkpoint(DATA / "deepseek_v3_fp8")
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert fp8.stored_dtype(name) == "F8_E4M3" and f"{name}_scale_inv" in fp8
    np.testing.assert_array_equal(np.asarray(load("deepseek_v3_fp8", 1).experts.w_gate[...])[0], fp8.float32(name).T)


def test_sharded_checkpoint_reads_only_the_layers_files(monkeypatch):
    index = json.loads((DATA / "mixtral" / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for n, f in index.items() if n.startswith("model.layers.0.block_sparse_moe.")}
    assert len(set(index.values())) > 1  # sharded
    opened = []
    import safetensors

    real = safetensors.safe_open

    def spy(file, *args, **kwargs):
        opened.append(pathlib.Path(file).name)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    load("mixtral", 0)
    assert opened and set(opened) <= needed


ROUND_TRIPS = [("mixtral", 0, None), ("qwen2_moe", 1, None), ("deepseek_v3", 1, None), ("gpt_oss", 0, None),
               ("llama4", 1, None), ("switch_transformers", 1, "decoder")]
ROUND_TRIPS += [(case, json.loads((DATA / case / "case.json").read_text())["layer"], None) for case in NEW_FAMILIES]
ROUND_TRIPS += [("nllb_moe", 1, "encoder"), ("nllb_moe", 1, "decoder")]


@pytest.mark.parametrize("case,layer,stack", ROUND_TRIPS,
                         ids=[case + (f"-{stack}" if case == "nllb_moe" else "") for case, _, stack in ROUND_TRIPS])
def test_load_save_load_round_trip(tmp_path, case, layer, stack):
    folder = tmp_path / case
    shutil.copytree(DATA / case, folder)
    moe = load(case, layer, stack)
    written = hf.save_moe(moe, folder, layer, json.loads((folder / "config.json").read_text())["model_type"],
                          **({"stack": stack} if stack else {}))
    assert written
    again = hf.load_moe(folder, layer, **({"stack": stack} if stack else {}))
    for name, value in weights(moe).items():
        np.testing.assert_array_equal(weights(again)[name], value, err_msg=name)
    before, after = Checkpoint(DATA / case), Checkpoint(folder)
    for name in before.names():  # every tensor as it was (the layer's too: its values came from there)
        assert before.stored_dtype(name) == after.stored_dtype(name)
        np.testing.assert_array_equal(before.raw(name), after.raw(name), err_msg=name)


def test_fine_tuned_layer_goes_back_into_a_checkpoint(tmp_path):
    moe = load("deepseek_v3", 1)
    state = nnx.state(moe, nnx.Param)
    nnx.update(moe, jax.tree.map(lambda p: p * 1.5 + 0.01, state))  # "fine-tuned"
    folder = tmp_path / "tuned"
    folder.mkdir()
    shutil.copy(DATA / "deepseek_v3" / "config.json", folder)
    assert hf.save_moe(moe, folder, 1, "deepseek_v3") == ["model.safetensors"]  # a new float32 file
    again = hf.load_moe(folder, 1)
    for name, value in weights(moe).items():
        np.testing.assert_array_equal(weights(again)[name], value, err_msg=name)
    names = set(Checkpoint(folder).names())
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in names


def test_save_into_a_quantized_checkpoint_is_an_error(tmp_path):
    shutil.copytree(DATA / "gpt_oss_mxfp4", tmp_path / "q")
    with pytest.raises(hf.CheckpointError, match="mxfp4-quantized.*new folder"):
        hf.save_moe(load("gpt_oss_mxfp4", 0), tmp_path / "q", 0, "gpt_oss")


@pytest.mark.parametrize("case", ["deepseek_v3", "gpt_oss", "muse_spark_text"])  # muse: a block, its router's input
def test_mesh_equals_one_device(case):
    info, x, y_ref = record(case)
    x = np.tile(x, (4, 1, 1))  # 8 sequences: one group per device
    mesh = parallel.make_mesh(data=2, expert=4)
    sharded = load(case, info["layer"], mesh=mesh)
    assert inner(sharded).experts.w_in[...].sharding.spec[0] == "expert"
    assert inner(sharded).experts.w_out[...].sharding.spec[0] == "expert"
    y_mesh, _ = run(sharded, x)
    y_one, _ = run(load(case, info["layer"]), x)
    np.testing.assert_allclose(y_mesh, y_one, rtol=1e-5, atol=1e-5 * np.max(np.abs(y_one)))
    assert rel_err(y_mesh, np.tile(y_ref, (4, 1, 1))) <= TOL


@pytest.mark.parametrize("case", sorted({c for c, _, _ in CASES}))
def test_moe_kwargs_builds_a_fresh_layer_of_the_family(case):
    config = json.loads((DATA / case / "config.json").read_text())
    stack = "encoder" if (DATA / case / "encoder").is_dir() else None  # an encoder-decoder's default stack
    info = json.loads((DATA / case / (stack or "") / "case.json").read_text())
    kwargs = hf.moe_kwargs(config, layer=info["layer"], stack=stack)  # the layer's own options (Step-3.5's clamps)
    assert {"d_model", "d_ff", "num_experts", "k"} <= set(kwargs)
    fresh = jmoe.MoE(**kwargs, rngs=nnx.Rngs(0))  # the jmoe.MoE (inside the block, for a jmoe.hf.blocks family)
    block = load(case, info["layer"])
    loaded = inner(block)
    assert jax.tree.map(np.shape, weights(fresh)) == jax.tree.map(np.shape, weights(loaded))
    assert fresh.router == loaded.router and fresh.experts.activation == loaded.experts.activation
    whole = hf.moe_block(config, layer=info["layer"], stack=stack)  # the whole block: the same module as load_moe's
    assert type(whole) is type(block)
    assert jax.tree.map(np.shape, weights(whole)) == jax.tree.map(np.shape, weights(block))


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_nllb_moe_mixes_the_chosen_experts_where_transformers_does_not(stack):
    """transformers 5.25's NLLB-MoE block (``y_transformers.npy``) one-hot encodes its router's 0/1
    top-1 mask as if it held expert indices: every token goes through expert 1, weighted by its
    top-1 expert's weight, and through expert 0, weighted by the rest. jmoe mixes the chosen experts,
    as fairseq's MOELayer does (``y.npy``, the reference above). From jmoe's own plan (weights
    renormalised after the drops, times 1 - moe_token_dropout) and experts, in float64: the
    intended mixture is jmoe's output, the miswired one is transformers' output."""
    info, x, y_ref = record("nllb_moe", stack)
    y_hf = np.load(DATA / "nllb_moe" / stack / "y_transformers.npy")
    moe = load("nllb_moe", info["layer"], stack)
    y, _ = run(moe, x)
    assert rel_err(y, y_hf) > 0.3  # not transformers' output
    plan = moe.route(jax.numpy.asarray(x))  # x [1, 16, d]: one group
    experts, slots = np.asarray(plan.token_expert)[0], np.asarray(plan.token_slot)[0]  # [T, 2]
    w = np.einsum("tke,tk->te", np.eye(4)[experts], np.asarray(plan.token_weight, np.float64)[0])  # [T, E]
    xs = x.reshape(-1, x.shape[-1]).astype(np.float64)
    p = {n: np.asarray(getattr(moe.experts, n)[...], np.float64) for n in ("w_in", "b_in", "w_out", "b_out")}
    ffn = [np.maximum(xs @ p["w_in"][e] + p["b_in"][e], 0) @ p["w_out"][e] + p["b_out"][e] for e in range(4)]
    assert rel_err(sum(w[:, e:e + 1] * ffn[e] for e in range(4)), y_ref.reshape(xs.shape)) <= TOL
    w_top1 = np.where(slots[:, 0] >= 0, w[np.arange(len(w)), experts[:, 0]], 0.0)[:, None]  # 0: top-1 dropped
    miswired = ffn[1] * w_top1 + ffn[0] * (w.sum(1, keepdims=True) - w_top1)
    assert rel_err(miswired, y_hf.reshape(xs.shape)) <= TOL
    assert 0 < info["kept_one"] and float(plan.dropped_fraction) > 0  # renormalised after some drops


def test_a_fresh_deepseek_layer_trains():
    """moe_kwargs' layer (group-limited sigmoid routing, selection bias, shared experts) takes a
    gradient step: every parameter gets a finite gradient, the selection bias none."""
    config = json.loads((DATA / "deepseek_v3" / "config.json").read_text())
    moe = jmoe.MoE(**hf.moe_kwargs(config), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))

    @nnx.jit
    def grads(m, x):
        def loss(m):
            y, aux = m(x)
            return (y ** 2).mean() + 0.01 * aux["load_balancing_loss"]
        return nnx.grad(loss)(m)

    g = grads(moe, x)
    leaves = jax.tree.leaves(g)
    assert leaves and all(np.all(np.isfinite(v)) for v in leaves)
    assert np.any(np.asarray(g.shared_expert.w_in[...]) != 0) and np.any(np.asarray(g.router_weight[...]) != 0)
    assert "selection_bias" not in nnx.to_pure_dict(g)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("case,layer,stack,match", [
    ("deepseek_v3", 0, None, r"layer 0 .* is dense .*first_k_dense_replace=1"),
    ("deepseek_v2", 0, None, r"first_k_dense_replace"),
    ("qwen2_moe", 0, None, r"layer 0 .* is dense .*mlp_only_layers"),
    ("qwen3_moe", 0, None, r"layer 0 .* is dense .*decoder_sparse_step=2"),
    ("llama4_text", 0, None, r"layer 0 .* is dense .*MoE layers are \[1\]"),
    ("switch_transformers", 0, "encoder", r"layer 0 of the encoder .* is dense .*encoder_sparse_step=2"),
    ("switch_transformers", 0, "decoder", r"decoder_sparse_step"),
    ("mixtral", 2, None, r"layer=2: .* has 2 layers"),
])
def test_dense_or_absent_layer_is_a_clear_error(case, layer, stack, match):
    with pytest.raises(hf.CheckpointError, match=match):
        load(case, layer, stack)


def copy_with(tmp_path, case, edit_config=None):
    folder = tmp_path / case
    shutil.copytree(DATA / case, folder)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unsupported_model_type_lists_the_supported(tmp_path):
    folder = copy_with(tmp_path, "olmoe", lambda c: c.update(model_type="llama"))
    with pytest.raises(hf.CheckpointError, match=r"'llama' is not supported.*mixtral.*gpt_oss.*switch_transformers"):
        hf.load_moe(folder, 0)
    with pytest.raises(hf.CheckpointError, match="not supported"):
        hf.moe_kwargs({"model_type": "bert"})


@pytest.mark.parametrize("model_type,missing", [("gemma4_unified_text", "an MoE block: transformers 5.25's Gemma 4 "
                                                                        "Unified text model has none"),
                                                ("zaya", "its router state carried from layer to layer")])
def test_a_known_unsupported_family_names_what_it_needs(tmp_path, model_type, missing):
    """transformers' MoE model types jmoe.hf does not load yet say what their block needs
    (tests/data/hf/FAMILIES.md), not just that they are unsupported."""
    folder = copy_with(tmp_path, "olmoe", lambda c: c.update(model_type=model_type))
    with pytest.raises(hf.CheckpointError, match=f"{model_type}: needs {missing}.*not supported by jmoe.hf yet"):
        hf.load_moe(folder, 0)


def test_missing_tensor_names_it(tmp_path):
    folder = copy_with(tmp_path, "mixtral")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.block_sparse_moe.experts.3.w3.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hf.CheckpointError, match=r"'model\.layers\.0\.block_sparse_moe\.experts\.3\.w3\.weight' is "
                                                 r"missing"):
        hf.load_moe(folder, 0)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    folder = copy_with(tmp_path, "qwen3_moe", lambda c: c.update(moe_intermediate_size=24))
    with pytest.raises(hf.CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' has shape "
                                                 r"\(16, 32\) .*expected \(24, 32\)"):
        hf.load_moe(folder, 1)


def test_non_finite_weight_names_it(tmp_path):
    from safetensors.numpy import save_file
    folder = copy_with(tmp_path, "gpt_oss")
    checkpoint = Checkpoint(folder)
    tensors = {n: checkpoint.raw(n) for n in checkpoint.names()}
    bad = tensors["model.layers.0.mlp.experts.down_proj_bias"].astype(np.float32)
    bad[1, 2] = np.nan
    tensors["model.layers.0.mlp.experts.down_proj_bias"] = bad
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(hf.CheckpointError, match=r"'model\.layers\.0\.mlp\.experts\.down_proj_bias' has non-finite"):
        hf.load_moe(folder, 0)


def test_hub_id_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hf.CheckpointError, match=r"hub id.*downloads nothing: download it first"):
        hf.load_moe("mistralai/Mixtral-8x7B-v0.1", 0)
    with pytest.raises(hf.CheckpointError, match="does not exist"):
        hf.load_moe(tmp_path / "nowhere", 0)


def test_recorded_checkpoints_stay_tiny():
    """Each recorded case is a tiny model (a few to 100s of KB): a config that leaves an attention
    or indexer size at its default would add megabytes to the repository."""
    sizes = {folder.name: sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
             for folder in DATA.iterdir() if folder.is_dir()}
    assert max(sizes.values()) < 400_000, max(sizes.items(), key=lambda item: item[1])
    assert sum(sizes.values()) < 5_000_000


def test_no_torch_and_only_jmoe_hf_imports_safetensors():
    assert "torch" not in sys.modules and "transformers" not in sys.modules
    root = pathlib.Path(jmoe.__file__).parent
    users = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
             if "safetensors" in p.read_text() and p.parts[len(root.parts)] != "hf"]
    assert users == []


def test_readme_snippet_runs(monkeypatch):
    import re
    root = pathlib.Path(__file__).parent.parent
    section = (root / "README.md").read_text().split("## Bring a checkpoint's MoE layer", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(root)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    info, x, y_ref = record("deepseek_v3")
    assert namespace["y"].shape == (2, 8, 32)
    assert rel_err(run(namespace["moe"], x)[0], y_ref) <= TOL
    assert namespace["sharded"].experts.w_in[...].sharding.spec[0] == "expert"
    assert set(weights(namespace["fresh"])) == set(weights(namespace["moe"]))


def test_llama4_text_model_under_either_multimodal_prefix(tmp_path):
    """Llama 4's text model inside the multimodal checkpoint: the hub's ``language_model.model.``
    and the ``model.language_model.`` some transformers versions write both load."""
    from safetensors.numpy import save_file
    folder = copy_with(tmp_path, "llama4")
    checkpoint = Checkpoint(folder)
    renamed = {n.replace("language_model.model.", "model.language_model.", 1): checkpoint.raw(n)
               for n in checkpoint.names()}
    save_file(renamed, folder / "model.safetensors")
    info, x, y_ref = record("llama4")
    assert rel_err(run(hf.load_moe(folder, info["layer"]), x)[0], y_ref) <= TOL


@pytest.mark.parametrize("case,text_type", [("glm4v_moe", "glm4v_moe_text"), ("qwen3_vl_moe", "qwen3_vl_moe_text"),
                                            ("qwen3_5_moe", "qwen3_5_moe_text")])
def test_multimodal_checkpoints_text_model_as_its_own_checkpoint(tmp_path, case, text_type):
    """The text model of a multimodal checkpoint (``text_config``; tensors under
    ``model.language_model.``) saved as its own: its config, its tensors under ``model.``: the
    same layer as from the multimodal checkpoint, and transformers' recorded block output."""
    from safetensors.numpy import save_file
    folder = tmp_path / text_type
    folder.mkdir()
    config = json.loads((DATA / case / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config["text_config"], model_type=text_type)))
    checkpoint = Checkpoint(DATA / case)
    save_file({n.replace("model.language_model.", "model.", 1): checkpoint.raw(n) for n in checkpoint.names()
               if n.startswith("model.language_model.")}, folder / "model.safetensors")
    info, x, y_ref = record(case)
    moe = hf.load_moe(folder, info["layer"])
    assert rel_err(run(moe, x)[0], y_ref) <= TOL
    for name, value in weights(load(case, info["layer"])).items():
        np.testing.assert_array_equal(weights(moe)[name], value, err_msg=name)


@pytest.mark.parametrize("prefix", ["thinker.model.", "thinker.model.language_model."])
def test_qwen3_omni_checkpoint_reads_the_thinkers_text_model(tmp_path, prefix):
    """A Qwen3-Omni checkpoint (``thinker_config.text_config``; the thinker's text model under
    ``thinker.model.``, or ``thinker.model.language_model.`` as transformers 5 holds it) loads
    the recorded ``qwen3_omni_moe_text`` layer."""
    from safetensors.numpy import save_file
    folder = tmp_path / "omni"
    folder.mkdir()
    text = json.loads((DATA / "qwen3_omni_moe_text" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_omni_moe",
                                                    "thinker_config": {"text_config": text}}))
    checkpoint = Checkpoint(DATA / "qwen3_omni_moe_text")
    save_file({prefix + n: checkpoint.raw(n) for n in checkpoint.names()}, folder / "model.safetensors")
    info, x, y_ref = record("qwen3_omni_moe_text")
    assert rel_err(run(hf.load_moe(folder, info["layer"]), x)[0], y_ref) <= TOL


@pytest.mark.parametrize("case,multimodal", [("inkling2_text", "inkling2"), ("inkling2_loop_text", "inkling2_loop")])
def test_inkling2_multimodal_checkpoint_reads_its_text_model(tmp_path, case, multimodal):
    """Inkling-2's multimodal checkpoint (``text_config``; the text model under the same original
    ``model.llm.`` names as the text model's own checkpoint) loads the recorded text layer."""
    folder = tmp_path / multimodal
    shutil.copytree(DATA / case, folder)
    text = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": multimodal, "text_config": text}))
    info, x, y_ref = record(case)
    moe = hf.load_moe(folder, info["layer"])
    for name, value in weights(load(case, info["layer"])).items():
        np.testing.assert_array_equal(weights(moe)[name], value, err_msg=name)
    assert rel_err(run(moe, x)[0], y_ref) <= TOL


def test_qwen3_vl_moe_fused_experts_in_either_layout(tmp_path):
    """Qwen3-VL-MoE's hub checkpoints hold ``gate_up_proj [E, d, 2f]`` / ``down_proj [E, f, d]``,
    transformers 5.25 saves them as ``[E, 2f, d]`` / ``[E, d, f]`` (and reads both): both load to
    the same layer, and save_moe writes each back in the layout it found."""
    from safetensors.numpy import save_file
    folder = copy_with(tmp_path, "qwen3_vl_moe")
    checkpoint = Checkpoint(folder)
    fused = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    tensors = {n: (np.ascontiguousarray(np.swapaxes(checkpoint.raw(n), -1, -2)) if n.endswith(fused)
                   else checkpoint.raw(n)) for n in checkpoint.names()}
    save_file(tensors, folder / "model.safetensors")
    info, x, y_ref = record("qwen3_vl_moe")
    moe = hf.load_moe(folder, info["layer"])
    assert rel_err(run(moe, x)[0], y_ref) <= TOL
    hf.save_moe(moe, folder, info["layer"], "qwen3_vl_moe")
    after = Checkpoint(folder)
    for name in tensors:
        np.testing.assert_array_equal(after.raw(name), tensors[name], err_msg=name)


def test_dequantizers_by_hand():
    from jmoe.hf.files import dequantize_fp8, dequantize_mxfp4
    blocks = np.zeros((1, 1, 1, 16), np.uint8)
    blocks[0, 0, 0, 0] = 0x21  # low nibble: code 1 (0.5), high nibble: code 2 (1.0)
    blocks[0, 0, 0, 1] = 0xF9  # code 9 (-0.5), code 15 (-6.0)
    w = dequantize_mxfp4(blocks, np.full((1, 1, 1), 128, np.uint8))  # x 2^(128 - 127)
    assert w.shape == (1, 32, 1)  # [E, in, out]: blocks run along the input dim, transposed
    np.testing.assert_array_equal(w[0, :4, 0], [1.0, 2.0, -1.0, -12.0])
    assert not np.any(w[0, 4:])
    fp8 = dequantize_fp8(np.ones((200, 130), np.float32), np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "w")
    assert (fp8[127, 127], fp8[127, 128], fp8[128, 0], fp8[199, 129]) == (1.0, 2.0, 3.0, 4.0)  # partial last blocks
    with pytest.raises(hf.CheckpointError, match="needs weight_scale_inv of shape"):
        dequantize_fp8(np.ones((200, 130), np.float32), np.ones((1, 2), np.float32), "w")


def fp8_reference(weight_fp8: np.ndarray, scale_inv: np.ndarray, block) -> np.ndarray:
    """Block-scaled FP8 by the definition, one element at a time: element (i, j) of the
    ``[rows, cols]`` weight is scaled by ``scale_inv[i // block[0], j // block[1]]`` (the
    config's ``weight_block_size`` is [rows, cols]; a dim's last block may be partial)."""
    w = weight_fp8.astype(np.float32)
    out = np.empty_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out[i, j] = w[i, j] * scale_inv[i // block[0], j // block[1]]
    return out


def random_fp8(rng, shape):
    import ml_dtypes
    return rng.normal(0.0, 2.0, shape).astype(ml_dtypes.float8_e4m3fn)


def random_scale_inv(rng, shape):
    return rng.uniform(0.5, 4.0, shape).astype(np.float32)  # a different scale per block


@pytest.mark.parametrize("shape,block", [((4, 8), (2, 4)), ((6, 8), (4, 2)), ((5, 10), (2, 4)), ((5, 5), (3, 4))],
                         ids=["2x4", "4x2", "2x4-ragged", "3x4-ragged-same-grid"])
def test_fp8_non_square_blocks_are_rows_by_columns(tmp_path, shape, block):
    """``weight_block_size: [r, c]`` is r rows (the output dim) by c columns (the input dim) of
    the stored ``[out, in]`` weight, as DeepSeek-V3's ``weight_dequant`` reads it; a square
    128 x 128 block cannot tell the two apart. A checkpoint of one FP8 weight and its
    ``weight_scale_inv`` (one random scale per block) dequantizes, both by
    ``Checkpoint.float32`` (the config's block size) and by ``dequantize_fp8``, to the
    element-wise reference; with ragged last blocks too (5 x 5 in 3 x 4 blocks has the same
    2 x 2 scale grid as in 4 x 3 blocks: a swapped block size is wrong values, not an error)."""
    from safetensors.numpy import save_file

    from jmoe.hf.files import dequantize_fp8
    rng = np.random.default_rng(sum(shape) + 10 * sum(block))
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    weight, scale_inv = random_fp8(rng, shape), random_scale_inv(rng, grid)
    save_file({"w": weight, "w_scale_inv": scale_inv}, tmp_path / "model.safetensors")
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}
    checkpoint = Checkpoint(tmp_path, config)
    assert checkpoint.quantization("w") == "fp8" and checkpoint.stored_dtype("w") == "F8_E4M3"
    want = fp8_reference(weight, scale_inv, block)
    np.testing.assert_array_equal(checkpoint.float32("w"), want)
    np.testing.assert_array_equal(dequantize_fp8(weight.astype(np.float32), scale_inv, "w", block), want)


def test_a_deepseek_fp8_layer_with_non_square_blocks_loads_rows_by_columns(tmp_path):
    """The DeepSeek-V3 FP8 checkpoint re-scaled in 2 x 4 blocks (config ``weight_block_size:
    [2, 4]``, every ``weight_scale_inv`` replaced by one random scale per 2 x 4 block of its
    weight): the loaded layer's experts and shared expert are the element-wise reference,
    transposed to the ``x @ W`` layout."""
    from safetensors.numpy import save_file
    folder = copy_with(tmp_path, "deepseek_v3_fp8", lambda c: c["quantization_config"].update(weight_block_size=[2, 4]))
    stored = Checkpoint(folder)
    rng = np.random.default_rng(0)
    tensors = {n: stored.raw(n) for n in stored.names()}
    for name in [n for n in tensors if n.endswith("_scale_inv")]:
        rows, cols = tensors[name.removesuffix("_scale_inv")].shape
        tensors[name] = random_scale_inv(rng, (-(-rows // 2), -(-cols // 4)))
    (folder / "model.safetensors").unlink()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    moe = hf.load_moe(folder, 1)

    def want(name):
        return fp8_reference(tensors[f"model.layers.1.mlp.{name}.weight"],
                             tensors[f"model.layers.1.mlp.{name}.weight_scale_inv"], (2, 4)).T

    for e in range(8):
        for attr, proj in (("w_gate", "gate_proj"), ("w_in", "up_proj"), ("w_out", "down_proj")):
            np.testing.assert_array_equal(np.asarray(getattr(moe.experts, attr)[...])[e], want(f"experts.{e}.{proj}"))
    np.testing.assert_array_equal(np.asarray(moe.shared_expert.w_gate[...]), want("shared_experts.gate_proj"))
    np.testing.assert_array_equal(np.asarray(moe.shared_expert.w_out[...]), want("shared_experts.down_proj"))


def test_switch_router_jitter_is_train_mode_only(tmp_path):
    folder = copy_with(tmp_path, "switch_transformers", lambda c: c.update(router_jitter_noise=0.01))
    info, x, y_ref = record("switch_transformers", "encoder")
    moe = hf.load_moe(folder, info["layer"])
    assert moe.router.jitter == 0.01
    assert rel_err(moe(jax.numpy.asarray(x))[0], y_ref) <= TOL  # eval: no jitter
    moe.train()
    assert np.all(np.isfinite(moe(jax.numpy.asarray(x))[0]))


def test_bfloat16_layer():
    info, x, y_ref = record("qwen2_moe")
    moe = load("qwen2_moe", info["layer"], dtype=jax.numpy.bfloat16)
    assert moe.experts.w_in[...].dtype == jax.numpy.bfloat16 and moe.router_weight[...].dtype == np.float32
    y, _ = moe(jax.numpy.asarray(x))
    assert rel_err(np.asarray(y, np.float32), y_ref) < 0.05


# ---------------------------------------------------------------- blocks with pieces around their experts


def test_block_pieces_come_from_the_config():
    """What each block holds around its jmoe.MoE, read from config.json, not from a model name."""
    gemma = load("gemma4_text", 1)
    assert isinstance(gemma, hf.blocks.MoEBlock) and gemma.moe.router.input_norm_eps == 1e-6
    assert gemma.moe.router.per_expert_scale and gemma.shared_expert.w_gate[...].shape == (16, 24)  # the dense MLP
    assert {"in_norm", "out_norm", "shared_in_norm", "shared_out_norm", "post_norm"} <= set(vars(gemma))
    muse = load("muse_spark_text", 1)
    assert (muse.moe.d_model, muse.moe.router_d_model, muse.in_proj.kernel[...].shape) == (10, 16, (16, 10))
    assert muse.moe.experts.activation.output_norm.scale_first and muse.moe.router.logit_multiplier == 0.7
    nemotron = load("nemotron_h", 1)
    assert nemotron.moe.experts.activation.name == "relu2" and not hasattr(nemotron.moe, "shared_expert")
    assert nemotron.shared_expert.w_in[...].shape == (16, 12)  # on the hidden state, not the latent one
    config = json.loads((DATA / "nemotron_h" / "config.json").read_text())
    plain = hf.moe_block(dict(config, moe_latent_size=None), layer=1)  # no latent projection: a plain jmoe.MoE
    assert type(plain) is jmoe.MoE and plain.shared_expert.activation.name == "relu2"
    assert load("jetmoe", 0).bias[...].shape == (16,) and type(load("axk2", 1)) is jmoe.MoE


def test_gemma4_without_moe_block_is_dense(tmp_path):
    folder = copy_with(tmp_path, "gemma4_text", lambda c: c.update(enable_moe_block=False))
    with pytest.raises(hf.CheckpointError, match=r"layer 1 .* is dense .*enable_moe_block is false"):
        hf.load_moe(folder, 1)


def test_axk2_record_needs_the_zero_fill():
    """A.X-K2's record chose an excluded group's expert for some tokens (its 0.0 beat their kept
    experts' negative biased scores): DeepSeek-V3's -inf fill is far from y."""
    import dataclasses
    info, x, y_ref = record("axk2")
    router = dataclasses.replace(load("axk2", info["layer"]).router, k=None, excluded_fill="-inf")
    assert rel_err(run(load("axk2", info["layer"], router=router), x)[0], y_ref) > 100 * TOL


def test_modality_isolated_experts():
    """Ernie 4.5-VL: the recorded vision tokens went through the vision experts (all-text is far
    from y); each set counts its own tokens."""
    info, x, y_ref = record("ernie4_5_vl_moe")
    block = load("ernie4_5_vl_moe", info["layer"])
    types = token_types("ernie4_5_vl_moe")
    assert types.any() and not types.all()
    assert rel_err(run(block, x, np.zeros_like(types))[0], y_ref) > 100 * TOL  # all text
    y, aux = run(block, x, types)
    assert float(aux["vision_tokens_per_expert"].sum()) == 2 * types.sum()  # k = 2 choices a vision token
    assert float(aux["tokens_per_expert"].sum()) == 2 * (types.size - types.sum())


def test_block_token_mask_and_sown_aux():
    """A block passes its token mask to its jmoe.MoE and gives masked tokens 0 (as jmoe.MoE does; JetMoE's
    output bias too); the others are unchanged (dropless routing is per token). With sow_aux=True it
    returns y alone."""
    info, x, y_ref = record("jetmoe")
    mask = np.ones(x.shape[:-1], bool)
    mask[0, 3:] = False
    block = load("jetmoe", info["layer"])
    y, aux = nnx.jit(lambda m, x, mask: m(x, token_mask=mask))(block, jax.numpy.asarray(x), jax.numpy.asarray(mask))
    y = np.asarray(y)
    assert not np.any(y[~mask]) and rel_err(y[mask], y_ref[mask]) <= TOL
    sown = load("jetmoe", info["layer"], sow_aux=True)
    y_alone = nnx.jit(lambda m, x: m(x))(sown, jax.numpy.asarray(x))
    assert rel_err(np.asarray(y_alone), y_ref) <= TOL and jmoe.sown_aux(sown.moe)["tokens_per_expert"].sum() == 32


@pytest.mark.parametrize("case,multimodal", [("gemma4_text", "gemma4"), ("muse_spark_text", "muse_spark")])
def test_block_families_multimodal_checkpoint(tmp_path, case, multimodal):
    """The hub's multimodal checkpoint (``text_config``, the text model under
    ``model.language_model.``) of a block family: the recorded text model renamed, the same block."""
    from safetensors.numpy import save_file
    folder = tmp_path / multimodal
    folder.mkdir()
    text = json.loads((DATA / case / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": multimodal, "text_config": text}))
    checkpoint = Checkpoint(DATA / case)
    save_file({"model.language_model." + n.removeprefix("model."): checkpoint.raw(n) for n in checkpoint.names()},
              folder / "model.safetensors")  # Gemma 4's model.layers. / Muse Spark's bare layers.
    info, x, y_ref = record(case)
    assert rel_err(run(hf.load_moe(folder, info["layer"]), x)[0], y_ref) <= TOL
