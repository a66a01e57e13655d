"""Shared transformer layers: embeddings, attention, MLP, the residual block and attention masks."""

import dataclasses
import functools
import re
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# One axis vocabulary for the whole house: batch, length, embed, heads, head_dim, mlp, vocab.
P = nn.with_logical_partitioning


class LoraArgs(NamedTuple):
  """Low-rank update of a Dense kernel: W + alpha/rank * A.B; with `svd` (AdaLoRA) A.diag(E).B."""
  rank: int
  alpha: float
  dropout: float = 0.0     # on the input of the low-rank path only
  svd: bool = False


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
  # Parameter-efficient fine-tuning, set by peft.configure from a config's `peft` spec; the defaults
  # build the plain model (same parameters, same numerics).
  lora: tuple = ()                  # ((regex over kernel paths, LoraArgs | None), ...): first
                                    # full match wins; a matching Dense gets lora_a/lora_b(/lora_e)
  adapter_dim: int = 0              # Houlsby adapter bottleneck after attention and MLP (0 = none)
  prefix_len: int = 0               # key/value prefixes in every attention layer (0 = none)
  prefix_hidden: int = 0            # width of the prefixes' MLP reparameterisation (0 = direct)
  prompt_len: int = 0               # soft prompt vectors before the first token (0 = none)

  def __post_init__(self):
    # model.json stores `lora` as nested lists; keep it a hashable tuple of (str, LoraArgs|None).
    rules = tuple((str(rx), None if m is None else LoraArgs(*m)) for rx, m in self.lora)
    object.__setattr__(self, "lora", rules)

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


@functools.lru_cache(maxsize=4096)
def lora_for(rules: tuple, path: str) -> Optional[LoraArgs]:
  """The LoraArgs of the first rule whose regex fully matches `path` (None: no LoRA there)."""
  for rx, lora in rules:
    if re.fullmatch(rx, path):
      return lora
  return None


def _low_precision(dt) -> bool:
  return jnp.dtype(dt) in (jnp.bfloat16, jnp.float16)


def _matmul(x, kernel, n: int, dt):
  """x (..., K1..Kn) . kernel (K1..Kn, F...) in compute dtype `dt` (f32 accumulation if low)."""
  x, kernel = x.astype(dt), kernel.astype(dt)
  if _low_precision(dt):
    return dense_f32acc(x, kernel, jnp.zeros(kernel.shape[n:], jnp.float32), n)
  return lax.dot_general(x, kernel, _contract_trailing(x, kernel, n))


class Dense(nn.Module):
  """nn.DenseGeneral over the trailing `n_in` axes, with the same `kernel` (K..., F...) and `bias`
  (F...) params and init; in bf16/f16 it computes with `dense_f32acc`.

  If a `lora` rule matches this module's kernel path, it adds the low-rank path
  alpha/rank * dropout(x) . lora_a (K..., r) . lora_b (r, F...), with lora_b zero-initialised so
  that the model starts as the base model (AdaLoRA: lora_a . diag(lora_e) . lora_b, lora_e zero).
  """
  features: tuple
  n_in: int
  kernel_axes: tuple
  bias_axes: tuple
  std: float
  dtype: str = "float32"
  param_dtype: str = "float32"
  lora: tuple = ()   # ModelArgs.lora rules

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    kernel = self.param("kernel", P(nn.initializers.normal(self.std), self.kernel_axes),
                        x.shape[x.ndim - self.n_in:] + self.features, self.param_dtype)
    bias = self.param("bias", P(nn.initializers.zeros, self.bias_axes), self.features,
                      self.param_dtype)
    dt = jnp.dtype(self.dtype)
    if _low_precision(dt):
      y = dense_f32acc(x.astype(dt), kernel.astype(dt), bias, self.n_in)
    else:
      xc, kernel, bias = x.astype(dt), kernel.astype(dt), bias.astype(dt)
      y = lax.dot_general(xc, kernel, _contract_trailing(xc, kernel, self.n_in)) + bias
    lora = lora_for(self.lora, "/".join(self.path) + "/kernel") if self.lora else None
    return y if lora is None else y + self._low_rank(x, lora, deterministic).astype(y.dtype)

  def _low_rank(self, x, lora: LoraArgs, deterministic: bool):
    """scale * dropout(x) . A (. diag(E)) . B, in the compute dtype."""
    n, r, dt = self.n_in, lora.rank, jnp.dtype(self.dtype)
    a_axes, b_axes = self.kernel_axes[:n] + (None,), (None,) + self.kernel_axes[n:]
    # A as HF PEFT (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(fan_in))); AdaLoRA: N(0, 0.02) for both.
    a_init = (nn.initializers.normal(0.02) if lora.svd else nn.initializers.variance_scaling(
        1 / 3, "fan_in", "uniform", in_axis=tuple(range(n)), out_axis=-1))
    b_init = nn.initializers.normal(0.02) if lora.svd else nn.initializers.zeros
    a = self.param("lora_a", P(a_init, a_axes), x.shape[x.ndim - n:] + (r,), self.param_dtype)
    b = self.param("lora_b", P(b_init, b_axes), (r,) + self.features, self.param_dtype)
    if not deterministic and lora.dropout > 0:
      x = hash_dropout(x, lora.dropout, self.make_rng("dropout"))
    h = _matmul(x, a, n, dt)                                            # (..., r)
    if lora.svd:
      e = self.param("lora_e", P(nn.initializers.zeros, (None,)), (r,), self.param_dtype)
      h = h * e.astype(h.dtype)
    scale = jnp.asarray(lora.alpha / lora.rank, h.dtype)
    return _matmul(h, b, 1, dt) * scale


def dense(args: ModelArgs, features, kernel_axes, bias_axes, name: str, axis=-1, std=None):
  """A `Dense` contracting `axis` (-1, or trailing axes like (-2, -1)) into `features`."""
  std = args.initializer_range if std is None else std
  axes = axis if isinstance(axis, (tuple, list)) else (axis,)
  if sorted(axes) != list(range(-len(axes), 0)):
    raise ValueError(f"dense {name!r}: axis must be trailing axes, got {axis}")
  feats = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  return Dense(feats, len(axes), tuple(kernel_axes), tuple(bias_axes), std, args.dtype,
               args.param_dtype, args.lora, name=name)


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
  """Multi-head self-attention with `query`, `key`, `value` (embed, heads, head_dim) and `out` kernels.

  With `prefix_len` (prefix tuning) the keys and values are preceded by `prefix_key` and
  `prefix_value` (P, heads, head_dim): own parameters, or given by `PrefixMlp` as `prefix`.
  Every query may attend to them; the attention probabilities are then (B, H, T, P + T).
  """
  args: ModelArgs
  out_std: Optional[float] = None

  @nn.compact
  def __call__(self, x, bias, deterministic: bool, output_attentions: bool, prefix=None):
    a = self.args
    qkv = functools.partial(dense, a, (a.num_heads, a.head_dim), ("embed", "heads", "head_dim"),
                            ("heads", "head_dim"))
    q, k, v = (qkv(n)(x, deterministic) for n in ("query", "key", "value"))  # (B, T, H, Dh)
    if q.dtype != jnp.float32 and jax.default_backend() == "cpu":
      # float32 attention matmuls on CPU: their bf16 autodiff hits XLA:CPU's missing batched
      # bf16 x bf16 -> f32 dot; they are ~2T/(12D+2T) of the FLOPs (5% for MiniLM at T=128).
      q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    if a.prefix_len:
      k, v, bias = self._prepend_prefix(k, v, bias, prefix)           # (B, P + T, H, Dh)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(a.head_dim).astype(q.dtype)
    # Softmax in float32 whatever the compute dtype: bf16 logits lose the small differences.
    probs = jax.nn.softmax(logits.astype(jnp.float32) + bias, axis=-1)  # (B, H, T, [P +] T)
    dropped = Dropout(a.attention_dropout_rate)(probs, deterministic=deterministic)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v.dtype), v).astype(x.dtype)  # (B, T, H, Dh)
    out = dense(a, a.hidden_size, ("heads", "head_dim", "embed"), ("embed",), "out",
                axis=(-2, -1), std=self.out_std)(ctx, deterministic)   # (B, T, D)
    return out, (probs if output_attentions else None)

  def _prepend_prefix(self, k, v, bias, prefix):
    """Keys/values with the prefixes in front; the bias lets every query see them."""
    a = self.args
    if prefix is None:
      shape, axes = (a.prefix_len, a.num_heads, a.head_dim), (None, "heads", "head_dim")
      init = P(nn.initializers.normal(a.initializer_range), axes)
      prefix = (self.param("prefix_key", init, shape, a.param_dtype),
                self.param("prefix_value", init, shape, a.param_dtype))
    b = k.shape[0]
    k, v = (jnp.concatenate([jnp.broadcast_to(p.astype(t.dtype), (b,) + p.shape), t], axis=1)
            for p, t in zip(prefix, (k, v)))
    bias = jnp.concatenate([jnp.zeros(bias.shape[:-1] + (a.prefix_len,), bias.dtype), bias], -1)
    return k, v, bias


class PrefixMlp(nn.Module):
  """Prefix tuning's reparameterisation (Li & Liang 2021): `embedding` (P, D) -> tanh MLP ->
  every layer's key and value prefixes (P, L, 2, H, Dh). `peft.merge` folds it into the direct
  `prefix_key`/`prefix_value` of each layer after training."""
  args: ModelArgs

  @nn.compact
  def __call__(self):
    a = self.args
    mk = functools.partial(Dense, n_in=1, std=a.initializer_range, dtype=a.dtype,
                           param_dtype=a.param_dtype)
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
    mk = functools.partial(Dense, n_in=1, dtype=a.dtype, param_dtype=a.param_dtype)
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


class Mlp(nn.Module):
  """Position-wise feed-forward: `mlp_in` (embed, mlp) -> activation -> `mlp_out` (mlp, embed)."""
  args: ModelArgs
  out_std: Optional[float] = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    a = self.args
    h = dense(a, a.mlp_dim, ("embed", "mlp"), ("mlp",), "mlp_in")(x, deterministic)  # (B, T, F)
    h = activation_fn(a.activation)(h)
    return dense(a, a.hidden_size, ("mlp", "embed"), ("embed",), "mlp_out", std=self.out_std)(
        h, deterministic)


class Block(nn.Module):
  """One transformer layer; post-LN (BERT) or pre-LN (GPT-2) residual arrangement.

  With `adapter_dim`, Houlsby adapters (`attention_adapter`, `mlp_adapter`) transform each
  sublayer's output before the residual sum.
  """
  args: ModelArgs
  pre_ln: bool = False
  out_std: Optional[float] = None

  @nn.compact
  def __call__(self, x, bias, deterministic: bool = True, output_attentions: bool = False,
               prefix=None):
    a = self.args
    attn = Attention(a, self.out_std, name="attention")
    mlp = Mlp(a, self.out_std, name="mlp")
    drop = lambda y: Dropout(a.dropout_rate)(y, deterministic=deterministic)
    adapt = lambda y, name: Adapter(a, name=name)(y) if a.adapter_dim else y
    ln1, ln2 = layer_norm(a, "attention_ln"), layer_norm(a, "mlp_ln")
    if self.pre_ln:
      h, probs = attn(ln1(x), bias, deterministic, output_attentions, prefix)
      x = x + adapt(drop(h), "attention_adapter")
      x = x + adapt(drop(mlp(ln2(x), deterministic)), "mlp_adapter")
    else:
      h, probs = attn(x, bias, deterministic, output_attentions, prefix)
      x = ln1(x + adapt(drop(h), "attention_adapter"))
      x = ln2(x + adapt(drop(mlp(x, deterministic)), "mlp_adapter"))
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
  prefixes = None
  if args.prefix_len and args.prefix_hidden:
    prefixes = PrefixMlp(args, name="prefix_mlp")()                     # (P, L, 2, H, Dh)
  hidden, attns = [x], []
  for i in range(args.num_layers):
    extra = () if prefixes is None else ((prefixes[:, i, 0], prefixes[:, i, 1]),)
    x, probs = cls(args, pre_ln, out_std, name=f"layer_{i}")(
        x, bias, deterministic, output_attentions, *extra)
    hidden.append(x)
    attns.append(probs)
  return x, tuple(hidden), (tuple(attns) if output_attentions else None)
