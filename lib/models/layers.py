"""Shared transformer layers: embeddings, attention, MLP, the residual block and attention masks."""

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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


def _contract_trailing(x, kernel, n: int):
  """dot_general dimension numbers of x (..., K1..Kn) . kernel (K1..Kn, F...)."""
  return ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dense_f32acc(x, kernel, bias, n: int):
  """x . kernel + bias for bf16/f16 x and kernel, accumulating in float32 in forward AND backward.

  Plain autodiff of a low-precision dot gives backward dots that XLA:CPU runs in float32 (or, for
  some layouts, not at all: 'Unsupported element type for DotThunk'); here every dot is
  low-precision x low-precision -> float32, the form the AMX/tensor-core kernels take. `bias`
  stays float32 (its gradient is summed in float32). Contracts the trailing n dims of x.
  """
  y = lax.dot_general(x, kernel, _contract_trailing(x, kernel, n),
                      preferred_element_type=jnp.float32)
  return (y + bias.astype(jnp.float32)).astype(x.dtype)


def _dense_fwd(x, kernel, bias, n):
  return dense_f32acc(x, kernel, bias, n), (x, kernel, bias)


def _dense_bwd(n, res, g):
  x, kernel, bias = res
  g = g.astype(x.dtype)
  lead = x.ndim - n                                                     # batch-like dims of x
  f32 = jnp.float32
  # (lead..., F...) . (K..., F...) over F -> (lead..., K...): already in x's dim order.
  dx = lax.dot_general(g, kernel, ((tuple(range(lead, g.ndim)), tuple(range(n, kernel.ndim))),
                                   ((), ())), preferred_element_type=f32)
  # x first, so the result is (K..., F...) in kernel order (XLA:CPU rejects the g-first form).
  dk = lax.dot_general(x, g, ((tuple(range(lead)), tuple(range(lead))), ((), ())),
                       preferred_element_type=f32)
  db = jnp.sum(g.astype(f32), axis=tuple(range(lead)))
  return dx.astype(x.dtype), dk.astype(kernel.dtype), db.astype(bias.dtype)


dense_f32acc.defvjp(_dense_fwd, _dense_bwd)


class Dense(nn.Module):
  """nn.DenseGeneral over the trailing `n_in` axes, with the same `kernel` (K..., F...) and `bias`
  (F...) params and init; in bf16/f16 it computes with `dense_f32acc`."""
  features: tuple
  n_in: int
  kernel_axes: tuple
  bias_axes: tuple
  std: float
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", P(nn.initializers.normal(self.std), self.kernel_axes),
                        x.shape[x.ndim - self.n_in:] + self.features, self.param_dtype)
    bias = self.param("bias", P(nn.initializers.zeros, self.bias_axes), self.features,
                      self.param_dtype)
    dt = jnp.dtype(self.dtype)
    if dt in (jnp.bfloat16, jnp.float16):
      return dense_f32acc(x.astype(dt), kernel.astype(dt), bias, self.n_in)
    x, kernel, bias = x.astype(dt), kernel.astype(dt), bias.astype(dt)
    return lax.dot_general(x, kernel, _contract_trailing(x, kernel, self.n_in)) + bias


def dense(args: ModelArgs, features, kernel_axes, bias_axes, name: str, axis=-1, std=None):
  """A `Dense` contracting `axis` (-1, or trailing axes like (-2, -1)) into `features`."""
  std = args.initializer_range if std is None else std
  axes = axis if isinstance(axis, (tuple, list)) else (axis,)
  if sorted(axes) != list(range(-len(axes), 0)):
    raise ValueError(f"dense {name!r}: axis must be trailing axes, got {axis}")
  feats = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  return Dense(feats, len(axes), tuple(kernel_axes), tuple(bias_axes), std, args.dtype,
               args.param_dtype, name=name)


def _fmix32(h):
  """murmur3's 32-bit finaliser: a bijection in which every input bit flips ~half the output bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_dropout(x, rate: float, rng):
  """Inverted dropout whose keep-mask is a keyed counter hash of the element index.

  jax.random's bits (threefry, or RngBitGenerator for 'rbg') are computed in separate kernels
  and cost more than the whole matmul work of a small BERT on CPU; two rounds of a murmur3 mix
  keyed by 64 bits from `rng` fuse into the elementwise op that applies the mask. Masks are
  deterministic in `rng`; P(drop) = rate up to 2^-32.
  """
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  idx = lax.iota(jnp.uint32, x.size).reshape(x.shape)
  keep = _fmix32(_fmix32(idx ^ seed[0]) ^ seed[1]) >= jnp.uint32(round(rate * 2.0 ** 32))
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """nn.Dropout with `hash_dropout` masks (rng collection 'dropout')."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    return hash_dropout(x, self.rate, self.make_rng("dropout"))


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
    if q.dtype != jnp.float32 and jax.default_backend() == "cpu":
      # float32 attention matmuls on CPU: their bf16 autodiff hits XLA:CPU's missing batched
      # bf16 x bf16 -> f32 dot; they are ~2T/(12D+2T) of the FLOPs (5% for MiniLM at T=128).
      q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(a.head_dim).astype(q.dtype)
    # Softmax in float32 whatever the compute dtype: bf16 logits lose the small differences.
    probs = jax.nn.softmax(logits.astype(jnp.float32) + bias, axis=-1)  # (B, H, T, T)
    dropped = Dropout(a.attention_dropout_rate)(probs, deterministic=deterministic)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v.dtype), v).astype(x.dtype)  # (B, T, H, Dh)
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
    drop = lambda y: Dropout(a.dropout_rate)(y, deterministic=deterministic)
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
