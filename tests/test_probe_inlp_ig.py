"""lib/probe/inlp.py (no linear signal left; control rank) and attribution.py (IG completeness)."""

import jax
import jax.numpy as jnp
import numpy as np

from lib import models
from lib.probe import attribution, hooks, inlp, probes


def test_inlp_leaves_no_linearly_decodable_signal():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1500, 20)).astype(np.float32) * 2 + 1
  y = np.argmax((x - 1) @ rng.normal(size=(20, 3)), -1).astype(np.int32)   # ~balanced
  tr, ev = slice(0, 1000), slice(1000, None)
  res = inlp.inlp(x[tr], y[tr], x[ev], y[ev], 3, iterations=2, steps=400, lr=1e-2)
  assert res["majority"] < 0.5 and res["accuracy"][0] > 0.9   # decodable, not a majority
  assert res["final_accuracy"] < res["majority"] + 0.05, res
  p = res["P"]
  np.testing.assert_allclose(p @ p, p, atol=1e-5)        # an orthogonal projection
  np.testing.assert_allclose(p, p.T, atol=1e-6)
  assert 2 <= res["rank"] <= 6
  # Same rank, random directions: the property stays decodable.
  r = inlp.random_projection(20, res["rank"], seed=1)
  assert round(20 - np.trace(r)) == res["rank"]
  xt, xe = probes.standardize((x[tr] @ r)[None], (x[ev] @ r)[None])
  acc = probes.layer_accuracy(probes.train_layer_probes(xt, y[tr], 3, steps=400, lr=1e-2), xe,
                              y[ev])
  assert float(acc[0]) > res["final_accuracy"] + 0.1


def test_projection_edit_changes_only_its_layer():
  args = models.ModelArgs(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=16,
                          vocab_size=30)
  module = models.build(args)
  params, _ = models.init_params(module, jax.random.key(0))
  batch = {"input_ids": jnp.arange(1, 7)[None], "input_mask": jnp.ones((1, 6), jnp.int32)}
  zero = np.zeros((16, 16), np.float32)                  # project everything away at layer 1
  mean = np.full(16, 0.5, np.float32)
  _, acts = hooks.record(module, params, batch, inlp.projection_edit(1, zero, mean))
  _, ref = hooks.record(module, params, batch)
  np.testing.assert_allclose(acts["resid"][0], ref["resid"][0], atol=1e-6)
  np.testing.assert_allclose(acts["resid"][1], 0.5, atol=1e-6)


def test_integrated_gradients_exact_for_linear_and_complete_for_a_model():
  w = jnp.arange(12.0).reshape(3, 4)
  x, b = jnp.ones((3, 4)) * 2, jnp.ones((3, 4)) * 0.5
  attr, total, err = attribution.integrated_gradients(lambda e: jnp.sum(jnp.tanh(0) + e * w),
                                                      x, b, steps=4)
  np.testing.assert_allclose(attr, ((x - b) * w).sum(-1), rtol=1e-6)
  assert abs(total - float(((x - b) * w).sum())) < 1e-4 and err < 1e-6
  args = models.ModelArgs(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=16,
                          vocab_size=30, initializer_range=0.2, dropout_rate=0.0,
                          attention_dropout_rate=0.0)
  module = models.build(args, "seq_cls", num_labels=2)
  params, _ = models.init_params(module, jax.random.key(3))
  batch = {"input_ids": jnp.arange(1, 7)[None], "input_mask": jnp.ones((1, 6), jnp.int32)}
  fn, emb = attribution.embedding_fn(module, params, batch, lambda o: o["logits"][0, 1])
  out, _ = module.apply({"params": params}, batch["input_ids"], batch["input_mask"])
  np.testing.assert_allclose(fn(emb), out["logits"][0, 1], atol=1e-5)   # the model's own logit
  attr, total, err = attribution.integrated_gradients(fn, emb, jnp.zeros_like(emb), steps=32)
  assert attr.shape == (6,) and abs(total) > 1e-3
  assert err < 0.01, (err, total)


def test_inlp_stops_once_the_property_is_at_the_majority_baseline():
  """Labels independent of the features: the first probe is already at the baseline, so nothing
  is removed (rank 0) however many iterations are allowed."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(600, 12)).astype(np.float32)
  y = (rng.random(600) < 0.8).astype(np.int32)           # 80% majority, no signal
  res = inlp.inlp(x[:400], y[:400], x[400:], y[400:], 2, iterations=8, steps=200, lr=1e-2,
                  stop_margin=0.03)
  assert len(res["accuracy"]) == 1 and res["rank"] == 0, res
  np.testing.assert_allclose(res["P"], np.eye(12), atol=1e-6)
