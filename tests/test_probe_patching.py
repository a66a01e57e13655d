"""lib/probe/patching.py and hooks.py: exact grids (prefix reuse == naive), controls,
attribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib import models
from lib.probe import hooks, patching


def _model(arch):
  args = models.ModelArgs(arch=arch, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                          max_len=32, vocab_size=40, dropout_rate=0.0, initializer_range=0.3,
                          attention_dropout_rate=0.0,
                          activation="gelu" if arch == "bert" else "gelu_new",
                          layer_norm_eps=1e-12 if arch == "bert" else 1e-5)
  module = models.build(args, "lm" if arch == "gpt2" else "token_cls", num_labels=5)
  params, _ = models.init_params(module, jax.random.key(1))
  return module, params


def _score(outputs, rows):
  """Probability of rows' target at its position (log-softmax of the head's logits)."""
  logp = jax.nn.log_softmax(outputs["logits"], -1)                       # (R, T, V)
  at = jnp.take_along_axis(logp, rows["target_pos"][:, None, None], 1)[:, 0]
  return jnp.exp(jnp.take_along_axis(at, rows["target"][:, None], 1)[:, 0])


def _data(n=3, t=6, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 40, (n, t)).astype(np.int32)
  mask = np.ones((n, t), np.int32)
  mask[0, -2:] = 0                                       # one padded row
  last = mask.sum(1) - 1
  batch = dict(input_ids=ids, input_mask=mask, target_pos=last.astype(np.int32),
               target=rng.integers(0, 5, n).astype(np.int32))
  subject = np.zeros((n, t), np.int32)
  subject[:, 1:3] = 1
  return jax.tree_util.tree_map(jnp.asarray, batch), subject


def _setup(arch, scale=3.0):
  module, params = _model(arch)
  batch, subject = _data()
  noise = patching.embedding_noise(jax.random.key(2), subject, 32, 0.3, scale)
  return patching.Patcher(module, params, _score), batch, noise


def _all_masks(p, r, t, value):
  L = p.num_layers
  return {"resid": jnp.full((r, L + 1, t), value), "attn": jnp.full((r, L, t), value),
          "mlp": jnp.full((r, L, t), value)}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_clean_everywhere_is_clean_and_nothing_is_corrupted(arch):
  p, batch, noise = _setup(arch)
  clean, clean_acts = p.record(batch)
  corrupt, _ = p.record(batch, noise)
  assert float(jnp.max(jnp.abs(clean - corrupt))) > 1e-4      # the corruption does something
  n, t = batch["input_ids"].shape
  everywhere = p.patch(batch, noise, clean_acts, _all_masks(p, n, t, True))
  nothing = p.patch(batch, noise, clean_acts, _all_masks(p, n, t, False))
  np.testing.assert_allclose(everywhere, clean, atol=1e-6)
  np.testing.assert_allclose(nothing, corrupt, atol=1e-6)
  # Independently of the model's own outputs: the recorded last state is the model's.
  _, inter = p.module.apply({"params": p.params}, batch["input_ids"], batch["input_mask"])
  np.testing.assert_allclose(clean_acts["resid"][0], inter["hidden_states"][0], atol=1e-6)


@pytest.mark.parametrize("arch,window", [("bert", 1), ("gpt2", 3)])
def test_prefix_reuse_grid_equals_naive_grid(arch, window):
  p, batch, noise = _setup(arch)
  fast = p.grid(batch, batch, noise, window=window, chunk=2)    # 3 examples: a padded chunk
  slow = p.naive_grid(batch, batch, noise, window=window)
  for k in patching.KINDS:
    assert np.array_equal(np.isnan(fast[k]), np.isnan(slow[k]))
    np.testing.assert_allclose(fast[k], slow[k], atol=1e-6, equal_nan=True)
  assert np.isnan(fast["resid"][0, :, -2:]).all()              # padding positions
  if arch == "gpt2":   # the final state at the target position decides the score alone
    last = np.asarray(batch["target_pos"])
    np.testing.assert_allclose(fast["resid"][np.arange(3), p.num_layers, last], fast["clean"],
                               atol=1e-6)


def test_paired_corruption_and_window_layers():
  p, batch, _ = _setup("gpt2")
  corrupt = dict(batch, input_ids=batch["input_ids"].at[:, 1].set(7))
  g = p.grid(batch, corrupt)
  # Before the changed position a causal model's states are the clean ones: no effect there.
  np.testing.assert_allclose(g["resid"][:, :, 0], g["corrupt"][:, None].repeat(3, 1), atol=1e-6)
  assert list(patching.window_layers(0, 10, 6)) == [0, 1, 2, 3, 4]
  assert list(patching.window_layers(5, 10, 12)) == list(range(0, 10))
  assert list(patching.window_layers(3, 1, 6)) == [3]


def test_attribution_matches_exact_for_a_small_corruption():
  p, batch, noise = _setup("bert", scale=0.01)   # first order is exact in the limit
  exact = p.grid(batch, batch, noise)
  est = p.attribution(batch, batch, noise)
  for k in patching.KINDS:
    effect = exact[k] - exact["corrupt"][:, None, None]
    ok = np.isfinite(effect)
    scale = np.abs(effect[ok]).max()
    assert scale > 0
    np.testing.assert_allclose(est[k][ok], effect[ok], atol=0.05 * scale)
  assert patching.spearman(exact, est)["all"] > 0.9


def test_hooks_reject_a_start_without_state_and_nonlayer_modules():
  with pytest.raises(ValueError, match="start_state"):
    hooks.interceptor(start=1)


def test_compare_grids_times_both_and_finds_them_equal():
  p, batch, noise = _setup("gpt2")
  out = patching.compare_grids(p, batch, noise, window=1, n=1)
  assert out["examples"] == 1 and out["cells"] == (3 + 2 + 2) * 6
  assert out["per_cell_s"] > 0 and out["prefix_reuse_s"] > 0
  # The difference it reports is the one between the two grids computed separately here.
  one = {k: v[:1] for k, v in batch.items()}
  naive, fast = p.naive_grid(one, one, noise[:1], 1), p.grid(one, one, noise[:1], 1, chunk=1)
  want = max(float(np.nanmax(np.abs(naive[k] - fast[k]))) for k in patching.KINDS)
  assert out["max_abs_diff"] < 1e-6 and abs(out["max_abs_diff"] - want) < 1e-7
