"""Iterative nullspace projection (INLP, Ravfogel et al. 2020) and amnesic interventions
(Elazar et al. 2021): remove a linearly decodable property, with a random-directions control."""

import jax
import jax.numpy as jnp
import numpy as np

from lib.probe import probes


def nullspace_projection(directions) -> np.ndarray:
  """I - Q Q^T, Q an orthonormal basis of the span of `directions` (D, k): (D, D)."""
  d = np.asarray(directions, np.float64)
  u, s, _ = np.linalg.svd(d, full_matrices=False)
  q = u[:, s > s.max() * 1e-6] if s.size and s.max() > 0 else u[:, :0]
  return (np.eye(d.shape[0]) - q @ q.T).astype(np.float32)


def random_projection(dim: int, rank: int, seed: int = 0) -> np.ndarray:
  """The control: I - R R^T for `rank` random orthonormal directions (D, D)."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, rank)))
  return (np.eye(dim) - q @ q.T).astype(np.float32)


def inlp(x_train, y_train, x_eval, y_eval, num_classes: int, *, iterations: int = 10,
         steps: int = 600, batch: int = 256, lr: float = 1e-2, seed: int = 0,
         stop_margin: float = 0.01) -> dict:
  """INLP on features (N, D): train a linear probe, remove its weight directions, repeat; stop
  early once a probe is within `stop_margin` of the majority baseline (its directions are not
  removed: the property is gone already, and more removed rank only hurts the comparison with a
  same-rank random control).

  Features are centred with the training mean and scaled by one global scalar (orthogonality
  is kept, so the projection applies to the raw features: x' = mu + (x - mu) P).

  Returns:
    dict: P (D, D), mean (D,), rank, accuracy (eval accuracy of the probe trained at each
    iteration, before its directions are removed), final_accuracy (a fresh probe after all),
    majority.
  """
  mu = x_train.mean(0)
  scale = float((x_train - mu).std()) + 1e-12
  xt, xe = (x_train - mu) / scale, (x_eval - mu) / scale
  dims, accs, proj = np.zeros((x_train.shape[1], 0), np.float32), [], np.eye(x_train.shape[1])
  yt, ye = jnp.asarray(y_train), jnp.asarray(y_eval)
  counts = np.bincount(np.asarray(y_train), minlength=num_classes)
  majority = float(np.mean(np.asarray(y_eval) == counts.argmax()))
  for i in range(iterations):
    acc, w = _probe(xt @ proj, yt, xe @ proj, ye, num_classes, steps, batch, lr, seed + i)
    accs.append(acc)
    if acc <= majority + stop_margin:
      break
    dims = np.concatenate([dims, proj @ w], 1)   # the directions in the original space
    proj = nullspace_projection(dims)
  final, _ = _probe(xt @ proj, yt, xe @ proj, ye, num_classes, steps, batch, lr, seed + 10_000)
  return dict(P=proj, mean=mu.astype(np.float32), rank=int(x_train.shape[1] - round(
      np.trace(proj))), accuracy=accs, final_accuracy=final, majority=majority)


def _probe(xt, yt, xe, ye, c, steps, batch, lr, seed):
  """(eval accuracy, weight (D, C)) of a linear probe."""
  p = probes.train_layer_probes(jnp.asarray(xt)[None], yt, c, steps=steps, batch=batch, lr=lr,
                                seed=seed)
  acc = float(probes.layer_accuracy(p, jnp.asarray(xe)[None], ye)[0])
  return acc, np.asarray(p["w"][0])


def projection_edit(layer: int, proj, mean):
  """A hooks edit applying x' = mean + (x - mean) P to the residual stream at `layer`."""
  proj, mean = jnp.asarray(proj), jnp.asarray(mean)

  def edit(site, i, x):
    if site == "resid" and i == layer:
      return (mean + (x - mean) @ proj).astype(x.dtype)
    return x
  return edit
