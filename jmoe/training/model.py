"""A small decoder-only Transformer LM whose FFNs are sparse MoE layers.

Pre-norm blocks (``x + attn(norm(x))``, then ``x + ffn(norm(x))``), RMSNorm,
rotary position embeddings, causal multi-head attention through
``jax.nn.dot_product_attention`` with the implementation named by ``attention``
(:data:`ATTENTION_IMPLS`): ``"xla"`` is XLA's unfused path (float32 logits
``[B, N, S, S]``, the masked half computed too), ``"cudnn"`` cuDNN's fused
flash-attention kernel (GPU only; bf16/fp16, head_dim a multiple of 8, <= 128), and
``"auto"`` (the default) picks cuDNN on a GPU when the dtype and shape allow, else XLA.
The token embedding is a row gather (``embedding="gather"``) or a one-hot matmul
(``"onehot"``: the same values, exactly; its backward sums the rows' gradients in
float32 as a matmul instead of a scatter-add in the activation dtype). Block ``i``'s FFN is
a :class:`jmoe.MoE` when ``num_experts > 0`` and ``i % moe_every == moe_every - 1``
(Switch: every other layer, starting with the second), else a dense FFN with the
same activation. ``num_experts = 0`` gives the dense baseline.

``LM(tokens [B, S]) -> (logits [B, S, V] float32, aux)``; ``aux`` holds the MoE
layers' losses summed over layers (``load_balancing_loss``, ``z_loss``) and their
per-layer metrics stacked on a leading layer axis ``[L_moe, ...]``. The total
training loss is :func:`total_loss`.

Activations run in ``dtype`` (float32 or bfloat16); parameters are float32; the
router of every MoE layer computes its probabilities in float32 whatever
``dtype`` is; logits are returned in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jmoe
from jmoe import platform, routing
from jmoe.experts import ExpertBank

Array = jax.Array

# Per-layer MoE metrics kept in aux (stacked over MoE layers); the two losses are summed.
LAYER_METRICS = ("dropped_fraction", "padding_fraction", "router_entropy", "tokens_per_expert", "exchange_rounds")
# Summed over MoE layers: the Switch loss, the z-loss, the routers' own (pre-weighted) losses, then the unweighted
# balance losses lb_weight may multiply instead of the Switch loss (see total_loss)
AUX_LOSSES = ("load_balancing_loss", "z_loss", *routing.EXTRA_LOSSES, *routing.BALANCE_LOSSES)
ATTENTION_IMPLS = ("auto", "xla", "cudnn")  # jax.nn.dot_product_attention's implementation; auto: see attention_impl
EMBEDDINGS = ("gather", "onehot")  # how tokens become vectors; see onehot_embed


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------


def rms_norm(x: Array, scale: Array, eps: float = 1e-6) -> Array:
    """``y = x / sqrt(mean(x^2, -1) + eps) * scale``, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rotary_angles(positions: Array, head_dim: int, base: float = 10000.0) -> Array:
    """Angles ``theta[p, i] = p * base^(-2i / head_dim)`` for i < head_dim / 2: [S, head_dim / 2]."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [H/2]
    return positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [S, H/2]


def apply_rotary(x: Array, positions: Array, base: float = 10000.0) -> Array:
    """Rotate channel pairs ``(x_i, x_{i + H/2})`` by ``theta[p, i]`` (GPT-NeoX "half" layout).

    ``y_i = x_i cos(theta) - x_{i+H/2} sin(theta)``,
    ``y_{i+H/2} = x_{i+H/2} cos(theta) + x_i sin(theta)``; so ``<rot(q, m), rot(k, n)>``
    depends on the positions only through ``m - n``.

    Args:
      x: [B, S, N, H] queries or keys.
      positions: [S] integer positions.
    Returns:
      [B, S, N, H] in x's dtype (computed in float32).
    """
    half = x.shape[-1] // 2
    theta = rotary_angles(positions, x.shape[-1], base)  # [S, H/2]
    cos, sin = jnp.cos(theta)[:, None, :], jnp.sin(theta)[:, None, :]  # [S, 1, H/2]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]  # [B, S, N, H/2]
    y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [B, S, N, H]
    return y.astype(x.dtype)


def attention_impl(name: str, dtype, head_dim: int) -> str:
    """The implementation ``jax.nn.dot_product_attention`` gets for ``name`` (one of
    :data:`ATTENTION_IMPLS`): ``"auto"`` is ``"cudnn"`` on a GPU when the activations are
    bf16/fp16 and ``head_dim`` is a multiple of 8 and at most 128 (cuDNN's flash-attention
    limits), else ``"xla"``; the others name themselves. Where cuDNN then refuses at trace time
    (not detected, too old, an unsupported GPU), :class:`Attention` falls back to ``"xla"`` for
    ``"auto"`` (an explicit ``"cudnn"`` raises)."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention={name!r} must be one of {', '.join(ATTENTION_IMPLS)}")
    if name != "auto":
        return name
    fits = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 \
        and head_dim <= 128
    return "cudnn" if fits and platform.current() == "gpu" else "xla"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def onehot_embed(tokens: Array, table: Array, dtype) -> Array:
    """``table[tokens]`` in ``dtype`` as a one-hot matmul: tokens [...] int, table [V, d] -> [..., d].

    Exact: every output is ``1 * table[t]`` plus zeros, accumulated in float32 (so equal to the
    gather ``table.astype(dtype)[tokens]``). The backward, ``one_hot(tokens)^T @ g``, sums each row's
    gradients in float32 (a matmul instead of a scatter-add in ``dtype``) and returns a float32
    gradient for the float32 table.
    """
    return _onehot_embed_fwd(tokens, table, dtype)[0]


def _onehot(tokens: Array, vocab: int, dtype) -> Array:
    return jax.nn.one_hot(tokens, vocab, dtype=dtype)  # [..., V]


def _onehot_embed_fwd(tokens, table, dtype):
    y = jnp.einsum("...v,vd->...d", _onehot(tokens, table.shape[0], dtype), table.astype(dtype),
                   preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    return y.astype(dtype), (tokens, table)  # the table (a parameter) is kept anyway: no extra memory


def _onehot_embed_bwd(dtype, res, g):
    tokens, table = res
    vocab, table_dtype = table.shape[0], table.dtype
    # 0/1 times g is exact in g's dtype; HIGHEST keeps float32 g from being rounded to TF32 on a GPU
    d_table = jnp.einsum("...v,...d->vd", _onehot(tokens, vocab, g.dtype), g,
                         preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    return None, d_table.astype(table_dtype)


onehot_embed.defvjp(_onehot_embed_fwd, _onehot_embed_bwd)


def lm_loss(logits: Array, targets: Array) -> Array:
    """Mean next-token cross-entropy in nats: ``mean(logsumexp(logits) - logits[target])``.

    logits [B, S, V] (float32), targets [B, S] int.
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def total_loss(lm: Array, aux: dict[str, Array], lb_weight: float, z_weight: float,
               lb_loss: str = "load_balancing_loss") -> Array:
    """``lm + lb_weight * sum_layers(aux[lb_loss]) + z_weight * sum_layers(z_loss)
    + sum_layers(extra losses)``. ``lb_loss`` names the balance loss: ``"load_balancing_loss"``
    (Switch, per routing group), ``"sequence_balance_loss"`` (DeepSeek-V3's sequence-wise loss,
    = Switch's / k) or ``"global_load_balancing_loss"`` (f and P over the whole global batch).
    The extra losses are the routers' own (:data:`jmoe.routing.EXTRA_LOSSES`, e.g. noisy
    top-k's importance and load losses), already weighted by the layer (0 for the other routers)."""
    if lb_loss not in ("load_balancing_loss", *routing.BALANCE_LOSSES):
        raise ValueError(f"lb_loss={lb_loss!r} must be load_balancing_loss or one of {routing.BALANCE_LOSSES}")
    extra = sum((aux[name] for name in routing.EXTRA_LOSSES), jnp.zeros((), jnp.float32))
    return lm + lb_weight * aux[lb_loss] + z_weight * aux["z_loss"] + extra


def is_moe_layer(layer: int, num_experts: int, moe_every: int) -> bool:
    """Block ``layer`` (0-based) has an MoE FFN iff experts exist and ``layer % moe_every == moe_every - 1``."""
    return num_experts > 0 and layer % moe_every == moe_every - 1


# ----------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale (init 1); see :func:`rms_norm`."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):
    """Causal multi-head self-attention with rotary embeddings on q and k."""

    def __init__(self, d_model: int, num_heads: int, *, rope_base: float = 10000.0, dtype, rngs: nnx.Rngs,
                 attention: str = "auto"):
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={attention!r} must be one of {', '.join(ATTENTION_IMPLS)}")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.rope_base, self.attention = rope_base, attention
        self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, s, _ = x.shape
        qkv = self.qkv(x).reshape(b, s, 3, self.num_heads, self.head_dim)  # [B, S, 3, N, H]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, S, N, H]
        positions = jnp.arange(s)
        q = apply_rotary(q, positions, self.rope_base)
        k = apply_rotary(k, positions, self.rope_base)
        impl = attention_impl(self.attention, q.dtype, self.head_dim)
        try:
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)  # [B, S, N, H]
        except (RuntimeError, ValueError, NotImplementedError):
            if self.attention != "auto" or impl == "xla":
                raise
            # auto: cuDNN refused at trace time (no cuDNN, too old, a GPU it does not support): XLA's path
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        return self.out(o.reshape(b, s, -1))  # [B, S, d]


class DenseFFN(nnx.Module):
    """A dense FFN: one :class:`jmoe.ExpertBank` expert (same activation and init as the MoE experts)."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str, dtype, rngs: nnx.Rngs):
        self.bank = ExpertBank(1, d_model, d_ff, activation=activation, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        y = self.bank(x.reshape(1, -1, x.shape[-1]))  # [1, B * S, d]
        return y.reshape(x.shape)


class Block(nnx.Module):
    """``x = x + attn(norm(x)); x = x + ffn(norm(x))``; ffn is MoE or dense."""

    def __init__(self, d_model: int, num_heads: int, ffn: nnx.Module, *, rope_base: float, dtype, rngs: nnx.Rngs,
                 attention: str = "auto"):
        self.attn_norm = RMSNorm(d_model)
        self.attn = Attention(d_model, num_heads, rope_base=rope_base, dtype=dtype, rngs=rngs, attention=attention)
        self.ffn_norm = RMSNorm(d_model)
        self.ffn = ffn

    def __call__(self, x: Array, token_mask: Array | None = None) -> tuple[Array, dict[str, Array] | None]:
        x = x + self.attn(self.attn_norm(x))  # [B, S, d]
        h = self.ffn_norm(x)
        if isinstance(self.ffn, jmoe.MoE):
            y, aux = self.ffn(h, token_mask=token_mask)
        else:
            y, aux = self.ffn(h), None
        return x + y, aux


class LM(nnx.Module):
    """Decoder-only byte/token LM; ``__call__(tokens [B, S]) -> (logits [B, S, V] f32, aux)``.

    MoE options (``k``, ``capacity_factor``, ``router``, ...) are passed through
    ``moe_kwargs`` to every :class:`jmoe.MoE` layer. ``attention`` (:data:`ATTENTION_IMPLS`) and
    ``embedding`` (:data:`EMBEDDINGS`) choose implementations only: the parameters and the
    function computed are the same.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        d_ff: int,
        num_experts: int = 0,
        expert_d_ff: int | None = None,
        moe_every: int = 2,
        activation: str = "gelu",
        rope_base: float = 10000.0,
        dtype=jnp.float32,
        moe_kwargs: dict | None = None,
        attention: str = "auto",
        embedding: str = "gather",
        rngs: nnx.Rngs,
    ):
        if min(vocab_size, d_model, num_layers, num_heads, d_ff, moe_every) < 1:
            raise ValueError("vocab_size, d_model, num_layers, num_heads, d_ff and moe_every must be >= 1")
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={attention!r} must be one of {', '.join(ATTENTION_IMPLS)}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding={embedding!r} must be one of {', '.join(EMBEDDINGS)}")
        self.vocab_size, self.num_experts = vocab_size, num_experts
        self.dtype, self.embedding = dtype, embedding
        self.embed = nnx.Embed(
            vocab_size, d_model, embedding_init=nnx.initializers.normal(1.0), dtype=dtype, rngs=rngs
        )
        blocks = []
        for i in range(num_layers):
            if is_moe_layer(i, num_experts, moe_every):
                ffn = jmoe.MoE(
                    d_model, expert_d_ff or d_ff, num_experts, activation=activation,
                    dtype=dtype, rngs=rngs, **(moe_kwargs or {}),
                )
            else:
                ffn = DenseFFN(d_model, d_ff, activation=activation, dtype=dtype, rngs=rngs)
            blocks.append(Block(d_model, num_heads, ffn, rope_base=rope_base, dtype=dtype, rngs=rngs,
                                attention=attention))
        self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(d_model)
        self.head = nnx.Linear(d_model, vocab_size, use_bias=False, dtype=dtype, rngs=rngs)

    @property
    def num_moe_layers(self) -> int:
        return sum(isinstance(b.ffn, jmoe.MoE) for b in self.blocks)

    def __call__(self, tokens: Array, token_mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """tokens [B, S] int -> (logits [B, S, V] float32, aux). ``token_mask`` [B, S] bool marks
        padding with False: MoE layers give it no expert slot (it cannot crowd out real tokens)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, S], got shape {tokens.shape}")
        if self.embedding == "onehot":
            x = onehot_embed(tokens, self.embed.embedding[...], self.dtype)  # [B, S, d]
        else:
            x = self.embed(tokens)  # [B, S, d]
        layer_aux = []
        for block in self.blocks:
            x, aux = block(x, token_mask)
            if aux is not None:
                layer_aux.append(aux)
        logits = self.head(self.final_norm(x)).astype(jnp.float32)  # [B, S, V]
        return logits, collect_aux(layer_aux)


def collect_aux(layer_aux: list[dict[str, Array]]) -> dict[str, Array]:
    """Sum the aux losses over MoE layers (a loss a layer does not report counts 0); stack the
    per-layer metrics to ``[L_moe, ...]``.

    With no MoE layer the losses are 0 and the stacked metrics have a 0-length layer axis.
    """
    zero = jnp.zeros((), jnp.float32)
    out = {name: sum((a.get(name, zero) for a in layer_aux), zero) for name in AUX_LOSSES}
    for name in LAYER_METRICS:
        if layer_aux:
            out[name] = jnp.stack([a[name] for a in layer_aux])  # [L_moe, ...]
        else:
            out[name] = jnp.zeros((0,) if name != "tokens_per_expert" else (0, 0), jnp.float32)
    return out


def count_params(model: nnx.Module) -> int:
    """Total number of parameter scalars."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def active_params_per_token(model: LM) -> int:
    """Parameters a token's forward pass multiplies with, excluding the embedding lookup.

    Per MoE layer only ``k`` of the ``E`` experts count (plus the router); the
    output head counts. Used for FLOPs/token ``= 6 * active`` (+ attention).
    """
    total = 0
    for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] == "embed":
            continue
        if "experts" in path:  # [E, ...] stacked expert weights of an MoE layer
            moe = model.blocks[path[1]].ffn
            total += x.size // moe.num_experts * moe.k
        else:
            total += x.size
    return total


def flops_per_token(model: LM, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token: ``6 * active_params + 6 * L * S * d`` (PaLM appendix B with the causal
    halving). The attention scores ``q k^T`` and the weighted values ``p v`` are ``2 * 2 * S * d`` FLOPs
    per token and layer forward for all ``S`` keys, x3 for forward + backward = ``12 * L * S * d``; a
    causal token attends to ``(S + 1) / 2`` keys on average, so the useful work (what a causal kernel such
    as cuDNN's computes) is about half: ``6 * L * S * d``. ``causal=False`` counts all ``S`` keys (PaLM's
    formula; what XLA's unfused path computes, the masked half included). MFU uses the causal count: the
    masked half is not useful work. The embedding lookup counts 0 (a gather, or a one-hot matmul whose
    FLOPs are not useful work either)."""
    d = model.embed.embedding.shape[1]
    attention = (6.0 if causal else 12.0) * len(model.blocks) * seq_len * d
    return 6.0 * active_params_per_token(model) + attention
