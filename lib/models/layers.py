"""Base transformer layers: Dense and its matmul seat, attention, MLP, embeddings, norms, blocks."""

import dataclasses
import functools
import re
from typing import Callable, NamedTuple, Optional

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
  # The matmul of each kernel (compression experiments: int8, masks), by parameter path:
  # ((regex over kernel paths, name in DOT_GENERALS), ...); first full match wins; no match (and
  # the empty default) is "default", the f32-accumulating matmul. E.g. ((".*", "int8"),).
  dot_general: tuple = ()
  # Attention heads kept in each layer after head pruning (lib/prune.py): () = num_heads in every
  # layer. head_dim stays hidden_size // num_heads; a layer's query/key/value/out kernels hold
  # only its kept heads.
  heads_per_layer: tuple = ()
  # FFN neurons kept in each layer after neuron pruning (lib/prune.py): () = mlp_dim in every
  # layer; a layer's mlp_in/mlp_out kernels hold only its kept neurons.
  mlp_per_layer: tuple = ()

  def __post_init__(self):
    # model.json stores `lora` as nested lists; keep it a hashable tuple of (str, LoraArgs|None).
    rules = tuple((str(rx), None if m is None else LoraArgs(*m)) for rx, m in self.lora)
    object.__setattr__(self, "lora", rules)
    object.__setattr__(self, "dot_general", _seat_rules(self.dot_general))
    object.__setattr__(self, "heads_per_layer", _heads_per_layer(self))
    object.__setattr__(self, "mlp_per_layer", _mlp_per_layer(self))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def layer_heads(self, layer: int) -> int:
    """The number of attention heads of layer `layer` (fewer than num_heads after pruning)."""
    return self.heads_per_layer[layer] if self.heads_per_layer else self.num_heads

  def layer_mlp(self, layer: int) -> int:
    """The FFN width of layer `layer` (below mlp_dim after neuron pruning)."""
    return self.mlp_per_layer[layer] if self.mlp_per_layer else self.mlp_dim


def _heads_per_layer(args) -> tuple:
  """ModelArgs.heads_per_layer as a tuple of ints; one per layer, each in [1, num_heads]."""
  heads = tuple(int(h) for h in args.heads_per_layer)
  if heads and (len(heads) != args.num_layers or not all(1 <= h <= args.num_heads for h in heads)):
    raise ValueError(f"ModelArgs.heads_per_layer: expected {args.num_layers} head counts in "
                     f"[1, {args.num_heads}] (or () for all heads); got {args.heads_per_layer!r}")
  if heads and args.prefix_len:
    raise ValueError("ModelArgs.heads_per_layer: prefix tuning (prefix_len) needs every head "
                     "in every layer")
  return heads


def _mlp_per_layer(args) -> tuple:
  """ModelArgs.mlp_per_layer as a tuple of ints; one per layer, each in [1, mlp_dim]."""
  widths = tuple(int(f) for f in args.mlp_per_layer)
  if widths and (len(widths) != args.num_layers
                 or not all(1 <= f <= args.mlp_dim for f in widths)):
    raise ValueError(f"ModelArgs.mlp_per_layer: expected {args.num_layers} FFN widths in "
                     f"[1, {args.mlp_dim}] (or () for mlp_dim everywhere); got "
                     f"{args.mlp_per_layer!r}")
  return widths


def activation_fn(name: str):
  """Returns the activation by its Hugging Face name."""
  fns = {"gelu": functools.partial(jax.nn.gelu, approximate=False),
         "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
         "relu": jax.nn.relu, "tanh": jnp.tanh}
  if name not in fns:
    raise ValueError(f"unknown activation {name!r}; valid: {sorted(fns)}")
  return fns[name]


def attention_bias(input_mask, segment_ids=None, causal=False):
  """Additive attention bias (B, 1, T, T): 0 where a query may attend to a key, else a large negative.

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


def _low_precision(dt) -> bool:
  return jnp.dtype(dt) in (jnp.bfloat16, jnp.float16)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dot_f32acc(x, kernel, n: int):
  """x (..., K1..Kn) . kernel (K1..Kn, F...) -> float32, as `dense_f32acc` without the bias."""
  return lax.dot_general(x, kernel, _contract_trailing(x, kernel, n),
                         preferred_element_type=jnp.float32)


def _dx_dk(x, kernel, g, n: int):
  """The backward dots of x . kernel for the cotangent g (in x's dtype), accumulated in float32."""
  lead = x.ndim - n                                                     # batch-like dims of x
  f32 = jnp.float32
  # (lead..., F...) . (K..., F...) over F -> (lead..., K...): already in x's dim order.
  dx = lax.dot_general(g, kernel, ((tuple(range(lead, g.ndim)), tuple(range(n, kernel.ndim))),
                                   ((), ())), preferred_element_type=f32)
  # x first, so the result is (K..., F...) in kernel order (XLA:CPU rejects the g-first form).
  dk = lax.dot_general(x, g, ((tuple(range(lead)), tuple(range(lead))), ((), ())),
                       preferred_element_type=f32)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _dense_fwd(x, kernel, bias, n):
  return dense_f32acc(x, kernel, bias, n), (x, kernel, bias)


def _dense_bwd(n, res, g):
  x, kernel, bias = res
  g = g.astype(x.dtype)
  db = jnp.sum(g.astype(jnp.float32), axis=tuple(range(x.ndim - n)))
  return (*_dx_dk(x, kernel, g, n), db.astype(bias.dtype))


def _dot_fwd(x, kernel, n):
  return dot_f32acc(x, kernel, n), (x, kernel)


def _dot_bwd(n, res, g):
  x, kernel = res
  return _dx_dk(x, kernel, g.astype(x.dtype), n)   # the float32 cotangent, in x's precision


dense_f32acc.defvjp(_dense_fwd, _dense_bwd)
dot_f32acc.defvjp(_dot_fwd, _dot_bwd)


# ------------------------------------------------------------------------ the Dense matmul seat
# A dot_general has lax.dot_general's signature: (lhs, rhs, dimension_numbers,
# preferred_element_type=None) -> product. Each kernel's is made by a factory from DOT_GENERALS,
# chosen by ModelArgs.dot_general rules over kernel paths. The factory is called inside the
# compact call of the module that owns the kernel (a Dense, or the classifier head), with that
# module: `module.path` names the kernel, and `module.variable(...)`/`module.param(...)` create
# what the matmul needs (a scale, a mask collection) beside it. The operands arrive in the compute
# dtype; a float32 `preferred_element_type` asks for float32 accumulation.
DotGeneral = Callable[..., jax.Array]


def default_dot_general(lhs, rhs, dimension_numbers, preferred_element_type=None):
  """lax.dot_general, except that a bf16/f16 contraction of lhs's trailing dims with rhs's leading
  dims into float32 (every Dense in low precision) goes through `dot_f32acc`."""
  n = len(dimension_numbers[0][0])
  if (_low_precision(lhs.dtype) and _low_precision(rhs.dtype)
      and preferred_element_type == jnp.float32
      and tuple(map(tuple, dimension_numbers[0])) == _contract_trailing(lhs, rhs, n)[0]
      and not any(dimension_numbers[1])):
    return dot_f32acc(lhs, rhs, n)
  return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=preferred_element_type)


DOT_GENERALS: dict = {"default": lambda module: default_dot_general}


def register_dot_general(name: str, factory: Callable[[nn.Module], DotGeneral]) -> None:
  """Adds `factory(module) -> dot_general` as `name`, for ModelArgs.dot_general rules to choose.

  Raises:
    ValueError: `name` is already registered (replacing a matmul silently would change results).
  """
  if name in DOT_GENERALS:
    raise ValueError(f"dot_general {name!r} is already registered; registered: "
                     f"{sorted(DOT_GENERALS)}")
  DOT_GENERALS[name] = factory


def _seat_rules(rules) -> tuple:
  """ModelArgs.dot_general as a hashable ((regex, name), ...); malformed rules raise."""
  want = "((regex over kernel paths, name in DOT_GENERALS), ...), e.g. (('.*', 'int8'),)"
  if isinstance(rules, str) or not all(isinstance(r, (tuple, list)) and len(r) == 2
                                       for r in rules):
    raise ValueError(f"ModelArgs.dot_general: expected {want}; got {rules!r}")
  for rx, _ in rules:
    try:
      re.compile(rx)
    except (re.error, TypeError) as e:
      raise ValueError(f"ModelArgs.dot_general: rule regex {rx!r} is not a regex ({e})") from e
  return tuple((str(rx), str(name)) for rx, name in rules)


@functools.lru_cache(maxsize=4096)
def dot_general_for(rules: tuple, path: str) -> str:
  """The DOT_GENERALS name of the first rule whose regex fully matches `path` ('default': none)."""
  return next((name for rx, name in rules if re.fullmatch(rx, path)), "default")


def check_dot_general_rules(rules: tuple, paths) -> None:
  """Raises ValueError if a ModelArgs.dot_general rule fully matches none of the kernel paths
  among `paths` ('/'-joined parameter paths): such a rule is a typo that would change nothing."""
  kernels = [p for p in paths if p.endswith("/kernel")]
  for rx, name in rules:
    if not any(re.fullmatch(rx, p) for p in kernels):
      raise ValueError(f"ModelArgs.dot_general rule ({rx!r}, {name!r}) matches no kernel; "
                       f"kernel paths look like {kernels[:3]}")


def seat(module: nn.Module, rules: tuple) -> DotGeneral:
  """The dot_general that `rules` choose for the kernel `<module path>/kernel`, made by its
  DOT_GENERALS factory (call inside `module`'s compact method).

  Raises:
    ValueError: the chosen name is not in DOT_GENERALS (the registered names listed).
  """
  path = "/".join(module.path) + "/kernel"
  name = dot_general_for(rules, path) if rules else "default"
  if name not in DOT_GENERALS:
    raise ValueError(f"{path}: ModelArgs.dot_general chooses {name!r}, which is not registered; "
                     f"registered: {sorted(DOT_GENERALS)}")
  return DOT_GENERALS[name](module)


def kernel_dot(module: nn.Module, rules: tuple, x, kernel, n: int, preferred_element_type=None):
  """x (..., K1..Kn) . kernel (K1..Kn, F...) with the `seat` of `module`'s kernel."""
  return seat(module, rules)(x, kernel, _contract_trailing(x, kernel, n),
                             preferred_element_type=preferred_element_type)


@functools.lru_cache(maxsize=4096)
def lora_for(rules: tuple, path: str) -> Optional[LoraArgs]:
  """The LoraArgs of the first rule whose regex fully matches `path` (None: no LoRA there)."""
  for rx, lora in rules:
    if re.fullmatch(rx, path):
      return lora
  return None


class Dense(nn.Module):
  """nn.DenseGeneral over the trailing `n_in` axes, with the same `kernel` (K..., F...) and `bias`
  (F...) params and init. The product goes through the dot_general that the `dot_general` rules
  choose for this kernel (its `seat`); the default, `default_dot_general`, is in bf16/f16
  `dense_f32acc` (float32 accumulation, the bias added before the one rounding).

  If a `lora` rule matches this module's kernel path, it adds the low-rank path
  (`peft_layers.low_rank`: alpha/rank * dropout(x) . lora_a . lora_b, parameters of this module).
  """
  features: tuple
  n_in: int
  kernel_axes: tuple
  bias_axes: tuple
  std: float
  dtype: str = "float32"
  param_dtype: str = "float32"
  lora: tuple = ()          # ModelArgs.lora rules
  dot_general: tuple = ()   # ModelArgs.dot_general rules

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    kernel = self.param("kernel", P(nn.initializers.normal(self.std), self.kernel_axes),
                        x.shape[x.ndim - self.n_in:] + self.features, self.param_dtype)
    bias = self.param("bias", P(nn.initializers.zeros, self.bias_axes), self.features,
                      self.param_dtype)
    dt = jnp.dtype(self.dtype)
    xc, kc = x.astype(dt), kernel.astype(dt)
    dot = seat(self, self.dot_general)
    if dot is default_dot_general and _low_precision(dt):
      y = dense_f32acc(xc, kc, bias, self.n_in)   # the bias joins the float32 accumulator
    else:
      acc = jnp.float32 if _low_precision(dt) else None
      y = dot(xc, kc, _contract_trailing(xc, kc, self.n_in), preferred_element_type=acc)
      y = (y + bias.astype(y.dtype)).astype(dt)                          # (..., F...)
    lora = lora_for(self.lora, "/".join(self.path) + "/kernel") if self.lora else None
    if lora is None:
      return y
    from lib.models import peft_layers   # builds on this module: imported where it is used
    return y + peft_layers.low_rank(self, x, lora, deterministic).astype(y.dtype)


def dense(args: ModelArgs, features, kernel_axes, bias_axes, name: str, axis=-1, std=None):
  """A `Dense` contracting `axis` (-1, or trailing axes like (-2, -1)) into `features`."""
  std = args.initializer_range if std is None else std
  axes = axis if isinstance(axis, (tuple, list)) else (axis,)
  if sorted(axes) != list(range(-len(axes), 0)):
    raise ValueError(f"dense {name!r}: axis must be trailing axes, got {axis}")
  feats = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  return Dense(feats, len(axes), tuple(kernel_axes), tuple(bias_axes), std, args.dtype,
               args.param_dtype, args.lora, args.dot_general, name=name)


def _fmix32(h):
  """murmur3's 32-bit finaliser: a bijection; every input bit flips ~half the output bits."""
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
  return seeded_dropout(x, rate, dropout_seed(rng))


def dropout_seed(rng):
  """The 64 key bits (uint32[2]) of `hash_dropout`'s mask for `rng`."""
  return jax.random.bits(rng, (2,), jnp.uint32)


def seeded_dropout(x, rate: float, seed):
  """`hash_dropout` with its key bits given: the same `seed` and shape give the same mask, so a
  custom backward can re-apply it (its transpose) to a cotangent without saving it."""
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
  """Multi-head self-attention: `query`, `key`, `value` (embed, heads, head_dim), `out` kernels.

  With `prefix_len` (prefix tuning) the keys and values are preceded by `prefix_key` and
  `prefix_value` (P, heads, head_dim): own parameters, or given by `PrefixMlp` as `prefix`.
  Every query may attend to them; the attention probabilities are then (B, H, T, P + T).
  `num_heads` (0: args.num_heads) is this layer's head count after head pruning.
  """
  args: ModelArgs
  out_std: Optional[float] = None
  num_heads: int = 0

  @nn.compact
  def __call__(self, x, bias, deterministic: bool, output_attentions: bool, prefix=None):
    a = self.args
    qkv = functools.partial(dense, a, (self.num_heads or a.num_heads, a.head_dim),
                            ("embed", "heads", "head_dim"),
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


class Mlp(nn.Module):
  """Position-wise feed-forward: `mlp_in` (embed, mlp) -> activation -> `mlp_out` (mlp, embed)."""
  args: ModelArgs
  out_std: Optional[float] = None
  width: int = 0            # FFN neurons (0: args.mlp_dim); fewer after neuron pruning

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    a = self.args
    f = self.width or a.mlp_dim
    h = dense(a, f, ("embed", "mlp"), ("mlp",), "mlp_in")(x, deterministic)  # (B, T, F)
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
  layer: int = 0            # its index: the head count of ModelArgs.layer_heads

  @nn.compact
  def __call__(self, x, bias, deterministic: bool = True, output_attentions: bool = False,
               prefix=None):
    a = self.args
    attn = Attention(a, self.out_std, a.layer_heads(self.layer), name="attention")
    mlp = Mlp(a, self.out_std, a.layer_mlp(self.layer), name="mlp")
    drop = lambda y: Dropout(a.dropout_rate)(y, deterministic=deterministic)
    if a.adapter_dim:   # peft_layers builds on this module: imported where it is used
      from lib.models import peft_layers
      adapt = lambda y, name: peft_layers.Adapter(a, name=name)(y)
    else:
      adapt = lambda y, name: y
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
  """The Block class, in nn.remat when asked (deterministic/output_attentions are static)."""
  if remat == "none":
    return Block
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; valid: ['none'] + {sorted(REMAT_POLICIES)}")
  # static_argnums count `self` as 0: (x=1, bias=2, deterministic=3, output_attentions=4).
  return nn.remat(Block, policy=REMAT_POLICIES[remat], static_argnums=(3, 4))


def run_layers(args: ModelArgs, x, bias, deterministic, output_attentions,
               pre_ln: bool, out_std=None):
  """Applies `layer_0..layer_{L-1}` (call inside a compact method).

  Returns:
    the output, the hidden states (input and each layer's output) and attentions (or None).
  """
  cls = block_class(args.remat)
  prefixes = None
  if args.prefix_len and args.prefix_hidden:
    from lib.models import peft_layers   # builds on this module: imported where it is used
    prefixes = peft_layers.PrefixMlp(args, name="prefix_mlp")()         # (P, L, 2, H, Dh)
  hidden, attns = [x], []
  for i in range(args.num_layers):
    extra = () if prefixes is None else ((prefixes[:, i, 0], prefixes[:, i, 1]),)
    x, probs = cls(args, pre_ln, out_std, i, name=f"layer_{i}")(
        x, bias, deterministic, output_attentions, *extra)
    hidden.append(x)
    attns.append(probs)
  return x, tuple(hidden), (tuple(attns) if output_attentions else None)
