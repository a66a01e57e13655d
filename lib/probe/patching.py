"""Activation patching: exact (layer x position) grids with prefix reuse, and attribution patching.

A clean run and a corrupted run of the same examples (corruption: Gaussian noise on the
subject's word embeddings as ROME does, and/or a paired corrupted input) are recorded once. A
cell (kind, layer, position) restores the clean value of one site (`hooks.SITES`: the residual
stream "resid", the attention output "attn" or the MLP output "mlp", the latter two over a window
of layers) at one position in the corrupted run, and reads a scalar score (e.g. the probability
of the correct answer). Layers below the first patched one compute exactly what the corrupted
run computed, so the grid starts each cell at its first patched layer from the cached corrupted
residual state (`hooks`' start/start_state), batching every position and example of that start
into one jitted call; `naive_grid` runs one full jitted forward per cell for comparison.
"""

import dataclasses
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lib.probe import hooks

KINDS = ("resid", "attn", "mlp")
Score = Callable[[dict, dict], jax.Array]   # (model outputs, batch rows) -> (R,) scores


def window_layers(layer: int, window: int, num_layers: int) -> range:
  """The layers restored for an attn/mlp cell at `layer`: ROME's window, clipped to the model."""
  return range(max(0, layer - window // 2), min(num_layers, layer + (window + 1) // 2))


def embedding_noise(rng, subject_mask, dim: int, std: float, scale: float = 3.0):
  """ROME's corruption: N(0, (scale * std)^2) noise on the subject tokens' word embeddings.

  Args:
    rng: a jax key.
    subject_mask: (N, T) 1 at the subject's tokens.
    dim: the model's hidden size D.
    std: the standard deviation of the model's word embeddings (ROME: over a corpus' subjects).
    scale: ROME's 3.

  Returns:
    (N, T, D) noise, zero outside the subject.
  """
  mask = jnp.asarray(subject_mask, jnp.float32)[..., None]
  return scale * std * jax.random.normal(rng, mask.shape[:2] + (dim,)) * mask


def _rows(tree, ex):
  return jax.tree_util.tree_map(lambda a: a[ex], tree)


@dataclasses.dataclass
class Patcher:
  """Patching sweeps of one model with one score.

  Attributes:
    module, params: the model (a Bert/Gpt linen module, remat 'none') and its parameters.
    score: (outputs, batch rows) -> (R,) scalar per row; batch rows carry any target fields.
  """
  module: object
  params: dict
  score: Score

  def __post_init__(self):
    self.num_layers = self.module.args.num_layers
    self._jit = {}

  # ------------------------------------------------------------------ runs
  def _base(self, noise):
    return (lambda site, i, x: x + noise.astype(x.dtype) if site == "embed" else x)

  def record(self, batch: dict, noise=None) -> tuple:
    """(scores (N,), acts) of one run; `noise` (N, T, D) is added to the word embeddings."""
    fn = self._jit.get("record")
    if fn is None:
      def rec(params, batch, noise):
        base = None if noise is None else self._base(noise)
        out, acts = hooks.record(self.module, params, batch, base)
        return self.score(out, batch), acts
      fn = self._jit["record"] = jax.jit(rec)
    return fn(self.params, batch, noise)

  def _patched_fn(self, start: int):
    """Jitted (params, batch, noise, clean, start_state, ex, masks) -> (R,) scores."""
    if start in self._jit:
      return self._jit[start]

    def run(params, batch, noise, clean, start_state, ex, masks):
      rows = _rows(batch, ex)
      base = (lambda s, i, x: x) if noise is None else self._base(noise[ex])

      def edit(site, i, x):
        x = base(site, i, x)
        if site in masks:
          x = jnp.where(masks[site][:, i, :, None], clean[site][i][ex], x)   # (R, T, D)
        return x

      state = None if start == 0 else start_state[ex]
      out, _ = hooks.apply(self.module, params, rows, edit, start, state)
      return self.score(out, rows)

    self._jit[start] = jax.jit(run)
    return self._jit[start]

  def patch(self, batch, noise, clean_acts, masks, ex=None, corrupt_acts=None, start=0):
    """Scores of the corrupted run with clean values restored where `masks` say.

    Args:
      batch: the corrupted inputs (N examples), with the score's target fields.
      noise: (N, T, D) embedding noise of the corrupted run, or None.
      clean_acts: `record` acts of the clean run.
      masks: site -> (R, layers, T) bool: restore that site, layer, position in row r.
      ex: (R,) example of each row (default: row r = example r).
      corrupt_acts: `record` acts of the corrupted run (needed when start > 0).
      start: first layer computed; layers below reuse corrupt_acts["resid"][start].
    """
    ex = jnp.arange(batch["input_ids"].shape[0]) if ex is None else jnp.asarray(ex)
    state = None if start == 0 else corrupt_acts["resid"][start]
    return self._patched_fn(start)(self.params, batch, noise, clean_acts, state, ex, masks)

  # ------------------------------------------------------------------ grids
  def cells(self, window: int = 1) -> list:
    """[(kind, layer, first layer restored)] of a full grid."""
    out = [("resid", l, l) for l in range(self.num_layers + 1)]
    for kind in ("attn", "mlp"):
      out += [(kind, l, window_layers(l, window, self.num_layers)[0])
              for l in range(self.num_layers)]
    return out

  def _cell_masks(self, cells, t: int, window: int) -> dict:
    """Masks for rows (cell, position), cell-major: (len(cells) * t, layers, t) per site."""
    n_l = self.num_layers
    masks = {"resid": np.zeros((len(cells), t, n_l + 1, t), bool),
             "attn": np.zeros((len(cells), t, n_l, t), bool),
             "mlp": np.zeros((len(cells), t, n_l, t), bool)}
    for c, (kind, layer, _) in enumerate(cells):
      layers = [layer] if kind == "resid" else list(window_layers(layer, window, n_l))
      for pos in range(t):
        masks[kind][c, pos, layers, pos] = True
    return {k: jnp.asarray(v.reshape((-1,) + v.shape[2:])) for k, v in masks.items()}

  def grid(self, clean: dict, corrupt: dict, noise=None, window: int = 1,
           chunk: int = 64) -> dict:
    """The exact grid by prefix reuse: one jitted call per (first patched layer, chunk).

    Args:
      clean, corrupt: input batches (N, T) (equal when the corruption is `noise` alone).
      noise: (N, T, D) embedding noise of the corrupted run, or None.
      window: layers restored around each attn/mlp cell.
      chunk: examples per call (rows = chunk x cells x T).

    Returns:
      dict: kind -> (N, layers, T) scores (resid: L+1 layers), "clean"/"corrupt" -> (N,),
      NaN at padding positions.
    """
    clean_score, clean_acts = self.record(clean)
    corrupt_score, corrupt_acts = self.record(corrupt, noise)
    n, t = corrupt["input_ids"].shape
    by_start = {}
    for cell in self.cells(window):
      by_start.setdefault(cell[2], []).append(cell)
    out = {k: np.full((n, self.num_layers + (k == "resid"), t), np.nan) for k in KINDS}
    for start, cells in by_start.items():
      masks = self._cell_masks(cells, t, window)
      per_ex = len(cells) * t
      for lo in range(0, n, chunk):
        exs = np.minimum(np.arange(lo, lo + chunk), n - 1)   # the last chunk padded: one shape
        ex = np.repeat(exs, per_ex)
        m = {k: jnp.tile(v, (chunk, 1, 1)) for k, v in masks.items()}
        s = np.asarray(self.patch(corrupt, noise, clean_acts, m, ex, corrupt_acts, start))
        s = s.reshape(chunk, len(cells), t)[: min(chunk, n - lo)]
        for c, (kind, layer, _) in enumerate(cells):
          out[kind][lo:lo + chunk, layer] = s[:, c]
    return _masked(out, corrupt, clean_score, corrupt_score)

  def naive_grid(self, clean: dict, corrupt: dict, noise=None, window: int = 1) -> dict:
    """The same grid with one full jitted forward per (example, cell, position): the baseline."""
    clean_score, clean_acts = self.record(clean)
    corrupt_score, _ = self.record(corrupt, noise)
    n, t = corrupt["input_ids"].shape
    cells = self.cells(window)
    masks = self._cell_masks(cells, t, window)
    out = {k: np.full((n, self.num_layers + (k == "resid"), t), np.nan) for k in KINDS}
    for e in range(n):
      for c, (kind, layer, _) in enumerate(cells):
        for pos in range(t):
          r = c * t + pos
          m = {k: v[r:r + 1] for k, v in masks.items()}
          out[kind][e, layer, pos] = float(self.patch(corrupt, noise, clean_acts, m, [e])[0])
    return _masked(out, corrupt, clean_score, corrupt_score)

  # ------------------------------------------------------------------ attribution patching
  def attribution(self, clean: dict, corrupt: dict, noise=None, window: int = 1) -> dict:
    """Attribution patching: grad of the corrupted score . (clean - corrupted) per site.

    One forward + backward of the corrupted run approximates every cell's change of the score
    to first order; attn/mlp cells sum their window's layers. Same layout as `grid` (the
    values are estimated score changes, add "corrupt" to compare with the grid's scores).
    """
    clean_score, clean_acts = self.record(clean)
    corrupt_score, corrupt_acts = self.record(corrupt, noise)
    base = (lambda s, i, x: x) if noise is None else self._base(noise)

    def total(deltas):
      def edit(site, i, x):
        x = base(site, i, x)
        return x + deltas[site][i] if site in deltas else x
      out, _ = hooks.apply(self.module, self.params, corrupt, edit)
      return jnp.sum(self.score(out, corrupt))

    zeros = {k: jnp.zeros_like(corrupt_acts[k]) for k in KINDS}
    grads = jax.jit(jax.grad(total))(zeros)
    est = {k: np.asarray(jnp.einsum("lntd,lntd->nlt", clean_acts[k] - corrupt_acts[k], grads[k]))
           for k in KINDS}
    for k in ("attn", "mlp"):
      est[k] = np.stack([est[k][:, list(window_layers(l, window, self.num_layers))].sum(1)
                         for l in range(self.num_layers)], axis=1)
    return _masked(est, corrupt, clean_score, corrupt_score)


def _masked(grid: dict, batch: dict, clean_score, corrupt_score) -> dict:
  pad = ~np.asarray(batch.get("input_mask", np.ones(batch["input_ids"].shape)), bool)
  out = {k: np.where(pad[:, None, :], np.nan, np.asarray(v, np.float64)) for k, v in grid.items()}
  out["clean"] = np.asarray(clean_score, np.float64)
  out["corrupt"] = np.asarray(corrupt_score, np.float64)
  return out


def spearman(exact: dict, approx: dict) -> dict:
  """Spearman rank correlation per kind (and "all") between exact indirect effects (grid -
  corrupt) and attribution estimates, over the non-padding cells."""
  from scipy import stats   # pylint: disable=import-outside-toplevel
  res, xs, ys = {}, [], []
  for k in KINDS:
    x = (exact[k] - exact["corrupt"][:, None, None]).ravel()
    y = approx[k].ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    res[k] = float(stats.spearmanr(x[ok], y[ok]).statistic)
    xs.append(x[ok])
    ys.append(y[ok])
  res["all"] = float(stats.spearmanr(np.concatenate(xs), np.concatenate(ys)).statistic)
  return res


def timed(fn, *args, **kwargs) -> tuple:
  """(result, wall seconds) of fn, with device work finished."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - t0


# ROME's token roles, plus the tokens before the subject (ROME's prompts start with it).
ROLES = ("first token", "before subject", "subject first", "subject middle", "subject last",
         "first after subject", "further after", "last token")


def token_roles(subject_mask, input_mask) -> np.ndarray:
  """ROME's alignment of positions across examples: each position's index in ROLES (-1: pad).

  The first and last real tokens keep their own roles unless they belong to the subject.
  """
  subj, real = np.asarray(subject_mask, bool), np.asarray(input_mask, bool)
  roles = np.full(subj.shape, -1)
  for n in range(subj.shape[0]):
    s = np.flatnonzero(subj[n])
    last = int(real[n].sum()) - 1
    for t in range(last + 1):
      if subj[n, t]:
        roles[n, t] = 2 if t == s[0] else 4 if t == s[-1] else 3
      else:
        roles[n, t] = (0 if t == 0 else 7 if t == last else 1 if t < s[0] else
                       5 if t == s[-1] + 1 else 6)
  return roles


def role_average(effect, roles) -> np.ndarray:
  """Mean of effect (N, layers, T) over the positions of each role: (layers, len(ROLES)), NaN
  where no example has that role."""
  out = np.full((effect.shape[1], len(ROLES)), np.nan)
  for r in range(len(ROLES)):
    n, t = np.nonzero(roles == r)
    if len(n):
      out[:, r] = np.nanmean(effect[n, :, t], axis=0)
  return out


def compare_grids(patcher: Patcher, batch: dict, noise, window: int, n: int) -> dict:
  """The per-cell loop and the prefix-reuse grid on the first n examples, each compiled first
  and then timed in this process, and their largest absolute difference.

  Returns:
    dict: examples, cells (per example, positions included), per_cell_s, prefix_reuse_s,
    speedup, max_abs_diff.
  """
  def first(m):
    small = {k: v[:m] for k, v in batch.items()}
    return small, small, None if noise is None else noise[:m], window

  times, grids = {}, {}
  runs = (("per_cell_s", patcher.naive_grid, {}), ("prefix_reuse_s", patcher.grid, dict(chunk=n)))
  patcher.naive_grid(*first(1))                 # compile: the loop's one call shape, ...
  patcher.grid(*first(n), chunk=n)              # ... the grid's and the n-example records
  for name, fn, kw in runs:
    grids[name], times[name] = timed(fn, *first(n), **kw)
  diff = max(float(np.nanmax(np.abs(grids["per_cell_s"][k] - grids["prefix_reuse_s"][k])))
             for k in KINDS)
  return dict(examples=n, cells=len(patcher.cells(window)) * batch["input_ids"].shape[1],
              speedup=times["per_cell_s"] / times["prefix_reuse_s"], max_abs_diff=diff, **times)
