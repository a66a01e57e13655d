"""Int8 PTQ (lib/quant.py): the int8 seats against NumPy int8 references, s8 dots in the HLO,
deterministic quantisation, the quantised model directory round trip, bad rules."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax import traverse_util

from lib import model_io, models
from lib import quant as compress
from lib.models import layers

IDS = jnp.array([[5, 6, 7, 8, 9, 3], [4, 5, 6, 7, 1, 1]])
MASK = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
BASE = dict(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=32)


def _np_quant(a, axis):
  """Independent NumPy symmetric int8: codes and scales over `axis` (kept)."""
  scale = np.abs(a).max(axis=axis, keepdims=True) / 127
  return np.round(a / scale).astype(np.int8), scale.astype(np.float32)


class _OneDense(nn.Module):
  """One Dense (32 -> 8) named 'd', so that its kernel path is 'd/kernel' as in a model."""
  args: models.ModelArgs

  @nn.compact
  def __call__(self, x):
    return layers.dense(self.args, 8, ("embed", "mlp"), ("mlp",), "d")(x)


def _dense_case(method):
  """A Dense (32 -> 8) with a float kernel, its int8 params, input x and the module."""
  args = models.ModelArgs(**BASE, dot_general=(("d/kernel", method),))
  module = _OneDense(args)
  x = np.asarray(jax.random.normal(jax.random.key(1), (4, 32)), np.float32)
  w = np.asarray(jax.random.normal(jax.random.key(2), (32, 8)), np.float32) * 0.1
  b = np.asarray(jax.random.normal(jax.random.key(3), (8,)), np.float32)
  params = compress.quantize_params({"d": {"kernel": w, "bias": b}}, args.dot_general)
  return module, params, x, w, b


def test_w8a8_dense_equals_numpy_int8_reference():
  module, params, x, w, b = _dense_case("int8_w8a8")
  got = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
  qx, sx = _np_quant(x, 1)                                    # per token
  qw, sw = _np_quant(w, 0)                                    # per output channel
  np.testing.assert_array_equal(params["d"]["kernel"], qw)
  np.testing.assert_allclose(params["d"]["kernel_scale"], sw[0], rtol=1e-7)
  acc = qx.astype(np.int32) @ qw.astype(np.int32)             # the exact integer part
  # The integer part of the seat's output is exactly NumPy's int32 product.
  np.testing.assert_array_equal(np.round((got - b) / (sx * sw)).astype(np.int32), acc)
  np.testing.assert_allclose(got, acc * sx * sw + b, rtol=1e-5, atol=1e-6)
  # |x.w - q(x).q(w)| <= sum_k |x||dw| + |dx||w| + |dx||dw|, |dx| <= sx/2, |dw| <= sw/2.
  bound = (np.abs(x) @ np.ones_like(w) * sw / 2 + sx / 2 * (np.ones_like(x) @ np.abs(w))
           + x.shape[1] * sx * sw / 4)
  err = np.abs(got - (x @ w + b))
  assert (err <= bound + 1e-6).all() and err.max() > 0


def test_weight_only_dense_is_the_float_matmul_of_dequantised_weights():
  module, params, x, w, b = _dense_case("int8_weight_only")
  got = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
  qw, sw = _np_quant(w, 0)
  np.testing.assert_allclose(got, x @ (qw * sw) + b, rtol=1e-5, atol=1e-6)
  assert np.abs(got - (x @ w + b)).max() <= (np.abs(x).sum(1).max() * sw.max() / 2)


def _model(method, **kw):
  args = models.ModelArgs(**{**BASE, **kw})
  module = models.build(args, "seq_cls", 3)
  params, _ = models.init_params(module, jax.random.key(0))
  rules = compress.default_rules(method)
  qargs = dataclasses.replace(args, dot_general=rules)
  return module, params, models.build(qargs, "seq_cls", 3), compress.quantize_params(params, rules)


def _logits(module, params):
  return module.apply({"params": params}, input_ids=IDS, input_mask=MASK)[0]["logits"]


def test_quantised_params_have_the_seated_models_tree_and_close_logits():
  module, params, qmodule, qparams = _model("int8_w8a8", num_layers=2)
  init, _ = models.init_params(qmodule, jax.random.key(0))
  shapes = lambda t: {p: v.shape for p, v in traverse_util.flatten_dict(t, sep="/").items()}
  assert shapes(qparams) == shapes(init)
  flat = traverse_util.flatten_dict(qparams, sep="/")
  assert sum(v.dtype == np.int8 for v in flat.values()) == 12      # 6 kernels per layer
  want, got = np.asarray(_logits(module, params)), np.asarray(_logits(qmodule, qparams))
  assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_jitted_quantised_model_runs_s8_dots():
  _, _, qmodule, qparams = _model("int8_w8a8", num_layers=2)
  lowered = jax.jit(lambda p: _logits(qmodule, p)).lower(qparams)
  assert compress.int8_dots(lowered.as_text()) == 12             # q, k, v, out, mlp_in, mlp_out
  assert compress.int8_dots(lowered.compile().as_text()) == 12   # XLA kept them integer
  _, _, wmodule, wparams = _model("int8_weight_only")
  assert compress.int8_dots(jax.jit(lambda p: _logits(wmodule, p)).lower(wparams).as_text()) == 0


def test_ptq_is_deterministic_and_uses_the_full_code_range():
  _, params, _, q1 = _model("int8_w8a8")
  q2 = compress.quantize_params(jax.tree.map(np.copy, params), compress.default_rules("int8_w8a8"))
  jax.tree.map(np.testing.assert_array_equal, q1, q2)
  k = q1["encoder"]["layer_0"]["attention"]["query"]["kernel"]        # (D, H, Dh)
  assert q1["encoder"]["layer_0"]["attention"]["query"]["kernel_scale"].shape == k.shape[1:]
  np.testing.assert_array_equal(np.abs(k.astype(np.int32)).max(axis=0), 127)


def test_quantised_model_dir_round_trips_with_int8_on_disk(tmp_path):
  _, _, qmodule, qparams = _model("int8_w8a8")
  out = str(tmp_path / "q")
  model_io.save_model_dir(out, qmodule.args, qparams, "seq_cls", 3, ["a", "b", "c"])
  with ocp.PyTreeCheckpointer() as ckptr:
    raw = ckptr.restore(os.path.join(out, model_io.PARAMS_DIR))
  assert raw["encoder"]["layer_0"]["mlp"]["mlp_in"]["kernel"].dtype == np.int8
  loaded = model_io.load_for_inference(out, data_dir="")
  assert loaded.args.dot_general == qmodule.args.dot_general
  params = compress.as_int8(loaded.params, loaded.args.dot_general)
  np.testing.assert_array_equal(_logits(loaded.module, params), _logits(qmodule, qparams))
  # Without the cast back the seat converts the integer-valued float codes: the same logits.
  np.testing.assert_array_equal(_logits(loaded.module, loaded.params), _logits(qmodule, qparams))


def test_bad_rules_and_methods_raise():
  _, params, _, _ = _model("int8_w8a8")
  with pytest.raises(ValueError, match="matches no kernel"):
    compress.quantize_params(params, ((r"encoder/layer_7/.*", "int8_w8a8"),))
  with pytest.raises(ValueError, match="unknown quantisation method 'int4'"):
    compress.default_rules("int4")


def test_static_dense_equals_numpy_int8_reference_and_clips():
  args = models.ModelArgs(**BASE, dot_general=(("d/kernel", "int8_static"),))
  module, (_, _, x, w, b) = _OneDense(args), _dense_case("int8_w8a8")
  absmax = {"d/kernel": float(np.abs(x[:2]).max())}      # calibrated on the first two rows
  params = compress.quantize_params({"d": {"kernel": w, "bias": b}}, args.dot_general,
                                    absmax=absmax)
  sx = np.float32(absmax["d/kernel"] / 127)
  assert params["d"]["input_scale"] == sx
  got = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
  qx = np.clip(np.round(x / sx), -127, 127).astype(np.int8)   # rows 3-4 may clip
  qw, sw = _np_quant(w, 0)
  acc = qx.astype(np.int32) @ qw.astype(np.int32)
  np.testing.assert_array_equal(np.round((got - b) / (sx * sw)).astype(np.int32), acc)
  np.testing.assert_allclose(got, acc * sx * sw + b, rtol=1e-5, atol=1e-6)


def test_calibration_is_the_max_input_and_deterministic():
  some = r"encoder/layer_0/(attention/.*|mlp/mlp_in/kernel)"
  args = models.ModelArgs(**BASE, dot_general=((some, "int8_calibrate"),))
  module = models.build(args, "seq_cls", 2)
  params, _ = models.init_params(module, jax.random.key(0))
  batches = [dict(input_ids=IDS, input_mask=MASK), dict(input_ids=IDS[:, ::-1], input_mask=MASK)]
  got = compress.calibrate(module, params, batches)
  assert sorted(got) == sorted(f"encoder/layer_0/{p}/kernel" for p in
                               ("attention/query", "attention/key", "attention/value",
                                "attention/out", "mlp/mlp_in"))
  # Reference: the query/key/value input is the embedding output, hidden_states[0] of the plain
  # model (padding positions included: the matmul sees them too).
  plain = models.build(dataclasses.replace(args, dot_general=()), "seq_cls", 2)
  want = max(float(np.abs(plain.apply({"params": params}, **b)[1]["hidden_states"][0]).max())
             for b in batches)
  for name in ("query", "key", "value"):
    assert got[f"encoder/layer_0/attention/{name}/kernel"] == pytest.approx(want, rel=1e-6)
  assert compress.calibrate(module, params, batches) == got          # deterministic
  q = compress.quantize_params(params, ((some, "int8_static"),), absmax=got)
  assert float(q["encoder"]["layer_0"]["attention"]["query"]["input_scale"]) == pytest.approx(
      want / 127, rel=1e-6)
  with pytest.raises(ValueError, match="calibrated"):
    compress.quantize_params(params, ((some, "int8_static"),), absmax={})


def test_fake_quant_seat_matches_w8a8_and_has_straight_through_gradients():
  _, qparams, x, w, b = _dense_case("int8_w8a8")
  real = _OneDense(models.ModelArgs(**BASE, dot_general=(("d/kernel", "int8_w8a8"),)))
  fake = _OneDense(models.ModelArgs(**BASE, dot_general=(("d/kernel", "int8_fake"),)))
  want = np.asarray(real.apply({"params": qparams}, jnp.asarray(x)))
  fparams = {"d": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
  got = np.asarray(fake.apply({"params": fparams}, jnp.asarray(x)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)     # same grid, float summation
  g = np.asarray(jax.random.normal(jax.random.key(4), got.shape), np.float32)
  grads = jax.grad(lambda p, xx: jnp.sum(fake.apply({"params": p}, xx) * g), argnums=(0, 1))(
      fparams, jnp.asarray(x))
  qx, sx = _np_quant(x, 1)
  qw, sw = _np_quant(w, 0)
  # Straight through: dL/dW = (dequantised x)^T g, dL/dx = g (dequantised W)^T.
  np.testing.assert_allclose(grads[0]["d"]["kernel"], (qx * sx).T @ g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[1], g @ (qw * sw).T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[0]["d"]["bias"], g.sum(0), rtol=1e-5)
