"""Int8 post-training quantisation: the int8 matmul seats (DOT_GENERALS) and quantised params.

A quantised model is an ordinary model whose `ModelArgs.dot_general` rules send some kernels to
an int8 seat. Such a kernel's parameters are its int8 codes in `kernel` (K..., F...) and one
float32 scale per output channel in `kernel_scale` (F...): the weight is `kernel * kernel_scale`,
symmetric, codes in [-127, 127]. `quantize_params` makes them from a float model; a model
directory saved from them (research/compress.py) stores the kernels as int8 on disk.

Seats (names in lib.models.layers.DOT_GENERALS):
  int8_w8a8         int8 weights and int8 activations quantised at run time, one scale per
                    token (the rows of the contraction): an s8 x s8 -> s32 dot_general, then
                    the int32 accumulator times both scales, in float32.
  int8_weight_only  the int8 weights times their scales in the compute dtype, then the default
                    (float) matmul: smaller weights, float numerics of the activations.
  int8_static       as int8_w8a8, but one activation scale per kernel, fixed by calibration:
                    its `input_scale` parameter, max |input| over a calibration set / 127 (inputs
                    beyond it clip). `calibrate` measures it with the `int8_calibrate` seat (the
                    float matmul, recording max |input| in the 'calibration' collection).
These are inference seats: they have no gradient with respect to the codes. For quantisation-aware
training (QAT) there is
  int8_fake         the float kernel and input quantised and dequantised (per output channel /
                    per token, as int8_w8a8) with straight-through gradients, then a float
                    matmul: the w8a8 numerics up to float32 summation order, trainable.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax import lax

from lib.models import layers

SCALE = "kernel_scale"
INPUT_SCALE = "input_scale"
ABSMAX = "input_absmax"
QMAX = 127.0
METHODS = ("int8_w8a8", "int8_weight_only", "int8_static")


def _codes_and_scale(module, rhs, n: int):
  """The kernel's int8 codes (as stored: int8, or integer-valued floats after a float restore)
  and its per-output-channel float32 scales, both parameters of `module`."""
  raw = nn.meta.unbox(module.get_variable("params", "kernel"))       # boxed while initialising
  raw = rhs if raw is None else raw
  codes = raw if raw.dtype == jnp.int8 else raw.astype(jnp.int8)   # exact: integer-valued
  return codes, module.param(SCALE, lambda _, s: jnp.ones(s, jnp.float32), rhs.shape[n:])


def _check_dense_dims(dims, rhs, where: str):
  """The seats take a Dense's contraction: lhs's trailing n dims with rhs's leading n, no batch."""
  (lc, rc), (lb, rb) = dims
  if lb or rb or tuple(rc) != tuple(range(len(rc))):
    raise ValueError(f"{where}: int8 seats take a Dense contraction (kernel's leading dims, no "
                     f"batch dims); got dimension_numbers {dims}")


def quantize_activations(x, n: int):
  """Per-row symmetric int8 of x (..., K1..Kn): (codes int8, scales float32 (..., 1..1))."""
  x = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - n, x.ndim))
  scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / QMAX
  scale = jnp.where(scale == 0, 1.0, scale)   # an all-zero row: any scale gives code 0
  return jnp.clip(jnp.round(x / scale), -QMAX, QMAX).astype(jnp.int8), scale


def int8_w8a8(module):
  """Seat factory: the s8 x s8 -> s32 matmul of dynamic per-token int8 activations and the
  kernel's int8 codes, rescaled to float (see the module docstring)."""
  where = "/".join(module.path) + "/kernel"

  def dot(lhs, rhs, dims, preferred_element_type=None):
    _check_dense_dims(dims, rhs, where)
    n = len(dims[0][0])
    codes, w_scale = _codes_and_scale(module, rhs, n)                 # (K.., F..), (F..)
    xq, x_scale = quantize_activations(lhs, n)                       # (.., K..), (.., 1..)
    acc = lax.dot_general(xq, codes, dims, preferred_element_type=jnp.int32)   # (.., F..)
    lead = lhs.shape[:lhs.ndim - n]
    x_scale = x_scale.reshape(lead + (1,) * w_scale.ndim)
    y = acc.astype(jnp.float32) * x_scale * w_scale
    return y.astype(preferred_element_type or lhs.dtype)
  return dot


def int8_weight_only(module):
  """Seat factory: the kernel's int8 codes times their scales in the compute dtype, then the
  default matmul."""
  where = "/".join(module.path) + "/kernel"

  def dot(lhs, rhs, dims, preferred_element_type=None):
    _check_dense_dims(dims, rhs, where)
    codes, w_scale = _codes_and_scale(module, rhs, len(dims[0][1]))
    w = codes.astype(lhs.dtype) * w_scale.astype(lhs.dtype)
    return layers.default_dot_general(lhs, w, dims, preferred_element_type)
  return dot


def int8_static(module):
  """Seat factory: int8_w8a8 with the calibrated per-kernel activation scale `input_scale`."""
  where = "/".join(module.path) + "/kernel"

  def dot(lhs, rhs, dims, preferred_element_type=None):
    _check_dense_dims(dims, rhs, where)
    n = len(dims[0][0])
    codes, w_scale = _codes_and_scale(module, rhs, n)                 # (K.., F..), (F..)
    x_scale = module.param(INPUT_SCALE, lambda _: jnp.ones((), jnp.float32))   # ()
    xq = jnp.clip(jnp.round(lhs.astype(jnp.float32) / x_scale), -QMAX, QMAX).astype(jnp.int8)
    acc = lax.dot_general(xq, codes, dims, preferred_element_type=jnp.int32)   # (.., F..)
    y = acc.astype(jnp.float32) * x_scale * w_scale
    return y.astype(preferred_element_type or lhs.dtype)
  return dot


def fake_quant(v, scale):
  """v rounded to the int8 grid of `scale` (clipped to +-127 steps), with the straight-through
  gradient: the identity."""
  q = jnp.clip(jnp.round(v / scale), -QMAX, QMAX) * scale
  return v + lax.stop_gradient(q - v)


def int8_fake(module):
  """Seat factory: QAT's fake-quantised matmul (see the module docstring); no extra parameters."""
  where = "/".join(module.path) + "/kernel"

  def dot(lhs, rhs, dims, preferred_element_type=None):
    _check_dense_dims(dims, rhs, where)
    n = len(dims[0][0])
    x, w = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    w_scale = jnp.max(jnp.abs(w), axis=tuple(range(n))) / QMAX               # (F..)
    x_scale = jnp.max(jnp.abs(x), axis=tuple(range(x.ndim - n, x.ndim)), keepdims=True) / QMAX
    w_scale, x_scale = (lax.stop_gradient(jnp.where(s == 0, 1.0, s)) for s in (w_scale, x_scale))
    y = lax.dot_general(fake_quant(x, x_scale), fake_quant(w, w_scale), dims,
                        preferred_element_type=jnp.float32)
    return y.astype(preferred_element_type or lhs.dtype)
  return dot


def int8_calibrate(module):
  """Seat factory: the default float matmul, keeping the running max |input| of this kernel in
  the 'calibration' collection (apply with mutable=['calibration'])."""
  def dot(lhs, rhs, dims, preferred_element_type=None):
    seen = module.variable("calibration", ABSMAX, lambda: jnp.zeros((), jnp.float32))
    if module.is_mutable_collection("calibration"):
      seen.value = jnp.maximum(seen.value, jnp.max(jnp.abs(lhs.astype(jnp.float32))))
    return layers.default_dot_general(lhs, rhs, dims, preferred_element_type)
  return dot


for _name, _factory in (("int8_w8a8", int8_w8a8), ("int8_weight_only", int8_weight_only),
                        ("int8_static", int8_static), ("int8_calibrate", int8_calibrate),
                        ("int8_fake", int8_fake)):
  if _name not in layers.DOT_GENERALS:   # a module reload must not register twice
    layers.register_dot_general(_name, _factory)


def quantize_kernel(kernel: np.ndarray, n_out: int):
  """Symmetric per-output-channel int8 of a float kernel (K..., F...) with `n_out` output dims.

  Returns:
    (codes int8 (K..., F...), scales float32 (F...)), kernel ~= codes * scales.
  """
  k = np.asarray(kernel, np.float32)
  axes = tuple(range(k.ndim - n_out))
  scale = np.abs(k).max(axis=axes) / QMAX
  scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
  codes = np.clip(np.round(k / scale), -QMAX, QMAX).astype(np.int8)
  return codes, scale


def default_rules(method: str, regex: str = r"encoder/layer_\d+/.*") -> tuple:
  """ModelArgs.dot_general rules sending the kernels that `regex` fully matches to `method`."""
  if method not in METHODS:
    raise ValueError(f"unknown quantisation method {method!r}; valid: {list(METHODS)}")
  return ((regex, method),)


def calibrate(module, params, batches) -> dict:
  """Max |input| of each kernel that `module`'s dot_general rules send to 'int8_calibrate', over
  `batches` (dicts of model inputs), with one jitted forward. Deterministic: a max over the
  same batches.

  Returns:
    {kernel path ('/'-joined): float max |input|}.
  """
  @jax.jit
  def step(cal, batch):
    variables = {"params": params, **({"calibration": cal} if cal else {})}
    _, mutated = module.apply(variables, **batch, mutable=["calibration"])
    return mutated["calibration"]
  cal = {}
  for batch in batches:
    cal = step(cal, batch)
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, cal), sep="/")
  return {p[:-len(ABSMAX)] + "kernel": float(v) for p, v in flat.items()}


def quantize_params(params, rules: tuple, n_out_of=None, absmax=None):
  """Post-training quantisation: each kernel that `rules` send to an int8 seat becomes its int8
  codes plus a `kernel_scale` beside it; everything else is unchanged (host numpy). Deterministic.

  Args:
    params: the float parameter tree.
    rules: ModelArgs.dot_general rules ((regex over kernel paths, seat name), ...).
    n_out_of: kernel path -> number of output dims (default: the bias's ndim beside it).
    absmax: {kernel path: max |input|} from `calibrate`, for the int8_static kernels (their
      `input_scale` is absmax / 127).

  Raises:
    ValueError: a rule matches no kernel (as the seat does for a model built with it), or an
      int8_static kernel has no calibration.
  """
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params), sep="/")
  layers.check_dot_general_rules(layers._seat_rules(rules), flat)
  out = dict(flat)
  for path, value in flat.items():
    if not path.endswith("/kernel") or layers.dot_general_for(rules, path) not in METHODS:
      continue
    bias = flat.get(path[:-len("kernel")] + "bias")
    n_out = n_out_of(path) if n_out_of else (1 if bias is None else bias.ndim)
    out[path], out[path[:-len("kernel")] + SCALE] = quantize_kernel(value, n_out)
    if layers.dot_general_for(rules, path) == "int8_static":
      if path not in (absmax or {}):
        raise ValueError(f"{path}: int8_static needs its calibrated max |input| (calibrate); "
                         f"calibrated kernels: {sorted(absmax or {})[:3]}...")
      out[path[:-len("kernel")] + INPUT_SCALE] = np.asarray(max(absmax[path], 1e-12) / QMAX,
                                                              np.float32)
  return traverse_util.unflatten_dict(out, sep="/")


def as_int8(params, rules: tuple):
  """`params` with the quantised kernels cast back to int8 (a restore into the float init tree
  gives integer-valued float32 codes); the seats then take them with no conversion."""
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {p: (np.asarray(v).astype(np.int8) if p.endswith("/kernel") and
             layers.dot_general_for(rules, p) in METHODS else v) for p, v in flat.items()}
  return traverse_util.unflatten_dict(out, sep="/")


def int8_dots(hlo_text: str) -> int:
  """How many dots of a jitted function's text multiply int8 by int8 into int32: StableHLO
  (`jit(f).lower(...).as_text()`) or XLA's optimised HLO (`...compile().as_text()`)."""
  stable = re.findall(r"dot_general.*: \(tensor<[^>]*xi8>, tensor<[^>]*xi8>\) -> "
                      r"tensor<[^>]*xi32>", hlo_text)
  compiled = re.findall(r"= s32\[[^\]]*\](\{[^}]*\})? dot\(", hlo_text)
  return len(stable) + len(compiled)
