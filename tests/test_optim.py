"""Optax chains (lib/optim.py) against a hand-written numpy AdamW, schedules by formula, accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lib import optim, peft
from training_helpers import optim_config


def _params():
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                    "bias": rng.normal(size=(4,)).astype(np.float32)},
          "ln": {"scale": rng.normal(size=(4,)).astype(np.float32)},
          "word": {"embedding": rng.normal(size=(5, 3)).astype(np.float32)},
          "base": {"kernel": rng.normal(size=(2, 2)).astype(np.float32)}}


RULES = [("base/.*", peft.FREEZE), ("word/.*", "emb"), (".*", "train")]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_matches_formula(schedule):
  cfg = optim_config(lr=0.1, warmup_steps=4, schedule=schedule)
  sched = optim.make_schedule(cfg, 20)
  for t in [0, 1, 3, 4, 5, 12, 19, 20]:
    if t < 4:
      want = 0.1 * t / 4
    elif schedule == "linear":
      want = 0.1 * (1 - (t - 4) / 16)
    elif schedule == "cosine":
      want = 0.1 * 0.5 * (1 + math.cos(math.pi * (t - 4) / 16))
    else:
      want = 0.1
    assert float(sched(t)) == pytest.approx(want, rel=1e-6, abs=1e-7), t  # float32


def test_warmup_frac_and_conflicts():
  assert optim.warmup_steps(optim_config(warmup_steps=0, warmup_frac=0.1), 200) == 20
  with pytest.raises(ValueError, match="not both"):
    optim.warmup_steps(optim_config(warmup_steps=3, warmup_frac=0.1), 200)
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(optim_config(schedule="step"), 10)


def test_decay_mask_excludes_bias_scale_and_embeddings_unless_asked():
  p = _params()
  m = optim.decay_mask_fn(False)(p)
  assert m["dense"] == {"kernel": True, "bias": False} and m["ln"]["scale"] is False
  assert m["word"]["embedding"] is False and m["base"]["kernel"] is True
  assert optim.decay_mask_fn(True)(p)["word"]["embedding"] is True


def _reference_adamw(params, grads_seq, labels, cfg, num_steps, mults):
  """Numpy AdamW with global-norm clipping, per-label lr multipliers, frozen labels skipped."""
  sched = optim.make_schedule(cfg, num_steps)
  flat_p, flat_l = peft.flatten_paths(params), peft.flatten_paths(labels)
  p = {k: v.astype(np.float64) for k, v in flat_p.items()}
  m = {k: 0.0 for k in p}
  v = {k: 0.0 for k in p}
  live = [k for k in p if flat_l[k] != peft.FREEZE]
  for t, grads in enumerate(grads_seq):
    g = {k: peft.flatten_paths(grads)[k].astype(np.float64) for k in live}
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
    scale = 1.0 if norm < cfg.clip_norm else cfg.clip_norm / norm
    lr = float(sched(t))
    for k in live:
      gk = g[k] * scale
      m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * gk
      v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * gk ** 2
      mhat, vhat = m[k] / (1 - cfg.b1 ** (t + 1)), v[k] / (1 - cfg.b2 ** (t + 1))
      name = k.rsplit("/", 1)[-1]
      wd = cfg.weight_decay if name not in ("bias", "scale", "embedding") else 0.0
      p[k] = p[k] - lr * mults.get(flat_l[k], 1.0) * (mhat / (np.sqrt(vhat) + cfg.eps) + wd * p[k])
  return p


@pytest.mark.parametrize("view", ["full", "trainable"])
def test_make_optimizer_matches_numpy_adamw(view):
  cfg = optim_config(lr=0.05, warmup_steps=2, clip_norm=0.5, weight_decay=0.1, lr_mult={"emb": 3.0})
  params = _params()
  labels = peft.label_params(params, RULES, log=False)
  tx, _ = optim.make_optimizer(cfg, labels, num_steps=10)
  rng = np.random.default_rng(1)
  grads_seq = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
               for _ in range(4)]
  p = jax.tree.map(jnp.asarray, params)
  if view == "trainable":
    p, frozen = peft.split_trainable(p, labels)
  state = tx.init(p)
  for g in grads_seq:
    if view == "trainable":
      g = peft.split_trainable(g, labels)[0]
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  if view == "trainable":
    p = peft.merge_trainable(p, frozen)
  want = _reference_adamw(params, grads_seq, labels, cfg, 10, {"emb": 3.0})
  for k, x in peft.flatten_paths(p).items():
    # float32 vs float64: 1e-5 is ~1e-4 of one step (lr * mult = 0.15).
    np.testing.assert_allclose(np.asarray(x), want[k], rtol=1e-5, atol=1e-5, err_msg=k)
  np.testing.assert_array_equal(np.asarray(p["base"]["kernel"]), params["base"]["kernel"])


def test_frozen_parameters_hold_no_optimizer_state():
  params = _params()
  labels = peft.label_params(params, RULES, log=False)
  tx, _ = optim.make_optimizer(optim_config(), labels, 10)
  state_paths = list(peft.flatten_paths(tx.init(params)))
  assert not [p for p in state_paths if "base/kernel" in p]
  # Adam's mu and nu for each of the 4 trainable tensors, plus counters only.
  arrays = [p for p in state_paths if p.endswith(("kernel", "bias", "scale", "embedding"))]
  assert len(arrays) == 2 * 4


def test_lr_mult_for_unknown_or_frozen_label_raises():
  labels = peft.label_params(_params(), RULES, log=False)
  for bad in ({"nope": 2.0}, {peft.FREEZE: 2.0}):
    with pytest.raises(ValueError, match="lr_mult"):
      optim.make_optimizer(optim_config(lr_mult=bad), labels, 10)


def _regression_loss(w, batch, rng):
  """Token-mean squared error; 'weight' = real tokens, 'count' an int metric."""
  del rng
  err = (batch["x"] @ w - batch["y"]) ** 2                           # (B, T)
  n = batch["mask"].sum()
  mean_y = (batch["y"] * batch["mask"]).sum() / n                     # a token-mean metric
  return (err * batch["mask"]).sum() / n, {"weight": n, "count": n, "mean_y": mean_y}


def test_accumulated_gradients_equal_full_batch_with_uneven_token_counts():
  rng = np.random.default_rng(0)
  b, t, d = 32, 5, 3
  batch = {"x": rng.normal(size=(b, t, d)).astype(np.float32),
           "y": rng.normal(size=(b, t)).astype(np.float32),
           "mask": (rng.random((b, t)) < 0.6).astype(np.int32)}
  w = jnp.asarray(rng.normal(size=(d,)).astype(np.float32))
  grad_fn = jax.value_and_grad(_regression_loss, has_aux=True)
  (loss, m), g = grad_fn(w, batch, None)
  (loss4, m4), g4 = jax.jit(lambda w, b: optim.accumulate_gradients(
      grad_fn, w, b, jax.random.key(0), 4))(w, batch)
  np.testing.assert_allclose(g4, g, rtol=1e-5)
  np.testing.assert_allclose(loss4, loss, rtol=1e-6)
  assert int(m4["count"]) == int(m["count"]) == int(batch["mask"].sum())
  assert float(m4["weight"]) == float(m["weight"])
  np.testing.assert_allclose(m4["mean_y"], m["mean_y"], rtol=1e-5)  # float: weighted mean


def test_accumulation_rejects_indivisible_batch():
  grad_fn = jax.value_and_grad(_regression_loss, has_aux=True)
  batch = {"x": np.zeros((6, 2, 3), np.float32), "y": np.zeros((6, 2), np.float32),
           "mask": np.ones((6, 2), np.int32)}
  with pytest.raises(ValueError, match="not divisible by accum_steps=4"):
    optim.accumulate_gradients(grad_fn, jnp.zeros(3), batch, jax.random.key(0), 4)
