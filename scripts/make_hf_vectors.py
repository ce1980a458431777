"""Make the tiny Hugging Face checkpoints and recorded MoE block outputs of tests/data/hf/.

Runs in a scratch environment, never in jmoe's (the test suite imports neither torch nor
transformers). Made with:

    python3.12 -m venv /tmp/scratch-hf
    /tmp/scratch-hf/bin/pip install torch==2.14.1 "huggingface-hub>=2.4,<3" "tokenizers>=0.23.1,<0.24" \
        "regex>=2025.10.22" pyyaml typer tqdm safetensors==0.8.0 accelerate numpy
    /tmp/scratch-hf/bin/pip install --no-deps transformers==5.25.0   # its kernels>=0.19.1 pin is not
                                                                     # on the index; unused here
    /tmp/scratch-hf/bin/python scripts/make_hf_vectors.py [case ...]  # writes tests/data/hf/

Versions used for the committed data: the first 10 families (mixtral ... switch_transformers)
torch 2.13.0 (CPU), transformers 5.24.0, safetensors 0.8.0, numpy 2.4.6; they give bitwise the same
block outputs under transformers 5.25.0 and were not re-recorded. The families of ``NEW``:
torch 2.14.1, transformers 5.25.0, safetensors 0.8.0, numpy 2.5.5, python 3.12.1, accelerate (for
the FP8 check only) (tests/data/hf/versions.json: the last run's). Hub kernels are off
(``USE_HUB_KERNELS=0``); ``NEW``'s blocks run the modeling file's own expert loop
(``experts_implementation="eager"``; 5.25's default ``grouped_mm`` needs 16-byte strides).

For each case: a tiny random config of the family (a dense layer too where the family has them),
every weight randomised (biases, the router bias, e_score_correction_bias: nonzero so they
matter), ``save_pretrained`` into tests/data/hf/<case>/ (transformers 5 un-fuses its in-memory
expert tensors into the hub's per-expert names on save), then the checkpoint is *reloaded* with
``from_pretrained`` in float32 and a fixed x [B, S, d] float32 goes through layer ``layer``'s MoE
block in eval mode. ``x.npy``, ``y.npy`` (the block output: routed + shared experts, no residual,
no norm; Switch: the SparseMLP without its layer norm and residual, with its per-sequence capacity
drops; the families of jmoe.hf.blocks: the whole block, its norms / projections / dense branch /
bias included, Gemma 4's FFN sub-layer via :class:`LayerFfn`), ``experts.npy`` (the chosen experts
where handy) and ``case.json`` are written next to the
checkpoint. Weights are stored in bfloat16 (as the hub does) except where noted, and the model
computes in float32 from the rounded weights.

Extra forms written with this script's own encoders, in the layouts transformers' loaders read:
* gpt_oss_mxfp4: GPT-OSS's experts as MXFP4 ``*_blocks`` (uint8, two e2m1 codes a byte, low
  nibble first) + ``*_scales`` (uint8 exponents, bias 127), blocks of 32 along the input dim,
  ``quantization_config.quant_method = "mxfp4"``; the weights are drawn on the MXFP4 grid, so the
  reference model holds exactly the dequantized weights. Checked: transformers loads it with
  ``Mxfp4Config(dequantize=True)`` to the same weights.
* deepseek_v3_fp8: DeepSeek-V3's linear weights as float8_e4m3fn + ``weight_scale_inv`` (float32,
  one per 128 x 128 block), ``quant_method = "fp8"``, ``weight_block_size = [128, 128]``; the
  reference uses the dequantized weights.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import sys

import numpy as np
import torch

import transformers
import transformers as T
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                          GptOssConfig, GptOssForCausalLM, Llama4Config, Llama4ForCausalLM,
                          Llama4ForConditionalGeneration, Llama4TextConfig, MixtralConfig, MixtralForCausalLM,
                          OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration)

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "hf"
B, S = 2, 8  # x [B, S, d]

SMALL = dict(vocab_size=16, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def randomize(model: torch.nn.Module, seed: int, std: float = 0.25, router_std: float = 0.6) -> None:
    """Every parameter and persistent buffer of floating dtype drawn N(0, std) (routers: router_std;
    norms: 1 + N(0, 0.1)); integer buffers are left alone."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or "rotary" in name or "inv_freq" in name:
                continue
            value = torch.randn(tensor.shape, generator=gen)
            if "norm" in name:
                value = 1.0 + 0.1 * value
            elif "e_score_correction_bias" in name:
                value = 0.15 * value
            elif any(r in name for r in ("router", ".gate.", "classifier")):
                value = router_std * value
            else:
                value = std * value
            tensor.copy_(value.to(tensor.dtype))


def bf16_round(model: torch.nn.Module) -> None:
    """Round every floating weight to bfloat16 (kept float32), so a bf16 save loses nothing."""
    with torch.no_grad():
        for _, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16).to(tensor.dtype))


def make_x(d: int, seed: int) -> torch.Tensor:
    return torch.randn((B, S, d), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def top_margin(scores: torch.Tensor, k: int) -> float:
    """The smallest gap, over tokens, between the k-th and (k+1)-th choice score [T, E]."""
    values = torch.sort(scores.detach(), dim=-1, descending=True).values
    return float((values[:, k - 1] - values[:, k]).min()) if scores.shape[-1] > k else float("inf")


def save(model, case: str, *, bf16: bool = True, **kwargs) -> pathlib.Path:
    path = OUT / case
    if path.exists():
        shutil.rmtree(path)
    model = model.to(torch.bfloat16) if bf16 else model
    model.save_pretrained(path, **kwargs)
    model.to(torch.float32)
    for extra in ("generation_config.json",):
        (path / extra).unlink(missing_ok=True)
    return path


def record(path: pathlib.Path, block, x: torch.Tensor, info: dict, experts=None) -> None:
    block.eval()
    with torch.no_grad():
        y = block(x)
    y = (y[0] if isinstance(y, tuple) else y).reshape(x.shape)
    np.save(path / "x.npy", x.numpy())
    np.save(path / "y.npy", y.detach().numpy().astype(np.float32))
    if experts is not None:
        np.save(path / "experts.npy", np.asarray(experts, np.int32))
    (path / "case.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{path.name}: y {tuple(y.shape)} |y| {float(y.abs().mean()):.3f} {info}")


def reload(cls, path):
    model = cls.from_pretrained(path, dtype=torch.float32)
    return model.eval()


# ---------------------------------------------------------------- families


def softmax_family(case, cfg_cls, model_cls, *, layer, block_of, seed, shard=None, **cfg):
    config = cfg_cls(**SMALL, **cfg)
    model = model_cls(config)
    randomize(model, seed)
    bf16_round(model)
    path = save(model, case, **({"max_shard_size": shard} if shard else {}))
    model = reload(model_cls, path)
    block = block_of(model, layer)
    x = make_x(config.hidden_size, seed + 1)
    gate = block.gate
    logits = torch.nn.functional.linear(x.reshape(-1, config.hidden_size), gate.weight)
    k = config.num_experts_per_tok
    experts = torch.topk(logits, k, dim=-1).indices.reshape(B, S, k)
    record(path, block, x, {"layer": layer, "margin": top_margin(logits, k)}, experts)


def mixtral():
    softmax_family("mixtral", MixtralConfig, MixtralForCausalLM, layer=0, seed=10, shard="16KB",
                   block_of=lambda m, i: m.model.layers[i].mlp,
                   hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_local_experts=4,
                   num_experts_per_tok=2)


def qwen2_moe():
    softmax_family("qwen2_moe", Qwen2MoeConfig, Qwen2MoeForCausalLM, layer=1, seed=20,
                   block_of=lambda m, i: m.model.layers[i].mlp,
                   hidden_size=32, intermediate_size=24, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                   num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                   mlp_only_layers=[0])


def qwen3_moe():
    softmax_family("qwen3_moe", Qwen3MoeConfig, Qwen3MoeForCausalLM, layer=1, seed=30,
                   block_of=lambda m, i: m.model.layers[i].mlp,
                   hidden_size=32, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=2,
                   num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2, head_dim=16)


def olmoe():
    softmax_family("olmoe", OlmoeConfig, OlmoeForCausalLM, layer=0, seed=40,
                   block_of=lambda m, i: m.model.layers[i].mlp,
                   hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_experts=8, num_experts_per_tok=2,
                   norm_topk_prob=False)


DEEPSEEK_ATTN = dict(kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8)


def deepseek_v3(case="deepseek_v3", fp8=False):
    config = DeepseekV3Config(**SMALL, **DEEPSEEK_ATTN, hidden_size=32, intermediate_size=24,
                              moe_intermediate_size=16, num_hidden_layers=2, n_routed_experts=8, n_shared_experts=2,
                              num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                              routed_scaling_factor=2.5, norm_topk_prob=True)
    model = DeepseekV3ForCausalLM(config)
    randomize(model, 50)
    bf16_round(model)
    if fp8:
        fp8_grid(model)
    path = save(model, case)
    if fp8:
        write_fp8(path, model)
        model.to(torch.float32)
    else:
        model = reload(DeepseekV3ForCausalLM, path)
    layer = 1
    block = model.model.layers[layer].mlp
    gate = block.gate
    for seed in range(51, 200):  # an x whose top-k choice is clear (no near-ties at float32 rounding)
        x = make_x(config.hidden_size, seed)
        with torch.no_grad():
            _, _, experts = gate(x)
            logits = torch.nn.functional.linear(x.reshape(-1, 32), gate.weight)
            scores = torch.sigmoid(logits) + gate.e_score_correction_bias
        if top_margin(scores, 2) > 1e-3:
            break
    record(path, block, x, {"layer": layer, "margin": top_margin(scores, 2), "fp8": fp8},
           torch.sort(experts, -1).values.reshape(B, S, -1))


def deepseek_v2():
    config = DeepseekV2Config(**SMALL, **DEEPSEEK_ATTN, hidden_size=32, intermediate_size=24,
                              moe_intermediate_size=16, num_hidden_layers=2, n_routed_experts=8, n_shared_experts=1,
                              num_experts_per_tok=2, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                              first_k_dense_replace=1, routed_scaling_factor=1.5)
    model = DeepseekV2ForCausalLM(config)
    randomize(model, 60)
    bf16_round(model)
    path = save(model, "deepseek_v2")
    model = reload(DeepseekV2ForCausalLM, path)
    layer = 1
    block = model.model.layers[layer].mlp
    x = make_x(config.hidden_size, 61)
    with torch.no_grad():
        _, _, experts = block.gate(x)
        logits = torch.nn.functional.linear(x.reshape(-1, 32), block.gate.weight)
    record(path, block, x, {"layer": layer, "margin": top_margin(logits, 2)},
           torch.sort(experts, -1).values.reshape(B, S, -1))


def gpt_oss_config():
    return GptOssConfig(**SMALL, hidden_size=32, intermediate_size=32, head_dim=16, num_hidden_layers=1,
                        num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"],
                        swiglu_limit=1.5)  # a low limit, so the clamps matter on tiny random weights


def gpt_oss():
    config = gpt_oss_config()
    model = GptOssForCausalLM(config)
    randomize(model, 70)
    bf16_round(model)
    path = save(model, "gpt_oss")
    model = reload(GptOssForCausalLM, path)
    record_gpt_oss(path, model, 71)


def record_gpt_oss(path, model, seed):
    block = model.model.layers[0].mlp
    x = make_x(32, seed)
    with torch.no_grad():
        logits = block.router(x.reshape(-1, 32))[0]
    experts = torch.topk(logits, 2, dim=-1).indices.reshape(B, S, 2)
    with torch.no_grad():
        gate_up = torch.einsum("td,edf->etf", x.reshape(-1, 32), block.experts.gate_up_proj)
        gate_up = gate_up + block.experts.gate_up_proj_bias[:, None]
        clamped = float((gate_up[..., ::2] > block.experts.limit).float().mean()
                        + (gate_up[..., 1::2].abs() > block.experts.limit).float().mean())
    record(path, block, x, {"layer": 0, "margin": top_margin(logits, 2), "clamped_fraction": clamped}, experts)


# MXFP4 (OCP microscaling): e2m1 codes 0..15, the order transformers' FP4_VALUES uses
FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def mxfp4_encode(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [E, rows, cols] (cols: the input dim, a multiple of 32) -> (blocks [E, rows, cols/32, 16] uint8,
    scales [E, rows, cols/32] uint8, the dequantized w). Per block of 32: exponent so the max |w| fits 6."""
    e, rows, cols = w.shape
    blocks = w.reshape(e, rows, cols // 32, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    exp = np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)).astype(np.int32)
    scaled = blocks / np.exp2(exp)
    codes = np.abs(scaled[..., None] - FP4[None, None, None, None, :8] * np.sign(scaled)[..., None])
    mag = np.argmin(np.abs(np.abs(scaled)[..., None] - FP4[:8]), axis=-1)
    code = np.where(scaled < 0, mag + 8, mag).astype(np.uint8)
    del codes
    deq = FP4[code] * np.exp2(exp)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)  # low nibble = even element
    return packed, (exp[..., 0] + 127).astype(np.uint8), deq.reshape(e, rows, cols).astype(np.float32)


def gpt_oss_mxfp4():
    from safetensors.torch import load_file, save_file
    config = gpt_oss_config()
    model = GptOssForCausalLM(config)
    randomize(model, 80)
    bf16_round(model)
    experts = model.model.layers[0].mlp.experts
    quantized = {}
    with torch.no_grad():
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(experts, proj).detach().numpy()  # [E, in, out]
            blocks, scales, deq = mxfp4_encode(np.ascontiguousarray(w.transpose(0, 2, 1)))  # on disk: [E, out, in]
            getattr(experts, proj).copy_(torch.from_numpy(deq.transpose(0, 2, 1)))
            quantized[f"model.layers.0.mlp.experts.{proj}_blocks"] = torch.from_numpy(blocks)
            quantized[f"model.layers.0.mlp.experts.{proj}_scales"] = torch.from_numpy(scales)
    path = save(model, "gpt_oss_mxfp4")
    tensors = load_file(path / "model.safetensors")
    for proj in ("gate_up_proj", "down_proj"):
        del tensors[f"model.layers.0.mlp.experts.{proj}"]
    tensors.update(quantized)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    try:  # transformers' own dequantizer reads the same weights back
        from transformers import Mxfp4Config
        check = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                  quantization_config=Mxfp4Config(dequantize=True))
        for proj in ("gate_up_proj", "down_proj"):
            ours = getattr(experts, proj).float()
            theirs = getattr(check.model.layers[0].mlp.experts, proj).float()
            assert torch.equal(ours, theirs), proj
        print("gpt_oss_mxfp4: transformers' Mxfp4 dequantizer reads the same weights")
    except Exception as error:  # noqa: BLE001 - recorded, not fatal
        print(f"gpt_oss_mxfp4: transformers' dequantizer check skipped: {error!r}")
    record_gpt_oss(path, model.eval(), 81)


def fp8_grid(model) -> None:
    """Put DeepSeek's linear weights (the experts, shared experts, dense MLPs and attention; not the
    router, norms or embeddings) on the float8_e4m3 x 128-block-scale grid, matrix by matrix as they
    are stored (a fused in-memory expert tensor is split into its per-expert gate / up / down)."""
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("experts.gate_up_proj"):  # [E, 2f, d]: gate_proj, up_proj of each expert
                half = w.shape[1] // 2
                for e in range(w.shape[0]):
                    w[e, :half] = fp8_round(w[e, :half])
                    w[e, half:] = fp8_round(w[e, half:])
            elif name.endswith("experts.down_proj"):  # [E, d, f]
                for e in range(w.shape[0]):
                    w[e] = fp8_round(w[e])
            elif fp8_quantized(name, w):
                w.copy_(fp8_round(w))


def fp8_quantized(name: str, w) -> bool:
    return (name.endswith(".weight") and w.ndim == 2 and "layers." in name and ".gate." not in name
            and "norm" not in name)


def fp8_scales(w: torch.Tensor) -> torch.Tensor:
    """One float32 scale per 128 x 128 block of w [out, in] (powers of 2, so w = q * scale is exact in bf16)."""
    rows, cols = math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)
    scale = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            amax = float(w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().max())
            scale[i, j] = 2.0 ** math.ceil(math.log2(max(amax, 1e-30) / 448.0))
    return scale


def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = fp8_scales(w.float())
    return (w.float() / expand(scale, w.shape)).to(torch.float8_e4m3fn), scale


def fp8_round(w: torch.Tensor) -> torch.Tensor:
    q, scale = fp8_quantize(w)
    return q.to(torch.float32) * expand(scale, w.shape)


def expand(scale, shape):
    return scale.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]


def write_fp8(path: pathlib.Path, model) -> None:
    """Rewrite the saved checkpoint with its linear weights as float8_e4m3fn + weight_scale_inv."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    for name in list(tensors):
        if fp8_quantized(name, tensors[name]):
            q, scale = fp8_quantize(tensors[name])
            assert torch.equal(q.float() * expand(scale, q.shape), tensors[name].float()), name
            tensors[name] = q
            tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    try:  # transformers' own fp8 loader, dequantizing, reads the same weights back
        from transformers import FineGrainedFP8Config
        check = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                      quantization_config=FineGrainedFP8Config(dequantize=True))
        ours, theirs = dict(model.named_parameters()), dict(check.named_parameters())
        for name, w in ours.items():
            assert torch.equal(w.float(), theirs[name].float()), name
        print("deepseek_v3_fp8: transformers' FP8 dequantizer reads the same weights")
    except Exception as error:  # noqa: BLE001 - recorded, not fatal
        print(f"deepseek_v3_fp8: transformers' dequantizer check skipped: {error!r}")


def llama4_text_config():
    return Llama4TextConfig(**SMALL, hidden_size=32, intermediate_size=16, intermediate_size_mlp=24, head_dim=16,
                            num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=1,
                            interleave_moe_layer_step=2)  # layer 0 dense, layer 1 MoE


def llama4_text():
    config = llama4_text_config()
    model = Llama4ForCausalLM(config)
    randomize(model, 90)
    bf16_round(model)
    path = save(model, "llama4_text")
    model = reload(Llama4ForCausalLM, path)
    record_llama4(path, model.model.layers[1].feed_forward, 91, layer=1)


def record_llama4(path, block, seed, layer):
    x = make_x(32, seed)
    with torch.no_grad():
        logits = torch.nn.functional.linear(x.reshape(-1, 32), block.router.weight)
    experts = torch.topk(logits, 1, dim=-1).indices.reshape(B, S, 1)
    record(path, block, x, {"layer": layer, "margin": top_margin(logits, 1)}, experts)


def llama4():
    from transformers import Llama4VisionConfig
    text = llama4_text_config().to_dict()
    vision = Llama4VisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                image_size=28, patch_size=14, vision_output_dim=16, projector_input_dim=16,
                                projector_output_dim=16).to_dict()
    config = Llama4Config(vision_config=vision, text_config=text)
    model = Llama4ForConditionalGeneration(config)
    randomize(model, 100)
    bf16_round(model)
    path = save(model, "llama4")
    model = reload(Llama4ForConditionalGeneration, path)
    record_llama4(path, model.language_model.model.layers[1].feed_forward, 101, layer=1)


def switch():
    config = SwitchTransformersConfig(vocab_size=16, d_model=32, d_kv=8, d_ff=16, num_heads=2, num_layers=2,
                                      num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                                      num_experts=4, expert_capacity=3, router_bias=True, dropout_rate=0.0,
                                      router_jitter_noise=0.0)
    model = SwitchTransformersForConditionalGeneration(config)
    randomize(model, 110)
    bf16_round(model)
    path = save(model, "switch_transformers")
    model = reload(SwitchTransformersForConditionalGeneration, path)
    for stack, part in (("encoder", 1), ("decoder", 2)):
        layer = next(i for i, blk in enumerate(getattr(model, stack).block) if blk.is_sparse)
        block = getattr(model, stack).block[layer].layer[part].mlp
        x = make_x(32, 111 if stack == "encoder" else 112)
        with torch.no_grad():
            dispatch, _, logits = block.router(x)
        kept = dispatch.sum(-1).bool()
        experts = torch.where(kept, torch.argmax(logits, -1), -1)  # -1: dropped by capacity
        info = {"layer": layer, "stack": stack, "margin": top_margin(logits.reshape(-1, 4), 1),
                "dropped": int((~kept).sum())}
        sub = path / stack
        sub.mkdir(exist_ok=True)
        record(sub, block, x, info, experts)


# ---------------------------------------------------------------- families on the blocks above (transformers 5.25)

TINY = dict(vocab_size=16, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, head_dim=8,
            hidden_size=16, intermediate_size=24)  # d = 16; expert widths 6 (2f = 12 != d: layouts are told apart)
MLA = dict(kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4)
V3 = dict(moe_intermediate_size=6, num_hidden_layers=2, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
          n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.0, norm_topk_prob=True)
QWEN = dict(moe_intermediate_size=6, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2)
LINEAR_ATTN = dict(layer_types=["full_attention", "full_attention"], linear_key_head_dim=8, linear_value_head_dim=8,
                   linear_num_key_heads=1, linear_num_value_heads=2)
VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)

MAX_BYTES = 400_000  # a case's folder (tests/data/hf stays a few MB)
OCR_TEXT = dict(moe_intermediate_size=6, num_hidden_layers=2, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                routed_scaling_factor=1.5, mlp_layer_types=["dense", "sparse"], pad_token_id=0)
# HY-V4: DeepSeek-V3's router, SwiGLU clamped without alpha / + 1 (a low limit, so the clamps matter), hyper-connections
HY_V4 = dict(V3, **MLA, mlp_layer_types=["dense", "sparse"], swiglu_limit=1.0, hc_mult=2, index_topk=4,
             index_head_dim=8, index_n_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Step-3.5 / 3.7: sigmoid + selection bias, the SwiGLU clamped after the activation with per-layer limits (low, so
# the clamps matter; the shared expert's its own)
STEP3P5 = dict(QWEN, n_routed_experts=8, share_expert_dim=12, mlp_layer_types=["dense", "sparse"],
               moe_router_scaling_factor=1.5, swiglu_limits=[0.0, 0.3], swiglu_limits_shared=[0.0, 0.5], pad_token_id=0)
ROUTERS = ("gate.weight", "gate.linear.weight", "gate.wg.weight", "router.weight", "router.layer.weight", "router.gate.weight",
           "block_sparse_moe.router.weight", "router.classifier.weight")
BIASES = ("gate.e_score_correction_bias", "e_score_correction_bias", "expert_bias", "gate.expert_bias",
          "gate.moe_statics.e_score_correction_bias", "router.e_score_correction_bias")


def find(module, names):
    """The first of ``names`` the module has, as a parameter or buffer (None if none)."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return next((tensors[name] for name in names if name in tensors), None)


def choice_scores(block, x: torch.Tensor, score: str, softcap: float | None = None) -> torch.Tensor:
    """What the block's router takes the top-k of, for tokens x [T, d]: the logits ("logits":
    softmax or top-k-then-softmax routers), the logits plus the selection bias ("biased_logits":
    Kolibri), or sigmoid / softmax scores plus the selection bias; ``softcap``: of the logits first
    (Laguna)."""
    weight = find(block, ROUTERS)
    logits = torch.nn.functional.linear(x.float(), weight.float())
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if score == "logits":
        return logits
    if score == "biased_logits":
        return logits + find(block, BIASES).reshape(-1)
    scores = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, -1)
    bias = find(block, BIASES)
    return scores if bias is None else scores + bias.reshape(-1)


def family_case(case, cfg_cls, model_cls, *, layer, seed, block_of=lambda m, i: m.model.layers[i].mlp,
                score="logits", softcap=None, config=None, scores_of=None, prepare=None, accept=None, **cfg):
    """A tiny random model of the family saved, reloaded, and the MoE block of ``layer`` recorded
    on an x [B, S, 16] whose top-k choice has no near-tie (margin > 1e-3 on the router's choice scores;
    ``scores_of(block, x [T, d])``: those scores, where :func:`choice_scores` does not know the
    router; ``accept(block, x)``: an x must also pass it). ``prepare(model)``: run on the randomized
    model before it is saved."""
    config = config or cfg_cls(**{**TINY, **cfg})
    model = getattr(model_cls, "from_config", model_cls)(config)  # an Auto class, or the model class itself
    randomize(model, seed)
    if prepare is not None:
        prepare(model)
    bf16_round(model)
    path = save(model, case)
    model = model_cls.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    block = block_of(model, layer)  # the modeling file's own expert loop (eager), in float32
    d, k = 16, getattr(text_of(config), "num_experts_per_tok", None) or 2
    router = getattr(block, "router_block", block)
    for s in range(seed + 1, seed + 200):
        x = make_x(d, s)
        with torch.no_grad():
            scores = (scores_of(block, x.reshape(-1, d)) if scores_of else
                      choice_scores(router, x.reshape(-1, d), score, softcap))
            margin = top_margin(scores, k)
            accepted = accept is None or accept(block, x.reshape(-1, d))
        if margin > 1e-3 and accepted:
            break
    record(path, block, x, {"layer": layer, "margin": margin})
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < MAX_BYTES, f"{case}: {size} bytes; make its config tinier (attention / indexer sizes)"


def text_of(config):
    return getattr(config, "text_config", None) or config


class WithShared(torch.nn.Module):
    """Granite-MoE-Shared's block output: the MoE block plus the decoder layer's shared MLP."""

    def __init__(self, layer):
        super().__init__()
        self.router_block = layer
        self.layer = layer

    def forward(self, x):
        return self.layer.block_sparse_moe(x) + self.layer.shared_mlp(x)


NEW = {
    "glm4_moe": lambda: family_case("glm4_moe", T.Glm4MoeConfig, T.Glm4MoeForCausalLM, layer=1, seed=200,
                                    score="sigmoid", **V3),
    "glm4_moe_lite": lambda: family_case("glm4_moe_lite", T.Glm4MoeLiteConfig, T.Glm4MoeLiteForCausalLM, layer=1,
                                         seed=210, score="sigmoid", **V3, **MLA),
    "dots1": lambda: family_case("dots1", T.Dots1Config, T.Dots1ForCausalLM, layer=1, seed=220, score="sigmoid", **V3),
    "deepseek_v32": lambda: family_case("deepseek_v32", T.DeepseekV32Config, T.DeepseekV32ForCausalLM, layer=1,
                                        seed=230, score="sigmoid", **V3, **MLA, index_n_heads=2, index_head_dim=8,
                                        index_topk=4),
    "exaone_moe": lambda: family_case("exaone_moe", T.ExaoneMoeConfig, T.ExaoneMoeForCausalLM, layer=1, seed=240,
                                      score="sigmoid", moe_intermediate_size=6, num_hidden_layers=2, num_experts=8,
                                      num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1),
    "mimo_v2_flash": lambda: family_case("mimo_v2_flash", T.MiMoV2FlashConfig, T.MiMoV2FlashForCausalLM, layer=1,
                                         seed=250, score="sigmoid", moe_intermediate_size=6, num_hidden_layers=2,
                                         n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=1.5),
    "qwen3_next": lambda: family_case("qwen3_next", T.Qwen3NextConfig, T.Qwen3NextForCausalLM, layer=1, seed=260,
                                      **QWEN, **LINEAR_ATTN, shared_expert_intermediate_size=12, norm_topk_prob=True,
                                      mlp_only_layers=[0]),
    "qwen3_5_moe_text": lambda: family_case("qwen3_5_moe_text", T.Qwen3_5MoeTextConfig, T.Qwen3_5MoeForCausalLM,
                                            layer=1, seed=270, **QWEN, **LINEAR_ATTN,
                                            shared_expert_intermediate_size=12),
    "qwen3_vl_moe_text": lambda: family_case("qwen3_vl_moe_text", T.Qwen3VLMoeTextConfig, T.Qwen3VLMoeTextModel,
                                             layer=1, seed=280, block_of=lambda m, i: m.layers[i].mlp, **QWEN,
                                             decoder_sparse_step=2),
    "qwen3_vl_moe": lambda: family_case(
        "qwen3_vl_moe", None, T.Qwen3VLMoeForConditionalGeneration, layer=1, seed=290,
        block_of=lambda m, i: m.model.language_model.layers[i].mlp,
        config=T.Qwen3VLMoeConfig(text_config=dict(TINY, **QWEN, decoder_sparse_step=2),
                                  vision_config=dict(VISION, patch_size=14, deepstack_visual_indexes=[0],
                                                     num_position_embeddings=16))),
    "glm4v_moe": lambda: family_case(
        "glm4v_moe", None, T.Glm4vMoeForConditionalGeneration, layer=1, seed=300, score="sigmoid",
        block_of=lambda m, i: m.model.language_model.layers[i].mlp,
        config=T.Glm4vMoeConfig(text_config=dict(TINY, **V3), vision_config=dict(VISION, patch_size=14, image_size=28))),
    "flex_olmo": lambda: family_case("flex_olmo", T.FlexOlmoConfig, T.FlexOlmoForCausalLM, layer=0, seed=310,
                                     num_hidden_layers=1, num_experts=4, num_experts_per_tok=2, pad_token_id=0),
    "ernie4_5_moe": lambda: family_case("ernie4_5_moe", T.Ernie4_5_MoeConfig, T.Ernie4_5_MoeForCausalLM, layer=1,
                                        seed=320, score="softmax", moe_intermediate_size=6, num_hidden_layers=2,
                                        moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1),
    "hunyuan_v1_moe": lambda: family_case("hunyuan_v1_moe", T.HunYuanMoEV1Config, T.HunYuanMoEV1ForCausalLM, layer=0,
                                          seed=330, intermediate_size=6, num_hidden_layers=1, num_experts=8,
                                          moe_topk=2),
    "minimax": lambda: family_case("minimax", T.MiniMaxConfig, T.MiniMaxForCausalLM, layer=0, seed=340, intermediate_size=6,
                                   num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2),
    "minimax_m2": lambda: family_case("minimax_m2", T.MiniMaxM2Config, T.MiniMaxM2ForCausalLM, layer=0, seed=350,
                                      score="sigmoid", intermediate_size=6, num_hidden_layers=1, num_local_experts=8,
                                      num_experts_per_tok=2),
    "dbrx": lambda: family_case("dbrx", T.DbrxConfig, T.DbrxForCausalLM, layer=0, seed=360,
                                block_of=lambda m, i: m.transformer.blocks[i].ffn,
                                config=T.DbrxConfig(vocab_size=16, d_model=16, n_heads=2, n_layers=1, max_seq_len=64,
                                                    attn_config=dict(kv_n_heads=1, rope_theta=10000.0),
                                                    ffn_config=dict(ffn_hidden_size=6, moe_num_experts=4,
                                                                    moe_top_k=2))),
    "granitemoe": lambda: family_case("granitemoe", T.GraniteMoeConfig, T.GraniteMoeForCausalLM, layer=0, seed=370,
                                      block_of=lambda m, i: m.model.layers[i].block_sparse_moe, intermediate_size=6,
                                      num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": lambda: family_case("granitemoeshared", T.GraniteMoeSharedConfig,
                                            T.GraniteMoeSharedForCausalLM, layer=0, seed=380,
                                            block_of=lambda m, i: WithShared(m.model.layers[i]), intermediate_size=6,
                                            num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2,
                                            shared_intermediate_size=12),
    "aria_text": lambda: family_case("aria_text", T.AriaTextConfig, T.AriaTextForCausalLM, layer=0, seed=390,
                                     intermediate_size=6, num_hidden_layers=1, moe_num_experts=4, moe_topk=2,
                                     moe_num_shared_experts=2),
    "cohere2_moe": lambda: family_case("cohere2_moe", T.Cohere2MoeConfig, T.Cohere2MoeForCausalLM, layer=0, seed=400,
                                       intermediate_size=6, num_hidden_layers=1, num_experts=4, num_experts_per_tok=2,
                                       num_shared_experts=1, shared_expert_combination_strategy="average"),
    "afmoe": lambda: family_case("afmoe", T.AfmoeConfig, T.AfmoeForCausalLM, layer=1, seed=410, score="sigmoid",
                                 num_hidden_layers=2, num_experts=8, moe_intermediate_size=6, num_experts_per_tok=2,
                                 num_shared_experts=1, route_scale=1.5),
    "jamba": lambda: family_case("jamba", T.JambaConfig, T.JambaForCausalLM, layer=1, seed=420,
                                 block_of=lambda m, i: m.model.layers[i].feed_forward, intermediate_size=6,
                                 num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                                 expert_layer_offset=1, attn_layer_period=1, attn_layer_offset=0),
}
NEW.update({  # model types whose transformers block is one of the above (the hub's configs name them)
    "sarvam_moe": lambda: family_case("sarvam_moe", T.SarvamMoEConfig, T.AutoModelForCausalLM, layer=1, seed=430,
                                      score="sigmoid", **V3),
    "sarvam_mla": lambda: family_case("sarvam_mla", T.SarvamMLAConfig, T.AutoModelForCausalLM, layer=1, seed=440,
                                      score="sigmoid", **V3, **MLA),
    "solar_open": lambda: family_case("solar_open", T.SolarOpenConfig, T.AutoModelForCausalLM, layer=1, seed=450,
                                      score="sigmoid", **V3),
    "minicpm5_moe": lambda: family_case("minicpm5_moe", T.MiniCPM5MoeConfig, T.AutoModelForCausalLM, layer=1,
                                        seed=460, score="sigmoid", **V3),
    "glm_moe_dsa": lambda: family_case("glm_moe_dsa", T.GlmMoeDsaConfig, T.AutoModelForCausalLM, layer=1, seed=470,
                                       score="sigmoid", **V3, **MLA, index_n_heads=2, index_head_dim=8, index_topk=4),
    "kimi_linear": lambda: family_case("kimi_linear", T.KimiLinearConfig, T.AutoModelForCausalLM, layer=1, seed=480,
                                       score="sigmoid", pad_token_id=0, moe_intermediate_size=6, num_hidden_layers=2,
                                       num_experts=8, num_shared_experts=1, num_experts_per_token=2,
                                       num_expert_group=4, topk_group=2, first_k_dense_replace=1,
                                       routed_scaling_factor=2.0, moe_renormalize=True, linear_head_dim=8,
                                       linear_num_heads=2, **MLA),
    "mistral4": lambda: family_case("mistral4", T.Mistral4Config, T.Mistral4ForCausalLM, layer=1, seed=490,
                                    **dict(V3, routed_scaling_factor=1.5), **MLA),
    "qwen4_exp_text": lambda: family_case("qwen4_exp_text", T.Qwen4ExpTextConfig, T.AutoModelForCausalLM, layer=1,
                                          seed=500, **QWEN, **dict(LINEAR_ATTN, layer_types=["linear_attention"] * 2),
                                          shared_expert_intermediate_size=12, hc_count=2, hc_lowrank=4,
                                          norm_topk_prob=True, mlp_only_layers=[0]),
    "qwen3_omni_moe_text": lambda: family_case("qwen3_omni_moe_text", T.Qwen3OmniMoeTextConfig,
                                               T.Qwen3OmniMoeThinkerTextModel, layer=1, seed=510,
                                               block_of=lambda m, i: m.layers[i].mlp, **QWEN, norm_topk_prob=True,
                                               decoder_sparse_step=2),
    "mellum": lambda: family_case("mellum", T.MellumConfig, T.AutoModelForCausalLM, layer=1, seed=520, **QWEN,
                                  norm_topk_prob=False, decoder_sparse_step=2),
    "lara_mini": lambda: family_case("lara_mini", T.LaraMiniConfig, T.AutoModelForCausalLM, layer=1, seed=530,
                                     **QWEN, **LINEAR_ATTN, shared_expert_intermediate_size=12, norm_topk_prob=True),
    "granitemoehybrid": lambda: family_case("granitemoehybrid", T.GraniteMoeHybridConfig, T.AutoModelForCausalLM,
                                            layer=0, seed=540, block_of=lambda m, i: WithShared(m.model.layers[i]),
                                            intermediate_size=6, num_hidden_layers=1, num_local_experts=4,
                                            num_experts_per_tok=2, shared_intermediate_size=12,
                                            layer_types=["attention"], mamba_n_heads=2, mamba_d_head=16),
    "granitemoe_swa": lambda: family_case("granitemoe_swa", T.GraniteMoeSWAConfig, T.AutoModelForCausalLM, layer=0,
                                          seed=550, block_of=lambda m, i: WithShared(m.model.layers[i]),
                                          intermediate_size=6, num_hidden_layers=1, num_local_experts=4,
                                          num_experts_per_tok=2, shared_intermediate_size=12),
    "mistral_large4_text": lambda: family_case("mistral_large4_text", T.MistralLarge4TextConfig,
                                               T.MistralLarge4TextModel, layer=1, seed=560,
                                               block_of=lambda m, i: m.layers[i].mlp,
                                               **dict(V3, routed_scaling_factor=1.5), **MLA, index_head_dim=8,
                                               index_n_heads=2, index_topk=4),
    "qwen3_5_moe": lambda: family_case(
        "qwen3_5_moe", None, T.Qwen3_5MoeForConditionalGeneration, layer=1, seed=570,
        block_of=lambda m, i: m.model.language_model.layers[i].mlp,
        config=T.Qwen3_5MoeConfig(text_config=dict(TINY, **QWEN, **LINEAR_ATTN, shared_expert_intermediate_size=12),
                                  vision_config=dict(VISION, patch_size=14, num_position_embeddings=16))),
    "hy_v3": lambda: family_case("hy_v3", T.HYV3Config, T.AutoModelForCausalLM, layer=1, seed=580, score="sigmoid",
                                 **QWEN, num_shared_experts=1, mlp_layer_types=["dense", "sparse"],
                                 router_scaling_factor=1.5),
    "minimax_m3_vl_text": lambda: family_case("minimax_m3_vl_text", T.MiniMaxM3VLTextConfig, T.AutoModelForCausalLM,
                                              layer=1, seed=590, score="sigmoid", intermediate_size=6,
                                              num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                                              shared_intermediate_size=12, dense_intermediate_size=24,
                                              swiglu_limit=1.5),  # a low limit, so the clamps matter
    "flint": lambda: family_case("flint", T.FlintConfig, T.AutoModelForCausalLM, layer=1, seed=600, score="sigmoid",
                                 **QWEN, shared_expert_intermediate_size=12, norm_topk_prob=True, mlp_only_layers=[0]),
    "beam": lambda: family_case("beam", T.BeamConfig, T.AutoModelForCausalLM, layer=1, seed=610, score="sigmoid",
                                **QWEN, n_group=4, topk_group=2, routed_scaling_factor=1.5,
                                mlp_layer_types=["dense", "sparse"]),
    "dots3_note_text": lambda: family_case("dots3_note_text", T.Dots3NoteTextConfig, T.AutoModelForCausalLM, layer=1,
                                           seed=620, score="sigmoid", **dict(V3, n_shared_experts=2), **MLA,
                                           shared_experts_intermediate_size=4, num_key_value_heads=2, pad_token_id=0,
                                           index_n_heads=2, index_head_dim=8, index_topk=4),
    "openai_privacy_filter": lambda: family_case("openai_privacy_filter", T.OpenAIPrivacyFilterConfig,
                                                 T.OpenAIPrivacyFilterModel, layer=0, seed=630,
                                                 block_of=lambda m, i: m.layers[i].mlp, intermediate_size=6,
                                                 num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2,
                                                 pad_token_id=0, swiglu_limit=1.5),
    "deepseek_ocr2_text": lambda: family_case("deepseek_ocr2_text", T.DeepseekOcr2TextConfig, T.DeepseekOcr2TextModel,
                                              layer=1, seed=640, block_of=lambda m, i: m.layers[i].mlp,
                                              **OCR_TEXT),
    "unlimited_ocr_text": lambda: family_case("unlimited_ocr_text", T.UnlimitedOcrTextConfig, T.UnlimitedOcrTextModel,
                                              layer=1, seed=650, block_of=lambda m, i: m.layers[i].mlp,
                                              **OCR_TEXT),
})


NEW.update({  # blocks that needed jmoe's newer options (normalize_epsilon, logit_softcap, bias_on, activations, ...)
    "lfm2_moe": lambda: family_case("lfm2_moe", T.Lfm2MoeConfig, T.AutoModelForCausalLM, layer=1, seed=660,
                                    block_of=lambda m, i: m.model.layers[i].feed_forward, score="sigmoid", **QWEN,
                                    num_dense_layers=1, layer_types=["full_attention"] * 2, routed_scaling_factor=1.5),
    "laguna": lambda: family_case("laguna", T.LagunaConfig, T.AutoModelForCausalLM, layer=1, seed=670,
                                  score="sigmoid", softcap=1.5, **QWEN, shared_expert_intermediate_size=12,
                                  mlp_layer_types=["dense", "sparse"], moe_routed_scaling_factor=1.5,
                                  moe_router_logit_softcapping=1.5),
    "kolibri1": lambda: family_case("kolibri1", T.Kolibri1Config, T.AutoModelForCausalLM, layer=0, seed=680,
                                    score="biased_logits", **dict(QWEN, num_hidden_layers=1),
                                    shared_expert_intermediate_size=12, norm_topk_prob=True),
    "kolibri1_1": lambda: family_case("kolibri1_1", T.Kolibri1_1Config, T.AutoModelForCausalLM, layer=1, seed=690,
                                      score="biased_logits", **QWEN, shared_expert_intermediate_size=12,
                                      mlp_only_layers=[0], mlp_only_intermediate_size=24, index_topk=4, head_dim=16,
                                      index_num_heads=1),
    "hy_v4": lambda: family_case("hy_v4", T.HYV4Config, T.AutoModelForCausalLM, layer=1, seed=700, score="sigmoid",
                                 **HY_V4),
    "hy_v4_vl_text": lambda: family_case("hy_v4_vl_text", T.HYV4VLTextConfig, T.HYV4VLTextModel, layer=1, seed=710,
                                         block_of=lambda m, i: m.layers[i].mlp, score="sigmoid", **HY_V4,
                                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                              mrope_section=[0, 1, 1])),
    "glm5_next_text": lambda: family_case("glm5_next_text", T.Glm5NextTextConfig, T.Glm5NextTextModel, layer=1,
                                          seed=720, block_of=lambda m, i: m.layers[i].mlp, score="sigmoid",
                                          **dict(HY_V4, index_topk=16, qk_rope_head_dim=0), linear_head_dim=8, linear_num_heads=2,
                                          num_key_value_heads=2),
    "longcat_flash": lambda: family_case("longcat_flash", T.LongcatFlashConfig, T.AutoModelForCausalLM, layer=0,
                                         seed=730, score="softmax", **MLA, num_layers=1, ffn_hidden_size=24,
                                         moe_topk=2, n_routed_experts=8, zero_expert_num=4, expert_ffn_hidden_size=6,
                                         routed_scaling_factor=1.5),
    "phimoe": lambda: family_case("phimoe", T.PhimoeConfig, T.AutoModelForCausalLM, layer=0, seed=740,
                                  intermediate_size=6, num_hidden_layers=1, num_local_experts=8,
                                  num_experts_per_tok=2, router_jitter_noise=0.2),  # eps 0.2: the masks matter
    "step3p5": lambda: family_case("step3p5", T.Step3p7TextConfig, T.Step3p7TextModel, layer=1, seed=750,
                                   block_of=lambda m, i: m.layers[i].mlp, score="sigmoid", **STEP3P5),
    "step3p7": lambda: family_case(
        "step3p7", None, T.Step3p7ForConditionalGeneration, layer=1, seed=760, score="sigmoid",
        block_of=lambda m, i: m.model.language_model.layers[i].mlp,
        config=T.Step3p7Config(text_config=dict(TINY, **STEP3P5),
                               vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=28, patch_size=14))),
})


class LayerFfn(torch.nn.Module):
    """A decoder layer's whole FFN sub-layer (Gemma 4: its dense MLP and its MoE in parallel, with
    their norms): the layer run with its attention returning 0 (so the attention sub-layer adds
    0 and its post-norm of 0 is 0), less its input (the residual). ``layer_scalar`` must be 1."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        layer.self_attn.forward = lambda *args, **kwargs: (torch.zeros_like(kwargs["hidden_states"]), None)

    def forward(self, x):
        return self.layer(x) - x


def unit_layer_scalars(model) -> None:
    """Gemma 4's per-layer output scalar (a buffer, randomized with the rest) back to 1."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.fill_(1.0)


def shifted_biases(shift: float):
    """``prepare``: every e_score_correction_bias moved by ``shift`` (negative: many biased scores
    below 0, so what excluded groups are filled with matters)."""
    def prepare(model):
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.add_(shift)
    return prepare


def sigmoid_gate_scores(block, x):  # a router gate returning the (scaled) logits; sigmoid + selection bias
    return torch.sigmoid(block.gate(x)[0]) + block.gate.e_score_correction_bias


def axk2_choice(block, x):
    """A.X-K2's choice scores as its router makes them: sigmoid + bias, the excluded group's experts 0.0
    (a tie at the k-th place, between equal 0.0s, would leave the choice to torch.topk: the margin
    check rejects it)."""
    gate = block.gate
    return gate.apply_group_scoring(torch.sigmoid(torch.nn.functional.linear(x, gate.weight))
                                    + gate.e_score_correction_bias)


def axk2_fill_matters(block, x) -> bool:
    """Some token's choice takes an excluded expert (its 0.0 beats the kept experts' negative scores)."""
    gate = block.gate
    biased = torch.sigmoid(torch.nn.functional.linear(x, gate.weight)) + gate.e_score_correction_bias
    filled = gate.apply_group_scoring(biased)
    chosen = torch.topk(filled, 2, dim=-1).indices
    return bool((torch.gather(filled - biased, 1, chosen) != 0).any())


GEMMA4 = dict(num_hidden_layers=2, enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=6,
              hidden_size_per_layer_input=0, vocab_size_per_layer_input=16, global_head_dim=8, sliding_window=8,
              layer_types=["sliding_attention", "full_attention"], hidden_activation="gelu_pytorch_tanh")


def ernie_vl(multimodal: bool = True):
    """Ernie 4.5-VL's modality-isolated block, the hub's multimodal layout (a one-layer vision tower;
    ``multimodal=False``: the text model alone, saved in transformers' own names): recorded on x
    [2, 8, 16] whose tokens 2..4 of the first sequence and 5..7 of the second are vision tokens
    (moe_mm_token_type_ids 1), the others text."""
    case, layer, seed = ("ernie4_5_vl_moe", 1, 800) if multimodal else ("ernie4_5_vl_moe_text", 1, 850)
    text = dict(TINY, num_hidden_layers=2, moe_intermediate_size=[6, 4], moe_num_experts=8, moe_k=2,
                moe_num_shared_experts=1, mlp_layer_types=["dense", "sparse"],
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2]))
    if multimodal:
        model_cls = T.Ernie4_5_VLMoeForConditionalGeneration
        config = T.Ernie4_5_VLMoeConfig(text_config=text, vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=2, patch_size=14, spatial_merge_size=2,
            temporal_merge_size=2))
    else:
        model_cls, config = T.Ernie4_5_VLMoeTextModel, T.Ernie4_5_VLMoeTextConfig(**text)
    model = model_cls(config)
    randomize(model, seed)
    bf16_round(model)
    path = save(model, case)
    model = model_cls.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    block = (model.model.language_model if multimodal else model).layers[layer].mlp
    types = torch.zeros((B, S), dtype=torch.long)
    types[0, 2:5] = 1
    types[1, 5:8] = 1
    for s in range(seed + 1, seed + 200):
        x = make_x(16, s)
        with torch.no_grad():
            margin = min(top_margin(torch.softmax(torch.nn.functional.linear(x.reshape(-1, 16), moe.gate.weight), -1)
                                    + moe.gate.moe_statics.e_score_correction_bias.reshape(-1), 2)
                         for moe in (block.text_moe, block.vision_moe))
        if margin > 1e-3:
            break

    class WithTypes(torch.nn.Module):
        def forward(self, x):
            return block(x, moe_mm_token_type_ids=types)[0]

    record(path, WithTypes(), x, {"layer": layer, "margin": margin})
    np.save(path / "token_type_ids.npy", types.numpy().astype(np.int32))
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < MAX_BYTES, f"{case}: {size} bytes"


NEW.update({  # blocks with norms / projections / a dense branch / a bias around the experts (jmoe.hf.blocks)
    "gemma4_text": lambda: family_case("gemma4_text", T.Gemma4TextConfig, T.Gemma4ForCausalLM, layer=1, seed=770,
                                       block_of=lambda m, i: LayerFfn(m.model.layers[i]), prepare=unit_layer_scalars,
                                       scores_of=lambda b, x: b.layer.router(x)[0], **GEMMA4),
    "diffusion_gemma_text": lambda: family_case(
        "diffusion_gemma_text", T.DiffusionGemmaTextConfig, T.DiffusionGemmaEncoderTextModel, layer=1, seed=780,
        block_of=lambda m, i: LayerFfn(m.layers[i]), prepare=unit_layer_scalars,
        scores_of=lambda b, x: b.layer.router(x)[0], **{k: v for k, v in GEMMA4.items() if k not in (
            "enable_moe_block", "hidden_size_per_layer_input", "vocab_size_per_layer_input")}),
    "axk1": lambda: family_case("axk1", T.AXK1Config, T.AutoModelForCausalLM, layer=1, seed=790, score="sigmoid",
                                **V3, **MLA, mlp_layer_types=["dense", "sparse"]),
    "axk2": lambda: family_case("axk2", T.AXK2Config, T.AutoModelForCausalLM, layer=1, seed=810,
                                prepare=shifted_biases(-0.4), scores_of=axk2_choice, accept=axk2_fill_matters,
                                **dict(V3, topk_group=3), **MLA, mlp_layer_types=["dense", "sparse"],
                                gated_norm_rank=4, index_n_heads=2, index_head_dim=8, index_topk=4),
    "muse_spark_text": lambda: family_case(
        "muse_spark_text", T.MuseSparkTextConfig, T.MuseSparkTextModel, layer=1, seed=820,
        block_of=lambda m, i: m.layers[i].mlp, scores_of=sigmoid_gate_scores, num_hidden_layers=2,
        mlp_layer_types=["dense", "sparse"], moe_intermediate_size=6, moe_hidden_size=10, num_local_experts=8,
        num_experts_per_tok=2, routed_scaling_factor=1.5, output_multiplier=0.7),
    "nemotron_h": lambda: family_case(
        "nemotron_h", T.NemotronHConfig, T.NemotronHForCausalLM, layer=1, seed=830,
        block_of=lambda m, i: m.model.layers[i].mixer, scores_of=sigmoid_gate_scores,
        layers_block_type=["full_attention", "moe"], n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=6, moe_shared_expert_intermediate_size=12, moe_latent_size=12, n_group=4, topk_group=2,
        routed_scaling_factor=1.5),
    "jetmoe": lambda: family_case("jetmoe", T.JetMoeConfig, T.JetMoeForCausalLM, layer=0, seed=840,
                                  num_hidden_layers=1, intermediate_size=6, num_local_experts=8, num_experts_per_tok=2,
                                  kv_channels=8, num_key_value_heads=2),
    "ernie4_5_vl_moe": ernie_vl,
    "ernie4_5_vl_moe_text": lambda: ernie_vl(multimodal=False),
})


# Ling-2 (bailing_hybrid): DeepSeek-V3's router on Kimi's config names, Step-3.7's per-layer clamped experts (low
# limits, so the clamps matter); full attention (its KDA layers need no part here)
BAILING = dict(MLA, moe_intermediate_size=6, num_hidden_layers=2, num_experts=8, num_experts_per_token=2,
               num_expert_group=4, topk_group=2, moe_renormalize=True, num_shared_experts=1, routed_scaling_factor=2.0,
               first_k_dense_replace=1, layer_types=["full_attention"] * 2, expert_swiglu_limit_list=[0.0, 0.3],
               share_expert_swiglu_limit_list=[0.0, 0.5], pad_token_id=0)
# Inkling-2: DeepSeek-V4's router (sigmoid + selection bias, renormalised, route_scale), softcapped SwiGLU experts
# (low caps, so they matter); tiny attention sizes
INKLING2 = dict(moe_intermediate_size=6, intermediate_size=6, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2,
                route_scale=1.5, mlp_gate_softcap=1.0, mlp_up_softcap=1.5, swa_num_attention_heads=2,
                swa_num_key_value_heads=1, swa_head_dim=8, sliding_window_size=8, d_rel=4, rel_extent=8,
                unpadded_vocab_size=16, n_layers_per_attn_res_block=1, layer_types=["hybrid_sliding", "hybrid"],
                eos_token_id=1)

# DeepSeek-V4: hash routing in layer 0 (tid2eid), sqrt(softplus) top-k with the selection bias in layer 1; limited
# SwiGLU experts and shared expert (a low limit, so the clamps matter); sliding attention only, tiny sizes
DEEPSEEK_V4 = dict(moe_intermediate_size=6, intermediate_size=6, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2,
                   routed_scaling_factor=1.5, swiglu_limit=1.0, mlp_layer_types=["hash_moe", "moe"],
                   layer_types=["sliding_attention"] * 2, head_dim=8, q_lora_rank=8, o_groups=2, o_lora_rank=4,
                   index_n_heads=2, index_head_dim=8, index_topk=4, hc_mult=2, partial_rotary_factor=0.5,
                   sliding_window=8, bos_token_id=0, eos_token_id=1)


def deepseek_v4():
    """DeepSeek-V4's hash layer (``tid2eid`` drawn: each token id's k distinct experts) recorded in
    tests/data/hf/deepseek_v4/ with the token ids the block reads (``token_ids.npy``), its top-k
    layer in deepseek_v4/moe/."""
    config = T.DeepseekV4Config(**{**TINY, **DEEPSEEK_V4})
    model = T.DeepseekV4ForCausalLM(config)
    randomize(model, 800)
    gen = torch.Generator().manual_seed(801)
    with torch.no_grad():
        table = model.model.layers[0].mlp.gate.tid2eid  # [vocab, k]
        for t in range(table.shape[0]):
            table[t] = torch.randperm(config.n_routed_experts, generator=gen)[: table.shape[1]]
    bf16_round(model)
    path = save(model, "deepseek_v4")
    model = T.DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    assert torch.equal(model.model.layers[0].mlp.gate.tid2eid, table), "tid2eid did not survive the save"
    ids = torch.randint(0, config.vocab_size, (B, S), generator=gen)
    hash_block = model.model.layers[0].mlp
    x = make_x(16, 802)
    with torch.no_grad():
        y = hash_block(x, input_ids=ids)
    np.save(path / "x.npy", x.numpy())
    np.save(path / "y.npy", y.numpy().astype(np.float32))
    np.save(path / "token_ids.npy", ids.numpy().astype(np.int32))
    (path / "case.json").write_text(json.dumps({"layer": 0, "token_ids": True}, indent=1) + "\n")
    print(f"deepseek_v4 (hash): y {tuple(y.shape)} |y| {float(y.abs().mean()):.3f}")
    block = model.model.layers[1].mlp
    for s in range(803, 1000):
        x = make_x(16, s)
        with torch.no_grad():
            logits = torch.nn.functional.linear(x.reshape(-1, 16), block.gate.weight)
            margin = top_margin(torch.sqrt(torch.nn.functional.softplus(logits)) + block.gate.e_score_correction_bias, 2)
        if margin > 1e-3:
            break
    (path / "moe").mkdir()
    record(path / "moe", block, x, {"layer": 1, "margin": margin})
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < MAX_BYTES, f"deepseek_v4: {size} bytes"

# Ergo: sigmoid + selection bias renormalised, scaling 1.5; squared-ReLU experts with a per-expert output RMSNorm and a
# normed squared-ReLU shared expert (rms_norm_eps 0.01, so the epsilon matters); layer 0 dense
ERGO = dict(num_hidden_layers=2, num_dense_blocks=1, first_dense_intermediate_size=24, moe_intermediate_size=6,
            shared_intermediate_size=12, num_experts=8, num_experts_per_tok=2, moe_routed_scaling_factor=1.5,
            sliding_window=8, global_attention_every_n_layers=2, rms_norm_eps=0.01)

# Inkling: 8 routed experts (sigmoid + selection bias) and 2 shared experts scored by the same router, all weighted
# by one softmax of log-sigmoid scores over the chosen 2 + the 2 shared, times route_scale and the learned
# global_scale (set to 1.25, so it matters); mlp_layer_types: layer 0 dense
INKLING = dict(moe_intermediate_size=6, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2,
               n_shared_experts=2, route_scale=1.5, swa_num_attention_heads=2, swa_num_key_value_heads=1,
               swa_head_dim=8, sliding_window_size=8, d_rel=4, rel_extent=8, unpadded_vocab_size=16,
               layer_types=["hybrid_sliding", "hybrid"], mlp_layer_types=["dense", "sparse"], eos_token_id=1)


def inkling_text():
    """Inkling's text model, layer 1's block recorded on an x whose top-k choice has no near-tie."""
    config = T.InklingTextConfig(**{**TINY, **INKLING})
    model = T.InklingForCausalLM(config)
    randomize(model, 820)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.global_scale.fill_(1.25)
    bf16_round(model)
    path = save(model, "inkling_text")
    model = T.InklingForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    block = model.model.layers[1].mlp
    for s in range(821, 1000):
        x = make_x(16, s)
        with torch.no_grad():
            logits = torch.nn.functional.linear(x.reshape(-1, 16), block.gate.weight)[:, :-2]  # the routed experts'
            margin = top_margin(torch.sigmoid(logits) + block.gate.e_score_correction_bias, 2)
        if margin > 1e-3:
            break
    record(path, block, x, {"layer": 1, "margin": margin})
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < MAX_BYTES, f"inkling_text: {size} bytes"


NEW.update({  # table entries for blocks whose math landed in jmoe (issue 26)
    "inkling_text": inkling_text,
    "ergo": lambda: family_case("ergo", T.ErgoConfig, T.AutoModelForCausalLM, layer=1, seed=810, score="sigmoid",
                                **ERGO),
    "deepseek_v4": deepseek_v4,
    "bailing_hybrid": lambda: family_case("bailing_hybrid", T.BailingHybridConfig, T.AutoModelForCausalLM, layer=1,
                                          seed=770, score="sigmoid", **BAILING),
    "inkling2_text": lambda: family_case("inkling2_text", T.Inkling2TextConfig, T.AutoModelForCausalLM, layer=1,
                                         seed=780, score="sigmoid",
                                         **INKLING2),
    "inkling2_loop_text": lambda: family_case("inkling2_loop_text", T.Inkling2LoopTextConfig,
                                              T.AutoModelForCausalLM, layer=1, seed=790, score="sigmoid",
                                              **dict(INKLING2, num_hidden_layers=3, layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"],
                                                     loop_layer_index_start=1, loop_layer_index_end=2)),
})


# ---------------------------------------------------------------- NLLB-MoE: the intended top-2 mixture


def top2gating64(logits: np.ndarray, capacity: int, *, before: bool) -> tuple[np.ndarray, np.ndarray]:
    """fairseq's ``top2gating`` (``moe/top2gate.py``; second_expert_policy "all", no padding, no
    BPR) in float64 on ``logits [T, E]``: the combine weights ``[T, E]`` and the experts ``[T, 2]``
    (-1 where dropped over ``capacity``)."""
    gates = np.exp(logits - logits.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    eye = np.eye(logits.shape[-1])
    i1 = gates.argmax(1)
    i2 = np.where(eye[i1] > 0, -np.inf, logits).argmax(1)
    mask1, mask2 = eye[i1], eye[i2]
    eps = np.finfo(np.float32).eps
    g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
    if before:
        g1, g2 = g1 / np.maximum(g1 + g2, eps), g2 / np.maximum(g1 + g2, eps)
    loc1 = np.cumsum(mask1, 0) - 1
    loc2 = np.cumsum(mask2, 0) - 1 + mask1.sum(0, keepdims=True)
    mask1, mask2 = mask1 * (loc1 < capacity), mask2 * (loc2 < capacity)
    if not before:
        g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
        g1, g2 = g1 / np.maximum(g1 + g2, eps), g2 / np.maximum(g1 + g2, eps)
    experts = np.stack([np.where(mask1.sum(1) > 0, i1, -1), np.where(mask2.sum(1) > 0, i2, -1)], 1)
    return g1[:, None] * mask1 + g2[:, None] * mask2, experts


def nllb_moe():
    """NLLB-MoE's encoder and decoder sparse blocks. transformers 5.25's ``NllbMoeSparseMLP`` mixes
    the wrong experts: ``NllbMoeExperts`` one-hot encodes the router's 0/1 *top-1 mask* as if it
    held expert indices, so every token goes through expert 1 weighted by its top-1 expert's
    combine weight and through expert 0 weighted by the rest. Its router (fairseq's top2gating,
    with capacity) is right. ``y.npy`` is the intended block (fairseq's ``MOELayer``): ``sum_e
    w_e FFN_e(x) (1 - moe_token_dropout)`` with ``w`` transformers' router output (checked against a
    float64 transcription of fairseq's gate) and the experts' own modules, in float64;
    transformers' own output is ``y_transformers.npy`` (checked to be that miswiring). The batch
    is one sequence of 16 tokens: NLLB's capacity counts all the tokens of a call, jmoe's those of
    a group (a sequence). Eval capacity ceil(0.5 * 16) = 8: some 2nd choices are dropped."""
    config = T.NllbMoeConfig(vocab_size=16, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=12, num_experts=4,
                             expert_capacity=3, encoder_sparse_step=2, decoder_sparse_step=2, router_bias=True,
                             moe_eval_capacity_token_fraction=0.5, moe_token_dropout=0.2, max_position_embeddings=64)
    model = T.NllbMoeForConditionalGeneration(config)
    randomize(model, 770)
    bf16_round(model)
    path = save(model, "nllb_moe")
    model = T.NllbMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    for stack, seed in (("encoder", 771), ("decoder", 772)):
        block = getattr(model.model, stack).layers[1].ffn
        for s in range(seed, seed + 200):
            x = torch.randn((1, 16, 16), generator=torch.Generator().manual_seed(s), dtype=torch.float32)
            with torch.no_grad():
                logits = block.router.classifier(x.reshape(-1, 16))
            margin = min(top_margin(logits, 1), top_margin(logits, 2))
            if margin > 1e-3:
                break
        with torch.no_grad():
            top1, weights, _ = block.router(x.reshape(-1, 16))  # [T, E] one-hot, [T, E] combine weights
            outputs = torch.stack([block.experts[f"expert_{e}"](x.reshape(-1, 16)) for e in range(4)])  # [E, T, d]
            y_hf = block(x)
        want_w, experts = top2gating64(logits.double().numpy(), math.ceil(0.5 * 16), before=False)
        assert np.allclose(weights.double().numpy(), want_w, rtol=1e-6, atol=1e-7), "transformers' router"
        keep = 1.0 - config.moe_token_dropout
        w, out = weights.double().numpy(), outputs.double().numpy()
        y = np.einsum("te,etd->td", w, out) * keep  # the intended mixture
        miswired = (out[0] * (w * (1 - top1.double().numpy())).sum(1, keepdims=True)
                    + out[1] * (w * top1.double().numpy()).sum(1, keepdims=True)) * keep
        assert np.allclose(miswired, y_hf.reshape(-1, 16).double().numpy(), rtol=1e-5, atol=1e-6), "the miswiring"
        sub = path / stack
        sub.mkdir(exist_ok=True)
        np.save(sub / "x.npy", x.numpy())
        np.save(sub / "y.npy", y.reshape(x.shape).astype(np.float32))
        np.save(sub / "y_transformers.npy", y_hf.numpy().astype(np.float32))
        np.save(sub / "experts.npy", experts.reshape(1, 16, 2).astype(np.int32))
        info = {"layer": 1, "stack": stack, "margin": margin, "dropped": int((experts < 0).sum()),
                "kept_one": int(((experts >= 0).sum(1) == 1).sum())}
        (sub / "case.json").write_text(json.dumps(info, indent=1) + "\n")
        print(f"nllb_moe/{stack}: |y - y_transformers| / |y| = "
              f"{np.abs(y - y_hf.reshape(-1, 16).numpy()).max() / np.abs(y).max():.3f} {info}")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < MAX_BYTES, f"nllb_moe: {size} bytes"


NEW["nllb_moe"] = nllb_moe


# ---------------------------------------------------------------- Phi-3.5-MoE's SparseMixer in train mode


def phimoe_train():
    """transformers' ``sparsemixer`` in train mode (``training=True``: each round's expert sampled
    with Gumbel noise, Heun's random weight scale, ``PhimoeMultiplier``'s backward) on random logits
    ``[64, 8]`` with eps 0.2, its random draws captured as it makes them (``exponential_``: the
    Gumbel noise is ``-log`` of it; ``rand_like`` / ``uniform_``: Heun's u), the chosen experts, the
    weights and the gradient of ``sum(weights * cotangent)`` with respect to the logits, into
    ``phimoe_train/sparsemixer_train.npz`` (no checkpoint: the router math alone)."""
    from transformers.models.phimoe import modeling_phimoe
    drawn = []

    def capture(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            drawn.append((name, out.detach().clone()))
            return out
        return wrapped

    originals = torch.Tensor.exponential_, torch.Tensor.uniform_, torch.rand_like
    torch.Tensor.exponential_ = capture("exponential", originals[0])
    torch.Tensor.uniform_ = capture("uniform", originals[1])
    torch.rand_like = capture("rand", originals[2])
    try:
        gen = torch.Generator().manual_seed(780)
        logits = (0.5 * torch.randn((64, 8), generator=gen) + 1.0).requires_grad_()  # near each other: masks matter
        torch.manual_seed(781)
        weights, experts = modeling_phimoe.sparsemixer(logits, jitter_eps=0.2, training=True)
    finally:
        torch.Tensor.exponential_, torch.Tensor.uniform_, torch.rand_like = originals
    names = [name for name, _ in drawn]
    assert names == ["exponential", "rand", "exponential", "rand", "uniform"], names  # round 2's rand is redrawn
    cotangent = torch.randn(weights.shape, generator=gen)
    (weights * cotangent).sum().backward()
    gumbel = torch.stack([-drawn[0][1].log(), -drawn[2][1].log()], 1)  # [T, 2, E]
    uniform = torch.cat([drawn[1][1], drawn[4][1]], 1)  # [T, 2]
    out = OUT / "phimoe_train"
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "sparsemixer_train.npz", logits=logits.detach().numpy(), jitter_eps=np.float32(0.2),
             gumbel=gumbel.numpy(), uniform=uniform.numpy(), experts=experts.numpy().astype(np.int32),
             weights=weights.detach().numpy(), cotangent=cotangent.numpy(), grad=logits.grad.numpy())
    first_best = experts[:, 0] == logits.detach().argmax(-1)
    print(f"phimoe_train: {int((~first_best).sum())} of 64 first choices sampled off the argmax")


NEW["phimoe_train"] = phimoe_train


def doge():
    """Doge's CDMoE block (``is_moe=True``): product-key routing over 16 = 4^2 single-neuron experts,
    top-4, plus its dense SwiGLU MLP. Its router splits ``router_gate(x)`` with ``view(2, B * S, K)``,
    mixing the tokens of the call: recorded on one sequence of 16 tokens (jmoe's routing group)."""
    config = T.DogeConfig(**{**TINY, "intermediate_size": 12}, num_hidden_layers=1, is_moe=True, num_experts=16,
                          num_experts_per_tok=4, keep_window_size=64)
    model = T.DogeForCausalLM(config)
    randomize(model, 790)
    bf16_round(model)
    path = save(model, "doge")
    model = T.DogeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    block = model.model.layers[0].mlp
    for s in range(791, 991):
        x = torch.randn((1, 16, 16), generator=torch.Generator().manual_seed(s), dtype=torch.float32)
        with torch.no_grad():
            a, b = block.router_gate(x).view(2, 16, 4)  # transformers' split (mixes tokens)
            scores = (a[:, :, None] + b[:, None, :]).reshape(16, 16)
        if top_margin(scores, 4) > 1e-3:
            break
    record(path, block, x, {"layer": 0, "margin": top_margin(scores, 4)}, torch.topk(scores, 4).indices[None])
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < MAX_BYTES, f"doge: {size} bytes"


NEW["doge"] = doge


CASES = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "olmoe": olmoe,
         "deepseek_v3": deepseek_v3, "deepseek_v3_fp8": lambda: deepseek_v3("deepseek_v3_fp8", fp8=True),
         "deepseek_v2": deepseek_v2, "gpt_oss": gpt_oss, "gpt_oss_mxfp4": gpt_oss_mxfp4, "llama4_text": llama4_text,
         "llama4": llama4, "switch_transformers": switch}
CASES.update(NEW)


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names or list(CASES):
        CASES[name]()
    import safetensors
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "safetensors": safetensors.__version__, "numpy": np.__version__,
                "python": sys.version.split()[0]}
    (OUT / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ["USE_HUB_KERNELS"] = "0"  # transformers' eager torch blocks, no kernels from the hub
    main(sys.argv[1:])
