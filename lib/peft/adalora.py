"""AdaLoRA (Zhang et al. 2023) as an optax wrapper: sensitivity importance with EMA smoothing,
a cubic rank-budget schedule, the orthogonality regulariser, and rank reports.

The increments are lora_a (K..., r) . diag(lora_e) (r,) . lora_b (r, F...) (lib/models Dense with
LoraArgs.svd). Pruning a triplet i zeroes lora_e[i]; the optimizer makes that update, so it lives
in the optimizer state (checkpointed, sharded like the parameters) and needs no change to the
training step.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lib.peft.labels import flatten_paths, path_str
from lib.peft.spec import Spec


class AdaLoraState(NamedTuple):
  inner: Any          # the wrapped optimizer's state
  count: jax.Array    # () int32: updates so far
  ipt: dict           # {factor path: EMA of the sensitivity |p * g|}
  unc: dict           # {factor path: EMA of its uncertainty |s - ipt|}
  mask: dict          # {module path: (r,) bool}: triplets kept at the last reallocation


def _modules(flat: dict) -> list:
  return sorted(p[:-len("/lora_e")] for p in flat if p.endswith("/lora_e"))


def _factor_paths(mods) -> list:
  return [f"{m}/{n}" for m in mods for n in ("lora_a", "lora_e", "lora_b")]


def _phases(m, num_steps: int) -> tuple:
  """(t_init steps, first step of the final phase) of an adalora Method over `num_steps`."""
  t_init = int(round(m.t_init * num_steps))
  final = num_steps - max(1, int(round(m.t_final * num_steps)))
  if final <= t_init:
    raise ValueError(f"adalora: t_init={m.t_init} and t_final={m.t_final} leave no budget "
                     f"schedule in {num_steps} steps")
  return t_init, final


def budget(m, num_steps: int, n_modules: int, step):
  """Total rank kept at `step` (0-based): init_rank * n until t_init, then the cubic decrease
  to target_rank * n at the final phase (AdaLoRA eq. 12)."""
  t_init, final = _phases(m, num_steps)
  b0, bt = m.init_rank * n_modules, m.target_rank * n_modules
  frac = jnp.clip((step - t_init) / (final - t_init), 0.0, 1.0)
  return jnp.where(step < t_init, b0, jnp.floor(bt + (b0 - bt) * (1.0 - frac) ** 3)).astype(
      jnp.int32)


def orth_penalty(flat: dict, mods) -> jax.Array:
  """Mean over all A and B factors of ||A^T A - I||_F and ||B B^T - I||_F (as HF PEFT)."""
  terms = []
  for mod in mods:
    a = flat[f"{mod}/lora_a"].astype(jnp.float32)
    a = a.reshape(-1, a.shape[-1])                                      # (K, r)
    b = flat[f"{mod}/lora_b"].astype(jnp.float32)
    b = b.reshape(b.shape[0], -1)                                       # (r, F)
    for gram in (a.T @ a, b @ b.T):
      d = gram - jnp.eye(gram.shape[0], dtype=jnp.float32)
      terms.append(jnp.sqrt(jnp.sum(d * d) + 1e-12))
  return sum(terms) / len(terms)


def _scores(ipt: dict, unc: dict, mods) -> jax.Array:
  """(n_modules, r) triplet importance: s(E_i) + mean_j s(A_ji) + mean_j s(B_ij), s = ipt * unc."""
  rows = []
  for mod in mods:
    s = {n: ipt[f"{mod}/{n}"] * unc[f"{mod}/{n}"] for n in ("lora_a", "lora_e", "lora_b")}
    rows.append(s["lora_e"] + s["lora_a"].reshape(-1, s["lora_a"].shape[-1]).mean(0)
                + s["lora_b"].reshape(s["lora_b"].shape[0], -1).mean(1))
  return jnp.stack(rows)


def _top(scores: jax.Array, k) -> jax.Array:
  """Bool mask of the k largest scores (ties by position); k may be traced."""
  flat = scores.reshape(-1)
  rank = jnp.argsort(jnp.argsort(-flat, stable=True), stable=True)
  return (rank < k).reshape(scores.shape)


def _wrap(inner: optax.GradientTransformation, m, num_steps: int) -> optax.GradientTransformation:
  t_init, final = _phases(m, num_steps)

  def init(params):
    flat = flatten_paths(params)
    mods = _modules(flat)
    if not mods:
      raise ValueError("adalora: no lora_e parameters among the trainable ones (build the "
                       "model with peft.configure(args, spec))")
    zeros = {p: jnp.zeros(flat[p].shape, jnp.float32) for p in _factor_paths(mods)}
    return AdaLoraState(inner.init(params), jnp.zeros((), jnp.int32), zeros, dict(zeros),
                        {mod: jnp.ones(flat[f"{mod}/lora_e"].shape, bool) for mod in mods})

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("adalora needs the params in tx.update(grads, state, params)")
    flat_p, flat_g = flatten_paths(params), flatten_paths(grads)
    mods, t = _modules(flat_p), state.count
    ipt, unc = {}, {}
    for p in _factor_paths(mods):
      s = jnp.abs(flat_p[p].astype(jnp.float32) * flat_g[p].astype(jnp.float32))
      ipt[p] = m.beta1 * state.ipt[p] + (1 - m.beta1) * s
      unc[p] = m.beta2 * state.unc[p] + (1 - m.beta2) * jnp.abs(s - ipt[p])
    if m.orth_reg > 0:
      ab = {p: flat_p[p] for p in _factor_paths(mods) if not p.endswith("/lora_e")}
      reg = jax.grad(lambda x: m.orth_reg * orth_penalty(x, mods))(ab)
      grads = jax.tree_util.tree_map_with_path(
          lambda kp, g: g + reg[path_str(kp)].astype(g.dtype) if path_str(kp) in reg else g, grads)
    updates, inner_state = inner.update(grads, state.inner, params)
    # Reallocate every delta_t steps of the schedule and once more at the start of the final
    # phase (budget = target); in the final phase the last mask holds at every step.
    realloc = ((t >= t_init) & (t < final) & ((t - t_init) % m.delta_t == 0)) | (t == final)
    new = _top(_scores(ipt, unc, mods), budget(m, num_steps, len(mods), t))
    mask = {mod: jnp.where(realloc, new[i], state.mask[mod]) for i, mod in enumerate(mods)}
    apply = realloc | (t > final)

    def masked(kp, u):
      path = path_str(kp)
      if not path.endswith("/lora_e") or path[:-len("/lora_e")] not in mask:
        return u
      keep = mask[path[:-len("/lora_e")]] | ~apply
      return jnp.where(keep, u, -flat_p[path].astype(u.dtype))   # p + (-p) == 0 exactly
    updates = jax.tree_util.tree_map_with_path(masked, updates)
    return updates, AdaLoraState(inner_state, t + 1, ipt, unc, mask)

  return optax.GradientTransformation(init, update)


def wrap_optimizer(tx: optax.GradientTransformation, spec: Spec,
                   num_steps: int) -> optax.GradientTransformation:
  """`tx` with AdaLoRA's regulariser, importance and budget around it if `spec` has adalora
  (else `tx` itself). Initialise it on the trainable view, as `lib.train` does."""
  m = spec.adalora
  return tx if m is None else _wrap(tx, m, num_steps)


def adalora_ranks(params) -> dict:
  """{module path: rank kept (non-zero lora_e entries)} of AdaLoRA params."""
  flat = flatten_paths(params)
  return {mod: int(np.count_nonzero(np.asarray(flat[f"{mod}/lora_e"]))) for mod in _modules(flat)}


def rank_metrics(params) -> dict:
  """{'adalora_rank/<module path>': kept rank, 'adalora_rank/total': their sum}; {} without
  AdaLoRA."""
  flat = flatten_paths(params)
  ranks = {f"adalora_rank/{mod}": jnp.count_nonzero(flat[f"{mod}/lora_e"]).astype(jnp.int32)
           for mod in _modules(flat)}
  if ranks:
    ranks["adalora_rank/total"] = sum(ranks.values())
  return ranks


def with_rank_metrics(train_step: Callable) -> Callable:
  """A train step that also reports AdaLoRA's kept rank per matrix (no-op without AdaLoRA)."""
  def step(state, batch):
    state, metrics = train_step(state, batch)
    return state, dict(metrics, **rank_metrics(state.params))
  return step
