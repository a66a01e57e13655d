"""LoRA's low-rank product (lib/models/peft_layers.low_rank_product): its hand-written backward
against autodiff of the plain formula, in float32 and bfloat16, with and without dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.models import layers, peft_layers

SEED = jnp.array([123, 456], jnp.uint32)


def _reference(x, a, b, n, scale, rate):
  """scale * dropout(x) . a . b by tensordot, float32, differentiated by jax."""
  xd = layers.seeded_dropout(x, rate, SEED) if rate > 0 else x
  return jnp.tensordot(jnp.tensordot(xd, a, n), b, 1) * scale


def _case(x_shape, n, f_shape, rank=3):
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], x_shape)
  a = jax.random.normal(k[1], x_shape[len(x_shape) - n:] + (rank,))
  b = jax.random.normal(k[2], (rank,) + f_shape)
  w = jax.random.normal(k[3], x_shape[:len(x_shape) - n] + f_shape)   # a random cotangent
  return x, a, b, w


SHAPES = [((2, 5, 6), 1, (7,)),          # (B, T, D) -> (B, T, F)
          ((2, 5, 3, 4), 2, (6,)),       # attention out: (B, T, H, Dh) -> (B, T, D)
          ((2, 5, 6), 1, (3, 4))]        # query: (B, T, D) -> (B, T, H, Dh)


@pytest.mark.parametrize("rate", [0.0, 0.3])
@pytest.mark.parametrize("x_shape,n,f_shape", SHAPES)
def test_low_rank_gradients_equal_autodiff_of_the_formula(x_shape, n, f_shape, rate):
  x, a, b, w = _case(x_shape, n, f_shape)
  loss = lambda fn: lambda x, a, b: jnp.sum(fn(x, a, b) * w)
  ours = lambda x, a, b: peft_layers.low_rank_product(x, a, b, SEED, n, 2.0, rate)
  ref = lambda x, a, b: _reference(x, a, b, n, 2.0, rate)
  v1, g1 = jax.value_and_grad(loss(ours), (0, 1, 2))(x, a, b)
  v2, g2 = jax.value_and_grad(loss(ref), (0, 1, 2))(x, a, b)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for name, got, want in zip("x a b".split(), g1, g2):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
  if rate:   # the mask is really applied: dropped inputs get no gradient
    dropped = layers.seeded_dropout(jnp.ones_like(x), rate, SEED) == 0
    assert 0 < dropped.mean() < 0.6 and np.all(np.asarray(g1[0])[np.asarray(dropped)] == 0)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_low_rank_bf16_gradients_near_float32(rate):
  """bf16 operands with float32 accumulation: within bf16's rounding of the float32 result."""
  x, a, b, w = _case((4, 8, 16), 1, (24,), rank=4)
  bf = lambda t: t.astype(jnp.bfloat16)
  ours = lambda x, a, b: jnp.sum(peft_layers.low_rank_product(
      bf(x), a, b, SEED, 1, 2.0, rate).astype(jnp.float32) * w)
  ref = lambda x, a, b: jnp.sum(_reference(x, a, b, 1, 2.0, rate) * w)
  got = jax.grad(ours, (0, 1, 2))(x, a, b)
  want = jax.grad(ref, (0, 1, 2))(x, a, b)
  assert got[1].dtype == got[2].dtype == jnp.float32   # the factors' (param) dtype
  for name, g, r in zip("x a b".split(), got, want):
    err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
    assert err < 3e-2, (name, err)


def test_lora_on_every_kernel_trains_in_bf16_under_jit_close_to_float32():
  """The jitted gradient of a bf16 model with LoRA (and its dropout) on every kernel runs
  (XLA:CPU has no bf16 x bf16 -> f32 DotThunk: a backward product in a layout YNN does not take
  fails at run time) and is near the float32 model's on the same parameters."""
  import dataclasses
  from lib import models, peft
  from training_helpers import make_loss_fn, synthetic_batch, tiny_args
  rules = [["classifier/.*", "train"], [".*/kernel", "lora(rank=4, alpha=8, dropout=0.1)"],
           [".*", "freeze"]]
  base = models.build(tiny_args(), "seq_cls", 2)
  params = models.init_params(base, jax.random.key(0))[0]
  spec = peft.parse_spec(rules)
  grads = {}
  for dtype in ("float32", "bfloat16"):
    args = peft.configure(dataclasses.replace(tiny_args(), dtype=dtype), spec)
    module = models.build(args, "seq_cls", 2)
    full = peft.add_params(params, module, jax.random.key(1))
    flat = peft.flatten_paths(full)   # lora_b nonzero (not constant: LayerNorm removes that)
    noise = np.random.default_rng(3)
    flat = {p: v + 0.05 * noise.standard_normal(v.shape).astype(np.float32)
            if p.endswith("lora_b") else v for p, v in sorted(flat.items())}
    full = peft.unflatten_paths(flat)
    labels = peft.label_params(full, rules, log=False)
    trainable, frozen = peft.split_trainable(full, labels)
    loss = make_loss_fn(module)
    fn = jax.jit(jax.grad(lambda t: loss(peft.merge_trainable(t, frozen), synthetic_batch(0),
                                         jax.random.key(2), True)[0]))
    grads[dtype] = peft.flatten_paths(jax.tree.map(np.asarray, fn(trainable)))
  lora = [p for p in grads["float32"] if "/lora_" in p]
  assert len(lora) == 2 * 7   # query, key, value, out, mlp_in, mlp_out, pooler
  for p in lora:
    want, got = grads["float32"][p], grads["bfloat16"][p]
    assert np.abs(want).max() > 0, p
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max(), err_msg=p)
