"""Pruning: attention-head importance and physical head removal (Michel et al. 2019), and
unstructured weight masks (magnitude with Zhu & Gupta's cubic schedule, movement) for fine-tuning.

Heads. The mask of head h in layer l, xi[l][h] (1 = kept), multiplies that head's context vector
before the `out` projection; it is applied by scaling the head's rows of the `out` kernel
(heads, head_dim, embed), which is the same product. A head's importance is |dL/dxi| at xi = 1,
summed over batches (as HF's bertology script does), then normalised per layer (L2). Removing a
head slices it out of the layer's query/key/value (embed, heads, head_dim) kernels and biases and
the out kernel: `ModelArgs.heads_per_layer` records the counts, so the model dir loads anywhere.

FFN neurons, alike: the mask of neuron f in layer l multiplies its activation, i.e. row f of the
`mlp_out` kernel (mlp, embed); importance |dL/dxi| summed over batches, normalised per layer;
removal slices mlp_in's columns and bias and mlp_out's rows (`ModelArgs.mlp_per_layer`).
"""

import dataclasses
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lib.models import BACKBONE, ModelArgs


def _attention(args: ModelArgs, layer: int) -> str:
  return f"{BACKBONE[args.arch]}/layer_{layer}/attention"


def _check_plain(args: ModelArgs) -> None:
  """Head masks and slicing act on plain kernels: LoRA paths, prefixes and int8 codes are not."""
  if args.lora or args.prefix_len or args.dot_general:
    raise ValueError("head pruning needs a plain float model: merge LoRA (peft.merge) first; "
                     "prefixes and int8 kernels (ModelArgs.dot_general) are not supported; got "
                     f"lora={args.lora!r} prefix_len={args.prefix_len} "
                     f"dot_general={args.dot_general!r}")


def head_counts(args: ModelArgs) -> tuple:
  """Heads of each layer."""
  return tuple(args.layer_heads(i) for i in range(args.num_layers))


def scale_heads(params, args: ModelArgs, xi: Sequence):
  """`params` with the out-kernel rows of head h of layer l times xi[l][h] (the head mask).

  Args:
    params: the model's parameter tree (plain nested dicts).
    args: its architecture.
    xi: one (heads of layer l,) array per layer.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  flat = dict(flat)
  for layer, x in enumerate(xi):
    path = _attention(args, layer) + "/out/kernel"
    flat[path] = flat[path] * jnp.asarray(x, flat[path].dtype)[:, None, None]   # (H, Dh, D)
  return traverse_util.unflatten_dict(flat, sep="/")


def neuron_counts(args: ModelArgs) -> tuple:
  """FFN neurons of each layer."""
  return tuple(args.layer_mlp(i) for i in range(args.num_layers))


def scale_neurons(params, args: ModelArgs, xi: Sequence):
  """`params` with the mlp_out-kernel row of neuron f of layer l times xi[l][f] (the neuron mask).

  Args:
    params: the model's parameter tree (plain nested dicts).
    args: its architecture.
    xi: one (neurons of layer l,) array per layer.
  """
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for layer, x in enumerate(xi):
    path = f"{BACKBONE[args.arch]}/layer_{layer}/mlp/mlp_out/kernel"
    flat[path] = flat[path] * jnp.asarray(x, flat[path].dtype)[:, None]   # (F, D)
  return traverse_util.unflatten_dict(flat, sep="/")


_UNITS = {"heads": (head_counts, scale_heads), "neurons": (neuron_counts, scale_neurons)}


def mask_importance(loss_fn: Callable, params, args: ModelArgs, batches, units=("heads",),
                    normalize: bool = True) -> dict:
  """Michel et al.'s importance of heads and/or FFN neurons: sum over `batches` of |dL/dxi| at
  xi = 1, all asked-for masks differentiated in one pass.

  Args:
    loss_fn: (params, batch) -> scalar loss (e.g. a task loss in eval mode).
    params: the model's parameters.
    args: its architecture.
    batches: an iterable of batches (dicts of arrays; non-numeric entries are dropped).
    units: any of 'heads', 'neurons'.
    normalize: divide each layer's scores by their L2 norm (Michel et al., HF bertology).

  Returns:
    {unit: one float64 (units of layer l,) array per layer}.
  """
  _check_plain(args)
  units = tuple(units)
  if not units or set(units) - set(_UNITS):
    raise ValueError(f"units: expected some of {sorted(_UNITS)}; got {units!r}")

  def masked(xis, p, b):
    for unit, xi in zip(units, xis):
      p = _UNITS[unit][1](p, args, xi)
    return loss_fn(p, b)
  grad = jax.jit(jax.grad(masked))
  counts = [_UNITS[u][0](args) for u in units]
  ones = [[jnp.ones((n,), jnp.float32) for n in c] for c in counts]
  total = [[np.zeros(n, np.float64) for n in c] for c in counts]
  for batch in batches:
    batch = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
    for acc_u, g_u in zip(total, grad(ones, params, batch)):
      for acc, g in zip(acc_u, g_u):
        acc += np.abs(np.asarray(g, np.float64))
  if normalize:
    total = [[t / max(np.linalg.norm(t), 1e-20) for t in tu] for tu in total]
  return dict(zip(units, total))


def head_importance(loss_fn: Callable, params, args: ModelArgs, batches,
                    normalize: bool = True) -> list:
  """Michel et al.'s head importance (`mask_importance` of 'heads'): one float64 (heads of layer
  l,) array per layer."""
  return mask_importance(loss_fn, params, args, batches, ("heads",), normalize)["heads"]


def neuron_importance(loss_fn: Callable, params, args: ModelArgs, batches,
                      normalize: bool = True) -> list:
  """FFN-neuron importance (`mask_importance` of 'neurons'): one (neurons of layer l,) array per
  layer."""
  return mask_importance(loss_fn, params, args, batches, ("neurons",), normalize)["neurons"]


def units_to_keep(importance: Sequence, fraction: float, min_per_layer: int = 1,
                  unit: str = "heads") -> tuple:
  """The units (heads, neurons) kept when the `fraction` least important of all of them are
  removed (globally), leaving at least `min_per_layer` in every layer.

  Returns:
    one sorted tuple of kept indices per layer.

  Raises:
    ValueError: fraction outside [0, 1), or more removals than `min_per_layer` allows.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"{unit[:-1]} pruning fraction must be in [0, 1); got {fraction}")
  total = sum(len(s) for s in importance)
  n_remove = int(round(fraction * total))
  room = sum(max(len(s) - min_per_layer, 0) for s in importance)
  if n_remove > room:
    raise ValueError(f"cannot remove {n_remove} of {total} {unit} keeping {min_per_layer} per "
                     f"layer (at most {room})")
  keep = [set(range(len(s))) for s in importance]
  order = sorted((float(v), l, h) for l, s in enumerate(importance) for h, v in enumerate(s))
  removed = 0
  for _, l, h in order:
    if removed == n_remove:
      break
    if len(keep[l]) > min_per_layer:
      keep[l].discard(h)
      removed += 1
  return tuple(tuple(sorted(k)) for k in keep)


def heads_to_keep(importance: Sequence, fraction: float, min_per_layer: int = 1) -> tuple:
  """`units_to_keep` for attention heads."""
  return units_to_keep(importance, fraction, min_per_layer, "heads")


def neurons_to_keep(importance: Sequence, fraction: float, min_per_layer: int = 1) -> tuple:
  """`units_to_keep` for FFN neurons."""
  return units_to_keep(importance, fraction, min_per_layer, "neurons")


def mask_heads(params, args: ModelArgs, keep: Sequence):
  """The unpruned model with the heads not in `keep` masked (their out-kernel rows zero)."""
  xi = [np.isin(np.arange(h), list(k)).astype(np.float32) for h, k in zip(head_counts(args), keep)]
  return jax.tree.map(np.asarray, scale_heads(params, args, xi))


def prune_heads(params, args: ModelArgs, keep: Sequence):
  """Removes the heads not in `keep` physically: smaller query/key/value/out matrices.

  Args:
    params: the model's parameters (host or device arrays).
    args: its architecture (possibly already pruned: `keep` indexes its current heads).
    keep: one sequence of kept head indices per layer (at least one each).

  Returns:
    (params as host numpy, args with `heads_per_layer`).
  """
  _check_plain(args)
  counts = head_counts(args)
  if len(keep) != len(counts) or any(not k or not set(k) <= set(range(h))
                                     for k, h in zip(keep, counts)):
    raise ValueError(f"keep: expected {len(counts)} non-empty lists of head indices below "
                     f"{counts}; got {keep!r}")
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  for layer, k in enumerate(keep):
    idx, att = np.asarray(sorted(k)), _attention(args, layer)
    for name in ("query", "key", "value"):
      flat[f"{att}/{name}/kernel"] = flat[f"{att}/{name}/kernel"][:, idx]   # (D, h, Dh)
      flat[f"{att}/{name}/bias"] = flat[f"{att}/{name}/bias"][idx]          # (h, Dh)
    flat[f"{att}/out/kernel"] = flat[f"{att}/out/kernel"][idx]              # (h, Dh, D)
  args = dataclasses.replace(args, heads_per_layer=tuple(len(k) for k in keep))
  return traverse_util.unflatten_dict(flat, sep="/"), args


def mask_neurons(params, args: ModelArgs, keep: Sequence):
  """The unpruned model with the FFN neurons not in `keep` masked (their mlp_out rows zero)."""
  xi = [np.isin(np.arange(f), list(k)).astype(np.float32)
        for f, k in zip(neuron_counts(args), keep)]
  return jax.tree.map(np.asarray, scale_neurons(params, args, xi))


def prune_neurons(params, args: ModelArgs, keep: Sequence):
  """Removes the FFN neurons not in `keep` physically: narrower mlp_in/mlp_out matrices.

  Args:
    params: the model's parameters (host or device arrays).
    args: its architecture (possibly already pruned: `keep` indexes its current neurons).
    keep: one sequence of kept neuron indices per layer (at least one each).

  Returns:
    (params as host numpy, args with `mlp_per_layer`).
  """
  _check_plain(args)
  counts = neuron_counts(args)
  if len(keep) != len(counts) or any(not len(k) or not set(k) <= set(range(f))
                                     for k, f in zip(keep, counts)):
    raise ValueError(f"keep: expected {len(counts)} non-empty lists of neuron indices below "
                     f"{counts}; got {keep!r}")
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  for layer, k in enumerate(keep):
    idx, mlp = np.asarray(sorted(k)), f"{BACKBONE[args.arch]}/layer_{layer}/mlp"
    flat[f"{mlp}/mlp_in/kernel"] = flat[f"{mlp}/mlp_in/kernel"][:, idx]     # (D, f)
    flat[f"{mlp}/mlp_in/bias"] = flat[f"{mlp}/mlp_in/bias"][idx]            # (f,)
    flat[f"{mlp}/mlp_out/kernel"] = flat[f"{mlp}/mlp_out/kernel"][idx]      # (f, D)
  args = dataclasses.replace(args, mlp_per_layer=tuple(len(k) for k in keep))
  return traverse_util.unflatten_dict(flat, sep="/"), args


# ------------------------------------------------------------------------- unstructured masks
# A sparsity spec prunes the kernels that ordered (regex, 'prune' | 'keep') rules choose (first
# full match wins; no match: kept). The fraction pruned follows Zhu & Gupta's cubic schedule from
# `begin` to `end` (optimizer steps), the mask recomputed every `every` steps from the scores:
# |W| (magnitude) or the accumulated movement -sum_t grad_t * W_t (Sanh et al., hard top-k).
# `sparsify` wraps the optimizer: a masked weight's gradient is dropped and its update is -W, so
# it is exactly zero after every step (and in every checkpoint and export).
# Movement is Sanh et al.'s straight-through top-k: the parameters are the masked weights W * M
# (the forward sees the mask), and the optimizer state keeps the dense W. grad_t is dL/d(W * M),
# so S_ij = -sum_t grad_t,ij W_ij keeps moving for a masked weight too: it is the first-order loss
# decrease of restoring it, and a masked weight whose score climbs back into the top-k returns
# with its old value. (Scoring the zeroed parameters instead froze a masked weight's score at its
# first steps.) Movement needs many steps: over a few hundred, -g W is minibatch noise whose spread
# grows with |W|, so the low tail that top-k cuts is rich in large weights (configs/compress.py).

@dataclasses.dataclass(frozen=True)
class Sparsity:
  """What unstructured pruning does during fine-tuning (see the comment above)."""
  method: str = "magnitude"     # magnitude | movement
  target: float = 0.7           # final fraction of the pruned kernels' weights that are zero
  begin: int = 0                # first step of the schedule
  end: int = 1000               # the target is reached here; the mask is fixed after it
  every: int = 10               # mask updates every this many steps
  scope: str = "global"         # global: one threshold over all pruned kernels | kernel: each
  rules: tuple = ((r".*/layer_\d+/.*/kernel", "prune"),)

  def __post_init__(self):
    if self.method not in ("magnitude", "movement") or self.scope not in ("global", "kernel"):
      raise ValueError(f"sparsity: method must be 'magnitude' or 'movement' and scope 'global' or "
                       f"'kernel'; got {self.method!r}, {self.scope!r}")
    if not 0.0 <= self.target < 1.0 or not 0 <= self.begin <= self.end or self.every < 1:
      raise ValueError(f"sparsity: expected 0 <= target < 1, 0 <= begin <= end, every >= 1; got "
                       f"target={self.target} begin={self.begin} end={self.end} every={self.every}")
    for rule in self.rules:
      if len(rule) != 2 or rule[1] not in ("prune", "keep"):
        raise ValueError(f"sparsity.rules: expected ((regex, 'prune' | 'keep'), ...); got {rule!r}")
      re.compile(rule[0])
    object.__setattr__(self, "rules", tuple((str(rx), str(a)) for rx, a in self.rules))


def pruned_paths(paths, rules) -> list:
  """The kernel paths ('/'-joined, ending in 'kernel') that `rules` prune, in order.

  Raises:
    ValueError: a rule fully matches no kernel (a typo, as for PEFT rules; the rule named).
  """
  kernels = [p for p in paths if p.endswith("kernel")]
  used = [0] * len(rules)
  out = []
  for p in kernels:
    i = next((i for i, (rx, _) in enumerate(rules) if re.fullmatch(rx, p)), None)
    if i is not None:
      used[i] += 1
      if rules[i][1] == "prune":
        out.append(p)
  unused = [f"#{i} {tuple(rules[i])!r}" for i, n in enumerate(used) if n == 0]
  if unused:
    raise ValueError(f"sparsity rules match no kernel (shadowed by an earlier rule or a typo): "
                     f"{', '.join(unused)}; kernel paths look like {kernels[:3]}")
  return out


def cubic_sparsity(step, target: float, begin: int, end: int, initial: float = 0.0):
  """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3 for t0 <= t <= t1
  (s_i before, s_f after); with t0 = t1, s_f from t0 on."""
  if end <= begin:
    return jnp.where(jnp.asarray(step) >= begin, target, initial)
  frac = jnp.clip((jnp.asarray(step, jnp.float32) - begin) / max(end - begin, 1), 0.0, 1.0)
  return target + (initial - target) * (1.0 - frac) ** 3


def top_masks(scores: list, sparsity, scope: str) -> list:
  """Boolean keep-masks dropping the lowest-scoring `sparsity` fraction of the weights: of all
  `scores` together (scope 'global') or of each (scope 'kernel'). Ties at the threshold are kept."""
  def one(flat):
    k = jnp.floor(sparsity * flat.size).astype(jnp.int32)
    return jnp.sort(flat)[jnp.minimum(k, flat.size - 1)], k
  if scope == "kernel":
    out = []
    for s in scores:
      thr, k = one(s.reshape(-1))
      out.append((s >= thr) | (k == 0))
    return out
  thr, k = one(jnp.concatenate([s.reshape(-1) for s in scores]))
  return [(s >= thr) | (k == 0) for s in scores]


class SparsityState(NamedTuple):
  count: jax.Array    # () int32: updates seen
  masks: Any          # like the params: bool keep-masks of pruned kernels, () True elsewhere
  scores: Any         # movement scores of pruned kernels; () zeros elsewhere (and for magnitude)
  inner: Any          # the wrapped optimizer's state
  dense: Any = None   # movement: the pruned kernels' dense weights (masked ones kept); () else


def sparsify(inner, spec: Sparsity) -> "optax.GradientTransformation":
  """`inner` with unstructured pruning by `spec` (see the comment above); the rules are checked
  against the parameter paths at init (a rule matching nothing raises)."""
  import optax  # pylint: disable=g-import-not-at-top
  from lib.peft.labels import path_str  # pylint: disable=g-import-not-at-top

  def which(params):
    paths = set(pruned_paths([path_str(kp) for kp, _ in
                              jax.tree_util.tree_flatten_with_path(params)[0]], spec.rules))
    return jax.tree_util.tree_map_with_path(lambda kp, _: path_str(kp) in paths, params)

  movement = spec.method == "movement"

  def init(params):
    sel = which(params)
    masks = jax.tree.map(lambda p, s: jnp.ones(p.shape if s else (), bool), params, sel)
    scores = jax.tree.map(lambda p, s: jnp.zeros(p.shape if s and movement else (), jnp.float32),
                          params, sel)
    dense = jax.tree.map(lambda p, s: p if s and movement else jnp.zeros((), p.dtype), params, sel)
    return SparsityState(jnp.zeros((), jnp.int32), masks, scores, inner.init(params), dense)

  def update(grads, state, params):
    sel = which(params)
    # The weights the optimizer updates: the dense ones behind a masked kernel (movement).
    dense = jax.tree.map(lambda d, p, on: d if on and movement else p, state.dense, params, sel)
    scores = state.scores
    if movement:   # straight-through: dL/dS = dL/d(W * M) * W, masked weights included
      scores = jax.tree.map(lambda s, g, w, on: s - g * w if on else s, scores, grads, dense, sel)
    due = ((state.count >= spec.begin) & (state.count <= spec.end)
           & ((state.count - spec.begin) % spec.every == 0))

    def recompute():
      leaves = jax.tree.leaves(sel)
      src = jax.tree.leaves(scores if movement else jax.tree.map(jnp.abs, params))
      chosen = [s for s, on in zip(src, leaves) if on]
      new = iter(top_masks(chosen, cubic_sparsity(state.count, spec.target, spec.begin,
                                                  spec.end), spec.scope))
      old = jax.tree.leaves(state.masks)
      return jax.tree.unflatten(jax.tree.structure(state.masks),
                                [next(new) if on else m for m, on in zip(old, leaves)])
    masks = jax.lax.cond(due, recompute, lambda: state.masks)
    grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0), grads, masks)
    updates, inner_state = inner.update(grads, state.inner, dense)
    if not movement:
      updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, masks)
      return updates, SparsityState(state.count + 1, masks, scores, inner_state, state.dense)
    # A kept weight moves by u (params == dense there); a masked one keeps its dense value and
    # its parameter becomes exactly 0; a returning one (parameter 0) gets its dense value back.
    new_dense = jax.tree.map(lambda d, u, m, on: jnp.where(m, d + u, d) if on else d,
                             dense, updates, masks, sel)
    updates = jax.tree.map(
        lambda u, p, d, m, was, on: jnp.where(m, jnp.where(was, u, d), -p) if on else u,
        updates, params, new_dense, masks, state.masks, sel)
    new_dense = jax.tree.map(lambda d, on, old: d if on else old, new_dense, sel, state.dense)
    return updates, SparsityState(state.count + 1, masks, scores, inner_state, new_dense)

  return optax.GradientTransformation(init, update)


def sparsity_of(params, rules) -> dict:
  """{'total': zero fraction of the pruned kernels, path: zero fraction of each}."""
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  paths = pruned_paths(flat, rules)
  zeros = {p: int((flat[p] == 0).sum()) for p in paths}
  out = {p: zeros[p] / flat[p].size for p in paths}
  out["total"] = sum(zeros.values()) / max(sum(flat[p].size for p in paths), 1)
  return out


def sparse_encode(params, rules) -> dict:
  """The pruned kernels in a sparse format: per kernel its nonzero values (in row-major order)
  and a packed bitmask of where they are; {name: array} for np.savez."""
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  out = {}
  for p in pruned_paths(flat, rules):
    nz = flat[p].reshape(-1) != 0
    out[p + ".values"] = flat[p].reshape(-1)[nz]
    out[p + ".bitmask"] = np.packbits(nz)
    out[p + ".shape"] = np.asarray(flat[p].shape, np.int64)
  return out


def sparse_decode(arrays: dict) -> dict:
  """{path: dense kernel} from `sparse_encode`'s arrays."""
  out = {}
  for name in arrays:
    if name.endswith(".values"):
      p = name[:-len(".values")]
      shape = tuple(int(d) for d in arrays[p + ".shape"])
      n = int(np.prod(shape))
      nz = np.unpackbits(arrays[p + ".bitmask"], count=n).astype(bool)
      dense = np.zeros(n, arrays[name].dtype)
      dense[nz] = arrays[name]
      out[p] = dense.reshape(shape)
  return out
