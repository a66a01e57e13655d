"""Adversarial training on the output of the word-embedding lookup: FGM, PGD-K and FreeLB-K as
wrappers around any task loss, configured by `config.adversarial`.

The perturbation is a (B, T, D) tensor that the wrapper puts in the batch as `embedding_delta`;
lib/tasks/common.apply_model hands it to the model, which adds it to the word embeddings (before
position/type embeddings and the embedding LayerNorm, as FreeLB). Nothing is looked up by
parameter name; a loss that never passes `embedding_delta` to the model is refused when traced.

A wrapped loss is still `loss_fn(params, batch, rng, train) -> (loss, metrics)`, so lib/train
jits, shards, accumulates and differentiates it like any loss: a `jax.custom_vjp` makes its
gradient the method's accumulated gradient, computed by the K inner steps inside the same traced
step (a Python loop unrolled in the trace: each inner step is one forward and one backward, as
in the papers). Every inner pass uses the step's dropout key, so the adversary ascends the loss
of the same network it perturbs, and epsilon 0 gives exactly the plain loss and gradient.

  fgm     Miyato et al. 2017: r = eps * g / ||g|| (g: the gradient of the clean loss w.r.t. the
          embeddings); gradient of (1 - weight) * L(0) + weight * L(r).
  pgd     Madry et al. 2018, as the NLP PyTorch recipes: K ascent steps of `step_size` along the
          normalised gradient, each projected on the eps-ball; gradient of (1 - weight) * L(0)
          + weight * L(delta_K).
  freelb  Zhu et al. 2020: delta_0 random (init_scale), K steps; the parameter gradient is the
          mean of the K gradients at delta_0 .. delta_{K-1} (taken in the same backward passes
          that give the ascent directions).
Norms are per example, over the perturbed positions: l2 (Frobenius over T x D) or linf.
Evaluation (`train=False`) is the plain loss.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from lib import errors, peft

METHODS = ("none", "fgm", "pgd", "freelb")
NORMS = ("l2", "linf")
POSITIONS = ("tokens", "inner")
DELTA_KEY = "embedding_delta"


def default_config() -> ml_collections.ConfigDict:
  """The `adversarial` sub-config (method 'none': plain training).

  Fields:
    method: none | fgm | pgd | freelb.
    epsilon: radius of the per-example norm ball (FGM: the length of its one step); 0 = none.
    norm: l2 (Frobenius norm of an example's perturbation) | linf (largest entry).
    step_size: length of each ascent step (pgd, freelb).
    steps: K, ascent steps (pgd) or inner steps (freelb).
    init_scale: FreeLB's random start: U(-1, 1) / sqrt(T_i * D) * init_scale (l2; T_i the
      example's perturbed positions) or U(-init_scale, init_scale) (linf); 0 = start at zero.
    weight: share of the adversarial loss in fgm/pgd ((1 - weight) * clean + weight * adv).
    positions: tokens (every real token, input_mask == 1) | inner (without each row's first and
      last real token: [CLS] and [SEP]).
  """
  return ml_collections.ConfigDict(dict(method="none", epsilon=1.0, norm="l2", step_size=0.3,
                                        steps=3, init_scale=0.0, weight=0.5, positions="tokens"))


def check_config(acfg) -> None:
  """Raises errors.ConfigError naming every bad `config.adversarial` value."""
  bad = []
  def need(key, ok, expected):
    if not ok:
      bad.append(f"config.adversarial.{key}={acfg[key]!r}: must be {expected}")
  num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  need("method", acfg.method in METHODS, f"one of {list(METHODS)}")
  need("norm", acfg.norm in NORMS, f"one of {list(NORMS)}")
  need("positions", acfg.positions in POSITIONS, f"one of {list(POSITIONS)}")
  need("epsilon", num(acfg.epsilon) and acfg.epsilon >= 0, "a number >= 0")
  need("step_size", num(acfg.step_size) and acfg.step_size > 0, "a number > 0")
  need("steps", isinstance(acfg.steps, int) and acfg.steps >= 1, "an integer >= 1")
  need("init_scale", num(acfg.init_scale) and acfg.init_scale >= 0, "a number >= 0")
  need("weight", num(acfg.weight) and 0 <= acfg.weight <= 1, "a number in [0, 1]")
  if bad:
    raise errors.ConfigError("; ".join(bad))


# ----------------------------------------------------------------------------- norms

def position_mask(batch, positions: str = "tokens"):
  """(B, T, 1) float32: 1 where the embedding output may be perturbed."""
  mask = batch["input_mask"].astype(jnp.float32)                         # (B, T)
  if positions == "inner":
    idx = jnp.arange(mask.shape[1])
    last = jnp.sum(mask, 1, keepdims=True) - 1                            # (B, 1)
    mask = mask * (idx[None] > 0) * (idx[None] < last)
  return mask[..., None]


def _example_norm(x):
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2), keepdims=True))    # (B, 1, 1)


def direction(g, mask, norm: str):
  """The steepest-ascent unit step of gradient `g` (B, T, D) in `norm`, on the masked positions."""
  g = g * mask
  if norm == "linf":
    return jnp.sign(g)
  return g / jnp.maximum(_example_norm(g), 1e-12)


def project(delta, mask, norm: str, epsilon: float):
  """`delta` on the per-example `norm` ball of radius `epsilon`, zero off the mask."""
  delta = delta * mask
  if norm == "linf":
    return jnp.clip(delta, -epsilon, epsilon)
  scale = jnp.minimum(1.0, epsilon / jnp.maximum(_example_norm(delta), 1e-12))
  return delta * scale


def init_delta(rng, mask, hidden: int, acfg):
  """FreeLB's random start (zeros when init_scale is 0), projected on the ball."""
  shape = mask.shape[:2] + (hidden,)
  if acfg.method != "freelb" or acfg.init_scale == 0:
    return jnp.zeros(shape, jnp.float32)
  u = jax.random.uniform(rng, shape, jnp.float32, -1.0, 1.0) * mask
  if acfg.norm == "l2":   # expected norm init_scale / sqrt(3) whatever the length
    dims = jnp.maximum(jnp.sum(mask, axis=(1, 2), keepdims=True) * hidden, 1.0)
    u = u * acfg.init_scale / jnp.sqrt(dims)
  else:
    u = u * acfg.init_scale
  return project(u, mask, acfg.norm, acfg.epsilon)


# ----------------------------------------------------------------------------- the inner steps

def _plan(acfg) -> list:
  """The parameter-gradient weight of each forward/backward pass (0: ascent direction only)."""
  k, w = acfg.steps, acfg.weight
  if acfg.method == "fgm":
    return [1.0 - w, w]
  if acfg.method == "pgd":
    return [1.0 - w] + [0.0] * (k - 1) + [w]
  return [1.0 / k] * k                                                    # freelb


def inner_steps(loss_fn: Callable, acfg, trainable, merge: Callable, batch, rng, hidden: int):
  """Runs the method's passes (unrolled in the trace).

  Args:
    loss_fn: the task loss (params, batch, rng, train) -> (loss, metrics).
    acfg: the `adversarial` config.
    trainable: the differentiated parameters; `merge(trainable)` gives the model's whole tree.
    batch: the training batch (with input_mask).
    rng: the step's dropout key (used by every pass).
    hidden: D, the width of the word embeddings.

  Returns:
    (objective, metrics, gradient of the objective w.r.t. `trainable`, [delta of each pass]).
  """
  mask = position_mask(batch, acfg.positions)
  delta = init_delta(jax.random.fold_in(rng, 0x5eed), mask, hidden, acfg)
  step = acfg.epsilon if acfg.method == "fgm" else acfg.step_size
  f = lambda t, d: loss_fn(merge(t), dict(batch, **{DELTA_KEY: d}), rng, True)
  plan = _plan(acfg)
  total, grads, deltas, losses, first_metrics = 0.0, None, [], [], None
  for i, w in enumerate(plan):
    ascend = i < len(plan) - 1
    argnums = (0, 1) if w > 0 and ascend else (0,) if w > 0 else (1,)
    if w == 0 and not ascend:
      break
    (loss, metrics), g = jax.value_and_grad(f, argnums, has_aux=True)(trainable, delta)
    deltas.append(delta)
    losses.append(loss)
    first_metrics = metrics if first_metrics is None else first_metrics
    if w > 0:
      total = total + w * loss
      grads = _add_scaled(grads, g[0], w)
    if ascend:
      delta = project(delta + step * direction(g[-1], mask, acfg.norm), mask, acfg.norm,
                      acfg.epsilon)
  if grads is None:   # weight 0 everywhere cannot happen with a checked config; keep shapes
    grads = jax.tree.map(jnp.zeros_like, trainable)
  extra = {"adv_loss": losses[-1], "delta_norm": _mean_norm(deltas[-1], acfg.norm)}
  if acfg.method != "freelb" or acfg.init_scale == 0:
    extra["clean_loss"] = losses[0]
  return total, dict(first_metrics, **extra), grads, deltas


def _add_scaled(acc, g, w):
  g = jax.tree.map(lambda x: w * x, g)
  return g if acc is None else jax.tree.map(jnp.add, acc, g)


def _mean_norm(delta, norm: str):
  if norm == "linf":
    return jnp.mean(jnp.max(jnp.abs(delta), axis=(1, 2)))
  return jnp.mean(_example_norm(delta))


def check_seat(loss_fn: Callable, params, batch, rng) -> None:
  """Raises ValueError if `loss_fn` never hands batch['embedding_delta'] to the model (it would
  train without perturbation: a custom loss must call the model through tasks.common.apply_model
  or pass `embedding_delta=batch['embedding_delta']`)."""
  probe = lambda d: loss_fn(params, dict(batch, **{DELTA_KEY: d}), rng, True)[0]
  # A (B, T, 1) probe broadcasts against the (B, T, D) embeddings: only its use is looked at.
  jaxpr = jax.make_jaxpr(probe)(jnp.zeros(batch["input_mask"].shape + (1,), jnp.float32)).jaxpr
  var = jaxpr.invars[0]
  if not any(v is var for eqn in jaxpr.eqns for v in eqn.invars):
    raise ValueError("adversarial training: the loss ignores batch['embedding_delta'] (the "
                     "perturbation of the word embeddings), so it would train unperturbed; call "
                     "the model with lib.tasks.common.apply_model or pass embedding_delta=")



# ----------------------------------------------------------------------------- the wrapper

def wrap(loss_fn: Callable, acfg, hidden: int, labels=None) -> Callable:
  """`loss_fn` with adversarial training on the word embeddings (unchanged for method 'none').

  Args:
    loss_fn: the task loss (params, batch, rng, train) -> (loss, metrics); it must pass
      batch['embedding_delta'] to the model (tasks.common.apply_model does).
    acfg: the `adversarial` config (`default_config`).
    hidden: D, the width of the word embeddings (ModelArgs.hidden_size).
    labels: the run's PEFT label tree: only trainable leaves get gradients (None = all).

  Returns:
    loss(params, batch, rng, train) -> (objective, metrics): with train=True its value is the
    method's objective and its gradient the method's (accumulated) parameter gradient; metrics
    add adv_loss, delta_norm (mean per-example norm of the last perturbation) and clean_loss
    (fgm, pgd, freelb from zero). With train=False, the plain loss.
  """
  check_config(acfg)
  if acfg.method == "none":
    return loss_fn

  def wrapped(params, batch, rng, train):
    if not train:
      return loss_fn(params, batch, rng, train)
    rng = jax.random.key(0) if rng is None else rng
    check_seat(loss_fn, params, batch, rng)
    if labels is None:
      trainable, merge = params, lambda t: t
    else:
      trainable, frozen = peft.split_trainable(params, labels)
      merge = lambda t: peft.merge_trainable(t, frozen)

    @jax.custom_vjp
    def objective(t):
      return inner_steps(loss_fn, acfg, t, merge, batch, rng, hidden)[:2]

    def fwd(t):
      total, metrics, grads, _ = inner_steps(loss_fn, acfg, t, merge, batch, rng, hidden)
      return (total, metrics), grads

    def bwd(grads, ct):   # the gradient was computed in the forward passes
      return (jax.tree.map(lambda g: ct[0] * g, grads),)

    objective.defvjp(fwd, bwd)
    return objective(trainable)
  return wrapped


def from_config(loss_fn: Callable, cfg, hidden: int, labels=None) -> Callable:
  """The task loss wrapped as `cfg.adversarial` says (unchanged without the block)."""
  acfg = cfg.get("adversarial") if hasattr(cfg, "get") else None
  if acfg is None:
    return loss_fn
  return wrap(loss_fn, acfg, hidden, labels)
