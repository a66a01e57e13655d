"""Integrated gradients (Sundararajan et al. 2017) over the word embeddings, with completeness."""

import jax
import jax.numpy as jnp
import numpy as np

from lib.probe import hooks


def integrated_gradients(fn, x, baseline, steps: int = 64):
  """IG of a scalar fn along the straight path baseline -> x (Gauss-Legendre quadrature).

  Args:
    fn: array shaped like x -> scalar.
    x, baseline: (..., D) arrays.
    steps: quadrature nodes (Gauss-Legendre: exact for polynomial paths of degree 2*steps-1).

  Returns:
    (attributions summed over the last axis (...,), f(x) - f(baseline), completeness error
    |sum(attr) - (f(x) - f(baseline))| / |f(x) - f(baseline)|).
  """
  nodes, weights = np.polynomial.legendre.leggauss(steps)
  alphas, w = jnp.asarray((nodes + 1) / 2), jnp.asarray(weights / 2)
  delta = x - baseline
  grads = jax.vmap(lambda a: jax.grad(fn)(baseline + a * delta))(alphas)  # (S, ..., D)
  attr = delta * jnp.tensordot(w, grads, axes=1)
  total = float(fn(x) - fn(baseline))
  err = abs(float(attr.sum()) - total) / max(abs(total), 1e-12)
  return np.asarray(attr.sum(-1)), total, err


def embedding_fn(module, params, batch: dict, readout):
  """f(word embeddings (T, D)) -> scalar: the model on one example with its word embeddings
  replaced (positions and token types added by the model as usual), then `readout(outputs)`.

  Returns:
    (fn, the example's own word embeddings (T, D)).
  """
  one = {k: v[:1] for k, v in batch.items()}
  _, acts = hooks.record(module, params, one)

  def fn(emb):
    edit = lambda site, i, v: emb[None].astype(v.dtype) if site == "embed" else v
    out, _ = hooks.apply(module, params, one, edit)
    return readout(out)

  return fn, acts["embed"][0]
