"""Optax chains from an `optim` sub-config: AdamW, schedules, clipping, label groups, accumulation."""

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lib import tree

# The label of frozen parameters (lib/peft labels every parameter): no gradient, no optimizer
# state, never updated; every other label is a trainable optimizer group.
FREEZE = "freeze"
SCHEDULES = ("linear", "cosine", "constant")
# Leaf names never decayed: biases and LayerNorm scales (and 'embedding' unless asked).
_NO_DECAY = ("bias", "scale")


def is_trainable(label: str) -> bool:
  return label != FREEZE


def default_config() -> ml_collections.ConfigDict:
  """The `optim` sub-config.

  Fields:
    name: 'adamw' (the only optimizer; weight_decay=0 gives Adam).
    lr: peak learning rate.
    b1, b2, eps: Adam moments and epsilon.
    weight_decay: decoupled weight decay (multiplied by the learning rate, as PyTorch AdamW).
      Never applied to biases and LayerNorm scales.
    decay_embeddings: also decay the embedding tables.
    warmup_steps: linear warmup from 0 to `lr`; if 0, `warmup_frac * num_steps` is used.
    warmup_frac: warmup as a fraction of the run (only when warmup_steps == 0).
    schedule: after warmup, 'linear' (to 0), 'cosine' (to 0) or 'constant'.
    clip_norm: clip the global gradient norm (of all trainable parameters) to this; 0 = off.
    accum_steps: split each batch into this many micro-batches and accumulate their gradients
      (same update as one batch of the full size, at 1/accum_steps of the activation memory).
    lr_mult: {label: multiplier} for parameter labels from `peft.rules` (unlisted labels: 1).
  """
  return ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
      decay_embeddings=False, warmup_steps=0, warmup_frac=0.0, schedule="linear",
      clip_norm=1.0, accum_steps=1, lr_mult={}))


def warmup_steps(cfg, num_steps: int) -> int:
  """Number of warmup steps from `cfg.warmup_steps`, else `cfg.warmup_frac` of `num_steps`."""
  frac = cfg.get("warmup_frac", 0.0)
  if cfg.get("warmup_steps", 0) > 0 and frac > 0:
    raise ValueError(f"optim: set warmup_steps ({cfg.warmup_steps}) or warmup_frac ({frac}), "
                     "not both")
  return int(cfg.get("warmup_steps", 0)) or int(round(frac * num_steps))


def make_schedule(cfg, num_steps: int) -> optax.Schedule:
  """Linear warmup to `cfg.lr`, then linear/cosine decay to 0 at `num_steps`, or constant."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={cfg.schedule!r}; valid: {SCHEDULES}")
  warm = warmup_steps(cfg, num_steps)
  rest = max(num_steps - warm, 1)
  if cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, 0.0, rest)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, rest)
  else:
    decay = optax.constant_schedule(cfg.lr)
  if warm == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def decay_mask_fn(decay_embeddings: bool) -> Callable:
  """tree -> bool tree: True where weight decay applies (kernels; embeddings if asked)."""
  def decays(kp, _):
    name = tree.path_str(kp).rsplit("/", 1)[-1]
    if name in _NO_DECAY:
      return False
    return decay_embeddings or name != "embedding"
  return lambda params: jax.tree_util.tree_map_with_path(decays, params)


def _label_fn(labels) -> Callable:
  """tree -> label tree, by path, so it works on the full tree and on a trainable-only view."""
  by_path = tree.flatten(labels)
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda kp, _: by_path[tree.path_str(kp)], params)


def make_optimizer(cfg, labels, num_steps: int):
  """The optax chain for a run: clip -> per-label AdamW groups; FREEZE -> set_to_zero.

  Args:
    cfg: the `optim` sub-config (see `default_config`).
    labels: label tree from `peft.label_params` (leaf per parameter).
    num_steps: optimizer steps of the run (for the schedule).

  Returns:
    (tx, schedule): the GradientTransformation and the base learning-rate schedule (for logging).
    Frozen parameters hold no optimizer state; `tx` can be initialised on the full parameter tree
    or on the trainable view from `peft.split_trainable` (what `lib.train` does).
  """
  if cfg.name != "adamw":
    raise ValueError(f"optim.name={cfg.name!r}; valid: 'adamw'")
  schedule = make_schedule(cfg, num_steps)
  present = sorted(set(jax.tree_util.tree_leaves(labels)))
  mults = dict(cfg.get("lr_mult", {}) or {})
  bad = [k for k in mults if k not in present or k == FREEZE]
  if bad:
    raise ValueError(f"optim.lr_mult labels {bad} are not trainable labels of any parameter; "
                     f"labels: {present}")
  mask = decay_mask_fn(cfg.decay_embeddings)
  groups = {FREEZE: optax.set_to_zero()}
  for label in present:
    if is_trainable(label):
      m = float(mults.get(label, 1.0))
      groups[label] = optax.adamw(lambda s, m=m: m * schedule(s), b1=cfg.b1, b2=cfg.b2,
                                  eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
  label_fn = _label_fn(labels)
  parts = []
  if cfg.clip_norm > 0:
    # Clip before the groups (inside them the norm would be per label), over trainable leaves
    # only: gradients a caller passes for frozen leaves must not shrink the real ones.
    trainable = lambda params: jax.tree.map(is_trainable, label_fn(params))
    parts.append(optax.masked(optax.clip_by_global_norm(cfg.clip_norm), trainable))
  return optax.chain(*parts, optax.multi_transform(groups, label_fn)), schedule


def _micro_batches(batch, k: int):
  """(B, ...) -> (k, B/k, ...); micro-batch j takes rows j, j+k, ... so a batch sharded on its
  leading axis stays evenly sharded in every micro-batch (no cross-device shuffle)."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by accum_steps={k}")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_and_grad: Callable, params, batch, rng, accum_steps: int):
  """Gradients over `accum_steps` micro-batches, equal to those of the whole batch.

  Args:
    loss_and_grad: (params, batch, rng) -> ((loss, metrics), grads), e.g. from
      `jax.value_and_grad(..., has_aux=True)`. If `metrics` has a 'weight' (the count the loss is
      a mean over, e.g. real tokens), micro-batches are weighted by it, which makes the result
      exact for token-mean losses too; otherwise micro-batches weigh equally.
    params: the tree differentiated (may contain None holes).
    batch: dict of arrays with a leading batch axis divisible by `accum_steps`.
    rng: key; micro-batch j uses fold_in(rng, j).
    accum_steps: number of micro-batches.

  Returns:
    ((loss, metrics), grads) as `loss_and_grad` of the whole batch: float metrics are weighted
    means, integer metrics (counts) and 'weight' are totals.
  """
  if accum_steps == 1:
    return loss_and_grad(params, batch, rng)
  micro = _micro_batches(batch, accum_steps)
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(loss_and_grad, params, first, rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(carry, xs):
    acc, wsum = carry
    mb, j = xs
    out = loss_and_grad(params, mb, jax.random.fold_in(rng, j))
    w = out[0][1].get("weight", 1.0)
    return (jax.tree.map(lambda a, b: a + b if _is_count(b) else a + w * b, acc, out),
            wsum + w), None

  (acc, wsum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                (micro, jnp.arange(accum_steps)))
  (loss, metrics), grads = jax.tree.map(lambda a: a if _is_count(a) else a / wsum, acc)
  if "weight" in metrics:
    metrics = dict(metrics, weight=wsum)
  return (loss, metrics), grads


def _is_count(x) -> bool:
  """Integer metrics are counts: summed over micro-batches rather than averaged."""
  return jnp.issubdtype(x.dtype, jnp.integer)
