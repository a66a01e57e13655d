"""The Dense matmul seat (ModelArgs.dot_general, DOT_GENERALS): every kernel goes through it, rules
pick kernels, a seat can own variables (a mask) and change the numerics (int8 fake quantisation)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax import lax

from lib import models
from lib.models import layers

IDS = jnp.array([[5, 6, 7, 8, 9, 3], [4, 5, 6, 7, 1, 1]])
MASK = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _args(**kw):
  base = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, max_len=32)
  return models.ModelArgs(**{**base, **kw})


def _kernel_paths(params) -> set:
  return {p for p in traverse_util.flatten_dict(params, sep="/") if p.endswith("/kernel")}


@pytest.fixture
def seat():
  """register(name, factory) for this test only: the registry is restored afterwards."""
  added = []

  def register(name, factory):
    layers.register_dot_general(name, factory)
    added.append(name)

  yield register
  for name in added:
    del layers.DOT_GENERALS[name]


def _counting(seen: list):
  """A factory whose dot_general records the kernel path it serves and defers to the default."""
  def factory(module):
    def dot(lhs, rhs, dims, preferred_element_type=None):
      seen.append("/".join(module.path) + "/kernel")
      return layers.default_dot_general(lhs, rhs, dims, preferred_element_type)
    return dot
  return factory


def _forward(args, head, params=None, variables=None):
  module = models.build(args, head, 3)
  if params is None:
    params, _ = models.init_params(module, jax.random.key(0))
  out, _ = module.apply({"params": params, **(variables or {})}, input_ids=IDS, input_mask=MASK)
  return out["logits"], params


@pytest.mark.parametrize("arch,head,extra", [
    ("bert", "seq_cls", {}), ("bert", "mlm", {}), ("gpt2", "token_cls", {}),
    ("bert", "token_cls", dict(adapter_dim=4, prefix_len=2, prefix_hidden=8))])
def test_every_kernel_goes_through_the_seat_and_default_is_unchanged(seat, arch, head, extra):
  seen = []
  seat("count", _counting(seen))
  want, params = _forward(_args(arch=arch, **extra), head)
  got, _ = _forward(_args(arch=arch, dot_general=((".*", "count"),), **extra), head, params)
  # Every kernel of the parameter tree (Denses in attention, MLP, adapters, prefix MLP, pooler,
  # heads, classifier) is multiplied by the seat, once per forward pass.
  assert sorted(seen) == sorted(_kernel_paths(params))
  np.testing.assert_array_equal(got, want)   # a seat that defers to the default changes nothing


def test_rules_choose_kernels_first_match_wins(seat):
  seen = []
  seat("count", _counting(seen))
  rules = ((".*/layer_1/.*", "default"), (".*/attention/(query|key)/kernel", "count"))
  _, params = _forward(_args(), "seq_cls")
  _forward(_args(dot_general=rules), "seq_cls", params)
  assert sorted(seen) == ["encoder/layer_0/attention/key/kernel",
                          "encoder/layer_0/attention/query/kernel"]


def _masking(module):
  """Multiplies the kernel by a 'masks' collection variable that lives beside it (ones at init)."""
  def dot(lhs, rhs, dims, preferred_element_type=None):
    mask = module.variable("masks", "kernel", jnp.ones, rhs.shape, rhs.dtype)
    return layers.default_dot_general(lhs, rhs * mask.value, dims, preferred_element_type)
  return dot


def test_mask_seat_equals_zeroed_kernels(seat):
  seat("mask", _masking)
  module = models.build(_args(dot_general=((".*/mlp/.*|classifier/kernel", "mask"),)), "seq_cls", 3)
  variables = nn.meta.unbox(module.init({"params": jax.random.key(0),
                                         "dropout": jax.random.key(0)}, IDS))
  masks = traverse_util.flatten_dict(variables["masks"], sep="/")
  assert sorted(masks) == sorted(p for p in _kernel_paths(variables["params"])
                                 if "/mlp/" in p or p == "classifier/kernel")
  rng = np.random.default_rng(0)
  masks = {p: (rng.random(m.shape) < 0.5).astype(np.float32) for p, m in masks.items()}
  got, _ = module.apply({"params": variables["params"],
                         "masks": traverse_util.unflatten_dict(masks, sep="/")},
                        input_ids=IDS, input_mask=MASK)
  # Reference: the default model with those kernels zeroed where the mask is 0.
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  zeroed = {p: v * masks[p] if p in masks else v for p, v in flat.items()}
  want, _ = _forward(_args(), "seq_cls", traverse_util.unflatten_dict(zeroed, sep="/"))
  np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(want, _forward(_args(), "seq_cls", variables["params"])[0], atol=1e-4)


def _quantize(a, axis):
  """Symmetric int8: (integers in [-127, 127] as float32, scale), one scale per slice of `axis`."""
  scale = jnp.max(jnp.abs(a), axis=axis, keepdims=True) / 127.0
  scale = jnp.where(scale == 0, 1.0, scale)
  return jnp.round(a / scale), scale


def int8_fake_quant(module):
  """W8A8 fake quantisation: per-output-channel kernel scales, per-row activation scales; the
  integer products are exact in float32 while K * 127^2 < 2^24."""
  del module

  def dot(lhs, rhs, dims, preferred_element_type=None):
    (lc, rc), _ = dims                  # a Dense: lhs's trailing n dims . rhs's leading n dims
    lead, feats = lhs.shape[:lhs.ndim - len(lc)], rhs.shape[len(rc):]
    qx, sx = _quantize(lhs.astype(jnp.float32), lc)                     # (..., K), (..., 1)
    qw, sw = _quantize(rhs.astype(jnp.float32), rc)                     # (K, F...), (1, F...)
    y = lax.dot_general(qx, qw, dims)                                   # (..., F...) integers
    y = y * sx.reshape(lead + (1,) * len(feats)) * sw.reshape(feats)
    return y.astype(preferred_element_type or lhs.dtype)
  return dot


def test_int8_dense_matches_numpy_reference_within_hand_bound():
  x = np.asarray(jax.random.normal(jax.random.key(1), (4, 32)), np.float32)
  w = np.asarray(jax.random.normal(jax.random.key(2), (32, 8)), np.float32) * 0.1
  got = np.asarray(int8_fake_quant(None)(jnp.asarray(x), jnp.asarray(w), (((1,), (0,)), ((), ()))))
  # NumPy reference: int8 codes, an int32 matmul, then the two scales.
  sx = np.abs(x).max(1, keepdims=True) / 127
  sw = np.abs(w).max(0, keepdims=True) / 127
  qx, qw = np.round(x / sx).astype(np.int8), np.round(w / sw).astype(np.int8)
  ref = (qx.astype(np.int32) @ qw.astype(np.int32)) * sx * sw
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  # |x.w - q(x).q(w)| <= sum_k |x||dw| + |dx||w| + |dx||dw|, with |dx| <= sx/2, |dw| <= sw/2.
  bound = (np.abs(x) @ np.ones_like(w) * sw / 2 + sx / 2 * (np.ones_like(x) @ np.abs(w))
           + x.shape[1] * sx * sw / 4)
  err = np.abs(got - x @ w)
  assert (err <= bound).all() and err.max() > 0


def test_int8_seat_changes_logits_by_a_bounded_amount(seat):
  seat("int8", int8_fake_quant)
  want, params = _forward(_args(), "token_cls")
  got, _ = _forward(_args(dot_general=((".*", "int8"),)), "token_cls", params)
  diff = np.abs(np.asarray(got) - np.asarray(want))
  assert diff.max() > 0                                     # the int8 seat is really used
  assert diff.max() < 0.05 * np.abs(np.asarray(want)).max()   # 8 bits: about 1% per matmul


def test_unknown_name_and_rule_matching_nothing_raise(seat):
  with pytest.raises(ValueError, match="'int4'.*not registered.*'default'"):
    _forward(_args(dot_general=((".*", "int4"),)), "seq_cls")
  with pytest.raises(ValueError, match="matches no kernel"):
    _forward(_args(dot_general=((".*/querry/kernel", "default"),)), "seq_cls")
  with pytest.raises(ValueError, match="expected"):
    _args(dot_general="int8")
  seat("twice", _counting([]))
  with pytest.raises(ValueError, match="already registered"):
    layers.register_dot_general("twice", _counting([]))


def test_rules_survive_model_json():
  args = _args(dot_general=((".*/mlp/.*", "int8"), (".*", "default")))
  back = models.ModelArgs(**json.loads(json.dumps(dataclasses.asdict(args))))
  assert back == args and hash(back) == hash(args)


def test_bf16_default_seat_is_the_fused_f32acc_dense():
  """In bf16 the default seat is `dense_f32acc`: bf16 operands, a float32 accumulator that the
  float32 bias joins, one rounding to bf16."""
  args = _args(dtype="bfloat16")
  x = jax.random.normal(jax.random.key(3), (2, 5, 32))
  module = layers.dense(args, 8, ("embed", "mlp"), ("mlp",), "d")
  params = nn.meta.unbox(module.init(jax.random.key(4), x))["params"]
  params["bias"] = jax.random.normal(jax.random.key(5), (8,))
  bf = lambda a: a.astype(jnp.bfloat16)
  want = (lax.dot_general(bf(x), bf(params["kernel"]), (((2,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32) + params["bias"]).astype(jnp.bfloat16)
  np.testing.assert_array_equal(module.apply({"params": params}, x), want)
