"""Shared transformer layers: embeddings, attention, MLP, the residual block and attention masks."""

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# One axis vocabulary for the whole house: batch, length, embed, heads, head_dim, mlp, vocab.
P = nn.with_logical_partitioning


@dataclasses.dataclass(frozen=True)
class ModelArgs:
  """Architecture hyperparameters of a BERT or GPT-2 model (see configs/common.py presets)."""
  arch: str = "bert"                # bert (post-LN encoder) | gpt2 (pre-LN decoder)
  vocab_size: int = 30522
  hidden_size: int = 128
  num_layers: int = 2
  num_heads: int = 2
  mlp_dim: int = 512
  max_len: int = 512
  type_vocab_size: int = 2
  activation: str = "gelu"          # gelu (exact, BERT) | gelu_new (tanh approximation, GPT-2)
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  initializer_range: float = 0.02
  pad_token_id: int = 0
  dtype: str = "float32"            # compute dtype
  param_dtype: str = "float32"      # storage dtype
  remat: str = "none"               # none | full | dots

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def activation_fn(name: str):
  """Returns the activation by its Hugging Face name."""
  fns = {"gelu": functools.partial(jax.nn.gelu, approximate=False),
         "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
         "relu": jax.nn.relu, "tanh": jnp.tanh}
  if name not in fns:
    raise ValueError(f"unknown activation {name!r}; valid: {sorted(fns)}")
  return fns[name]


def attention_bias(input_mask, segment_ids=None, causal=False):
  """Additive attention bias (B, 1, T, T): 0 where a query may attend to a key, a large negative elsewhere.

  Keys that are padding are masked for every query (as Hugging Face does); with segment ids (packed
  rows) a query sees only keys of its own segment; `causal` adds the lower-triangular mask.
  """
  mask = input_mask[:, None, None, :].astype(bool)                     # (B, 1, 1, T) keys
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]           # (B, T, T)
    mask = mask & same[:, None]
  if causal:
    t = input_mask.shape[-1]
    mask = mask & jnp.tril(jnp.ones((t, t), bool))[None, None]
  return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def layer_norm(args: ModelArgs, name: str):
  return nn.LayerNorm(epsilon=args.layer_norm_eps, dtype=args.dtype, param_dtype=args.param_dtype,
                      use_fast_variance=False, name=name,
                      scale_init=P(nn.initializers.ones, ("embed",)),
                      bias_init=P(nn.initializers.zeros, ("embed",)))


def embed(args: ModelArgs, num: int, axes, name: str):
  return nn.Embed(num, args.hidden_size, dtype=args.dtype, param_dtype=args.param_dtype, name=name,
                  embedding_init=P(nn.initializers.normal(args.initializer_range), axes))


def dense(args: ModelArgs, features, kernel_axes, bias_axes, name: str, axis=-1, std=None):
  std = args.initializer_range if std is None else std
  return nn.DenseGeneral(features, axis=axis, dtype=args.dtype, param_dtype=args.param_dtype, name=name,
                         kernel_init=P(nn.initializers.normal(std), kernel_axes),
                         bias_init=P(nn.initializers.zeros, bias_axes))


class Attention(nn.Module):
  """Multi-head self-attention with `query`, `key`, `value` (embed, heads, head_dim) and `out` kernels."""
  args: ModelArgs
  out_std: Optional[float] = None

  @nn.compact
  def __call__(self, x, bias, deterministic: bool, output_attentions: bool):
    a = self.args
    qkv = functools.partial(dense, a, (a.num_heads, a.head_dim), ("embed", "heads", "head_dim"),
                            ("heads", "head_dim"))
    q, k, v = qkv("query")(x), qkv("key")(x), qkv("value")(x)          # (B, T, H, Dh)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(a.head_dim).astype(q.dtype)
    # Softmax in float32 whatever the compute dtype: bf16 logits lose the small differences.
    probs = jax.nn.softmax(logits.astype(jnp.float32) + bias, axis=-1)  # (B, H, T, T)
    dropped = nn.Dropout(a.attention_dropout_rate)(probs, deterministic=deterministic)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v.dtype), v)    # (B, T, H, Dh)
    out = dense(a, a.hidden_size, ("heads", "head_dim", "embed"), ("embed",), "out",
                axis=(-2, -1), std=self.out_std)(ctx)                   # (B, T, D)
    return out, (probs if output_attentions else None)


class Mlp(nn.Module):
  """Position-wise feed-forward: `mlp_in` (embed, mlp) -> activation -> `mlp_out` (mlp, embed)."""
  args: ModelArgs
  out_std: Optional[float] = None

  @nn.compact
  def __call__(self, x):
    a = self.args
    h = dense(a, a.mlp_dim, ("embed", "mlp"), ("mlp",), "mlp_in")(x)   # (B, T, F)
    h = activation_fn(a.activation)(h)
    return dense(a, a.hidden_size, ("mlp", "embed"), ("embed",), "mlp_out", std=self.out_std)(h)


class Block(nn.Module):
  """One transformer layer; post-LN (BERT) or pre-LN (GPT-2) residual arrangement."""
  args: ModelArgs
  pre_ln: bool = False
  out_std: Optional[float] = None

  @nn.compact
  def __call__(self, x, bias, deterministic: bool = True, output_attentions: bool = False):
    a = self.args
    attn = Attention(a, self.out_std, name="attention")
    mlp = Mlp(a, self.out_std, name="mlp")
    drop = lambda y: nn.Dropout(a.dropout_rate)(y, deterministic=deterministic)
    ln1, ln2 = layer_norm(a, "attention_ln"), layer_norm(a, "mlp_ln")
    if self.pre_ln:
      h, probs = attn(ln1(x), bias, deterministic, output_attentions)
      x = x + drop(h)
      x = x + drop(mlp(ln2(x)))
    else:
      h, probs = attn(x, bias, deterministic, output_attentions)
      x = ln1(x + drop(h))
      x = ln2(x + drop(mlp(x)))
    return x, probs


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def block_class(remat: str):
  """The Block class, wrapped in nn.remat when asked (deterministic/output_attentions are static)."""
  if remat == "none":
    return Block
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; valid: ['none'] + {sorted(REMAT_POLICIES)}")
  # static_argnums count `self` as 0: (x=1, bias=2, deterministic=3, output_attentions=4).
  return nn.remat(Block, policy=REMAT_POLICIES[remat], static_argnums=(3, 4))


def run_layers(args: ModelArgs, x, bias, deterministic, output_attentions,
               pre_ln: bool, out_std=None):
  """Applies `layer_0..layer_{L-1}` (call inside a compact method); returns output, hidden states, attentions."""
  cls = block_class(args.remat)
  hidden, attns = [x], []
  for i in range(args.num_layers):
    x, probs = cls(args, pre_ln, out_std, name=f"layer_{i}")(
        x, bias, deterministic, output_attentions)
    hidden.append(x)
    attns.append(probs)
  return x, tuple(hidden), (tuple(attns) if output_attentions else None)
