"""PEFT layers: the LoRA low-rank path of a Dense, Houlsby adapters, prefix and prompt tuning."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lib.models.layers import (P, Dense, LoraArgs, ModelArgs, _low_precision, activation_fn,
                               dropout_seed, seeded_dropout)


def low_rank(dense: Dense, x, lora: LoraArgs, deterministic: bool):
  """LoRA's term of a Dense: alpha/rank * dropout(x) . lora_a (K..., r) . lora_b (r, F...), in the
  compute dtype (AdaLoRA: lora_a . diag(lora_e) . lora_b). The factors are parameters of `dense`
  (call inside its compact method); lora_b (lora_e) starts at zero, so the model starts as the base.
  """
  n, r, dt = dense.n_in, lora.rank, jnp.dtype(dense.dtype)
  a_axes, b_axes = dense.kernel_axes[:n] + (None,), (None,) + dense.kernel_axes[n:]
  # A as HF PEFT (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(fan_in))); AdaLoRA: N(0, 0.02) for both.
  a_init = (nn.initializers.normal(0.02) if lora.svd else nn.initializers.variance_scaling(
      1 / 3, "fan_in", "uniform", in_axis=tuple(range(n)), out_axis=-1))
  b_init = nn.initializers.normal(0.02) if lora.svd else nn.initializers.zeros
  a = dense.param("lora_a", P(a_init, a_axes), x.shape[x.ndim - n:] + (r,), dense.param_dtype)
  b = dense.param("lora_b", P(b_init, b_axes), (r,) + dense.features, dense.param_dtype)
  if lora.svd:   # x . A . diag(E) = x . (A * E): E joins A before the matmuls (a K x r product)
    e = dense.param("lora_e", P(nn.initializers.zeros, (None,)), (r,), dense.param_dtype)
    a = a * e
  rate = lora.dropout if not deterministic else 0.0
  seed = (dropout_seed(dense.make_rng("dropout")) if rate > 0
          else jnp.zeros((2,), jnp.uint32))
  return low_rank_product(x.astype(dt), a, b, seed, n, lora.alpha / lora.rank, rate)


def _dot(x, y, contract, dt):
  """dot_general of x and y (cast to `dt`) over `contract` ((x dims), (y dims)); bf16/f16
  operands accumulate in float32 (the float32 product is returned)."""
  acc = jnp.float32 if _low_precision(dt) else None
  return lax.dot_general(x.astype(dt), y.astype(dt), (contract, ((), ())),
                         preferred_element_type=acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def low_rank_product(x, a, b, seed, n: int, scale: float, rate: float):
  """scale * dropout(x) . a . b for x (..., K1..Kn) in the compute dtype, a (K1..Kn, r),
  b (r, F...); dropout (`seeded_dropout` with `seed`) only if rate > 0. Returns (..., F...) in
  x's dtype.

  Its backward is written out rather than left to autodiff, which on XLA:CPU made LoRA on every
  linear layer as slow as full fine-tuning: it saved the dropped input of every adapted Dense,
  and formed the factor gradients as products whose big operand (the activation or its
  cotangent, (B*T, K or F)) XLA transposes in memory first. Here the mask is recomputed from
  `seed`, and the factor gradients are products whose transposed operand is the small rank-r
  one (lora_a's in float32 only: bf16 needs the activation-first form, see `_low_rank_bwd`).
  """
  return _low_rank_fwd(x, a, b, seed, n, scale, rate)[0]


def _low_rank_fwd(x, a, b, seed, n, scale, rate):
  dt, lead = x.dtype, x.ndim - n
  xd = seeded_dropout(x, rate, seed) if rate > 0 else x
  h = _dot(xd, a, (tuple(range(lead, x.ndim)), tuple(range(n))), dt).astype(dt)   # (..., r)
  y = _dot(h, b, ((h.ndim - 1,), (0,)), dt) * jnp.asarray(scale, jnp.float32)    # (..., F...)
  return y.astype(dt), (x, a, b, seed, h)


def _low_rank_bwd(n, scale, rate, res, g):
  x, a, b, seed, h = res
  dt, lead = x.dtype, x.ndim - n
  g = g.astype(dt)                                                      # (..., F...)
  rows = tuple(range(lead))
  # u = scale * g . b^T: (..., r), the cotangent of h.
  u = (_dot(g, b, (tuple(range(lead, g.ndim)), tuple(range(1, b.ndim))), dt)
       * jnp.asarray(scale, jnp.float32)).astype(dt)
  dx = _dot(u, a, ((u.ndim - 1,), (a.ndim - 1,)), dt).astype(dt)       # (..., K...)
  xd = x
  if rate > 0:   # d dropout(x) / dx is the same mask and 1/(1-rate): dropout of the cotangent
    dx, xd = seeded_dropout(dx, rate, seed), seeded_dropout(x, rate, seed)
  if _low_precision(dt):   # XLA:CPU runs the (r, K) form below as a DotThunk: no bf16 there
    da = _dot(xd, u, (rows, rows), dt)                                  # (K..., r)
  else:   # (r, K...): the rank-r operand is the one XLA transposes, not the (B*T, K) input
    da = jnp.moveaxis(_dot(u, xd, (rows, rows), dt), 0, -1)
  db = _dot(h, g, (rows, rows), dt) * jnp.asarray(scale, jnp.float32)   # (r, F...)
  return dx, da.astype(a.dtype), db.astype(b.dtype), None


low_rank_product.defvjp(_low_rank_fwd, _low_rank_bwd)


class PrefixMlp(nn.Module):
  """Prefix tuning's reparameterisation (Li & Liang 2021): `embedding` (P, D) -> tanh MLP ->
  every layer's key and value prefixes (P, L, 2, H, Dh). `peft.merge` folds it into the direct
  `prefix_key`/`prefix_value` of each layer after training."""
  args: ModelArgs

  @nn.compact
  def __call__(self):
    a = self.args
    mk = functools.partial(Dense, n_in=1, std=a.initializer_range, dtype=a.dtype,
                           param_dtype=a.param_dtype, dot_general=a.dot_general)
    e = self.param("embedding", P(nn.initializers.normal(1.0), (None, "embed")),
                   (a.prefix_len, a.hidden_size), a.param_dtype)
    h = jnp.tanh(mk((a.prefix_hidden,), kernel_axes=("embed", "mlp"), bias_axes=("mlp",),
                    name="hidden")(e))                                  # (P, Hr)
    return mk((a.num_layers, 2, a.num_heads, a.head_dim),
              kernel_axes=("mlp", None, None, "heads", "head_dim"),
              bias_axes=(None, None, "heads", "head_dim"), name="out")(h)  # (P, L, 2, H, Dh)


class Adapter(nn.Module):
  """Houlsby bottleneck adapter x + up(act(down(x))), embed -> adapter_dim -> embed; `up` starts
  at zero so that the adapted model starts as the base model."""
  args: ModelArgs

  @nn.compact
  def __call__(self, x):
    a = self.args
    mk = functools.partial(Dense, n_in=1, dtype=a.dtype, param_dtype=a.param_dtype,
                           dot_general=a.dot_general)
    h = mk((a.adapter_dim,), kernel_axes=("embed", None), bias_axes=(None,),
           std=a.initializer_range, name="down")(x)                    # (B, T, m)
    h = activation_fn(a.activation)(h)
    return x + mk((a.hidden_size,), kernel_axes=(None, "embed"), bias_axes=("embed",), std=0.0,
                  name="up")(h)


class SoftPrompt(nn.Module):
  """Prompt tuning (Lester et al. 2021): `embedding` (P, D) vectors placed before the first token
  of the first layer's input (after the embeddings, so real tokens keep their positions); they
  attend and are attended to as ordinary tokens. Returns (B, P + T, D) inputs and mask."""
  args: ModelArgs

  @nn.compact
  def __call__(self, x, input_mask, segment_ids=None):
    a = self.args
    if segment_ids is not None:
      raise ValueError("prompt tuning needs one document per row: packed rows (segment_ids) "
                       "would all share, and leak through, the prompt tokens")
    # The scale of the first layer's input: unit variance after BERT's embedding LayerNorm, raw
    # embeddings (initializer_range) in GPT-2.
    std = 1.0 if a.arch == "bert" else a.initializer_range
    p = self.param("embedding", P(nn.initializers.normal(std), (None, "embed")),
                   (a.prompt_len, a.hidden_size), a.param_dtype)
    b = x.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(p.astype(x.dtype), (b,) + p.shape), x], axis=1)
    mask = jnp.concatenate([jnp.ones((b, a.prompt_len), input_mask.dtype), input_mask], axis=1)
    return x, mask


def strip_prompt(args: ModelArgs, x, hidden, attns):
  """Drops the soft-prompt positions from the outputs and hidden states (attentions keep them)."""
  n = args.prompt_len
  if not n:
    return x, hidden, attns
  return x[:, n:], tuple(h[:, n:] for h in hidden), attns
