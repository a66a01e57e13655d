"""Few-shot learning pieces: K-shot splits, contrastive pairs and loss (SetFit), a logistic-
regression head on embeddings, and the cloze scorer of prompt-based methods (PET / LM-BFF)."""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


# ----------------------------------------------------------------------------- K-shot splits

def kshot_split(labels: Sequence, k: int, seed: int, dev_k: int = -1) -> tuple:
  """(train indices, dev indices): `k` training and `dev_k` dev examples per class, disjoint.

  Both are drawn from the given (training) labels only, so the evaluation splits never leak in.
  One permutation per class and seed: training takes its head, dev its tail, so a larger K
  extends a smaller K's training set (a learning curve over nested samples) and never touches
  the dev examples of any K <= n_c / 2.

  Args:
    labels: the label of every training example (any hashable values).
    k: training examples per class.
    seed: the sample (same seed, same labels -> same indices).
    dev_k: dev examples per class (< 0: the same as k, LM-BFF's protocol).

  Raises:
    ValueError: k < 1, or a class with fewer than k + dev_k examples (named).
  """
  dev_k = k if dev_k < 0 else dev_k
  if k < 1:
    raise ValueError(f"fewshot k={k}: expected at least 1 example per class")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  train, dev = [], []
  for c in sorted(set(labels.tolist())):
    idx = rng.permutation(np.flatnonzero(labels == c))
    if len(idx) < k + dev_k:
      raise ValueError(f"fewshot: class {c!r} has {len(idx)} training examples; k={k} + "
                       f"dev_k={dev_k} are needed")
    train.append(idx[:k])
    dev.append(idx[len(idx) - dev_k:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(dev))


# ----------------------------------------------------------------------------- SetFit

def contrastive_pairs(labels: Sequence, iterations: int, seed: int) -> tuple:
  """SetFit's pair generation: per iteration and example, one positive (same label, another
  example when the class has one) and one negative (a different label) partner.

  Returns:
    (a, b, target): int arrays of example indices and float32 targets (1 same, 0 different),
    shuffled; exactly half of the pairs are positive.

  Raises:
    ValueError: fewer than two classes (no negative pair exists).
  """
  labels = np.asarray(labels)
  classes = sorted(set(labels.tolist()))
  if len(classes) < 2:
    raise ValueError(f"contrastive pairs need at least two classes; got {classes}")
  rng = np.random.default_rng(seed)
  members = {c: np.flatnonzero(labels == c) for c in classes}
  others = {c: np.flatnonzero(labels != c) for c in classes}
  a, b, t = [], [], []
  for _ in range(iterations):
    for i, c in enumerate(labels.tolist()):
      same = members[c][members[c] != i] if len(members[c]) > 1 else members[c]
      a += [i, i]
      b += [rng.choice(same), rng.choice(others[c])]
      t += [1.0, 0.0]
  order = rng.permutation(len(a))
  return (np.asarray(a)[order], np.asarray(b)[order], np.asarray(t, np.float32)[order])


def mean_pool(hidden, mask):
  """Mean of the hidden states over the real tokens: (B, T, D), (B, T) -> (B, D) float32."""
  m = mask[..., None].astype(jnp.float32)
  return (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def cosine_similarity_loss(u, v, target):
  """sentence-transformers' CosineSimilarityLoss: mean squared error of cos(u, v) to target."""
  cos = (u * v).sum(-1) / jnp.maximum(jnp.linalg.norm(u, axis=-1) * jnp.linalg.norm(v, axis=-1),
                                      1e-12)
  return jnp.mean((cos - target) ** 2), cos


# ----------------------------------------------------------------------------- linear head

def fit_logistic_regression(x, y, num_classes: int, c: float = 1.0, iterations: int = 200):
  """Multinomial logistic regression (sklearn's objective: sum of cross-entropies + ||W||^2 / 2C,
  the bias unpenalised) fitted with L-BFGS on the full batch.

  Args:
    x: (N, D) features; y: (N,) int labels in [0, num_classes).
    c: inverse regularisation strength.

  Returns:
    (W (D, C), b (C,)) as numpy float32.
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
  return tuple(np.asarray(p) for p in _lbfgs(x, y, params, c, iterations))


def logistic_objective(params, x, y, c):
  """The regularised negative log-likelihood that fit_logistic_regression minimises."""
  w, b = params
  nll = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).sum()
  return nll + 0.5 / c * (w ** 2).sum()


@functools.partial(jax.jit, static_argnums=(4,))
def _lbfgs(x, y, params, c, iterations):
  fn = lambda p: logistic_objective(p, x, y, c)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fn)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=fn)
    return (optax.apply_updates(p, updates), state), None
  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=iterations)
  return params


def predict_linear(x, head) -> np.ndarray:
  """argmax of x @ W + b: (N, D) -> (N,) class ids."""
  w, b = head
  return np.argmax(np.asarray(x, np.float32) @ w + b, -1)


# ----------------------------------------------------------------------------- cloze (PET)

def verbalizer_log_probs(logits, mask_positions, verbalizer_ids):
  """Log-probabilities of the label words at each row's mask, normalised over the label words
  only (LM-BFF / PET): no other vocabulary entry enters the score.

  Args:
    logits: (B, T, V) MLM logits.
    mask_positions: (B,) the index of each row's [MASK].
    verbalizer_ids: (C,) one token id per class.

  Returns:
    (B, C) log-softmax over the C label words.
  """
  at_mask = jnp.take_along_axis(logits, mask_positions[:, None, None], axis=1)[:, 0]   # (B, V)
  words = at_mask[:, jnp.asarray(verbalizer_ids)].astype(jnp.float32)                 # (B, C)
  return jax.nn.log_softmax(words, axis=-1)


def ensemble_patterns(log_probs: Sequence, weights=None):
  """PET's ensemble of patterns: the (weighted) mean of per-pattern (B, C) label log-probs."""
  stacked = jnp.stack([jnp.asarray(lp) for lp in log_probs])             # (P, B, C)
  w = jnp.ones(len(log_probs)) if weights is None else jnp.asarray(weights, jnp.float32)
  return jnp.tensordot(w / w.sum(), stacked, axes=1)


def cloze_texts(template: str, sentences: Sequence[str], mask_token: str) -> list:
  """The pattern applied to each sentence: '{sentence}' and '{mask}' in `template` are replaced.

  Raises:
    ValueError: a template without exactly one '{mask}' or without '{sentence}'.
  """
  if template.count("{mask}") != 1 or "{sentence}" not in template:
    raise ValueError(f"fewshot cloze template {template!r}: expected one '{{mask}}' and a "
                     "'{sentence}'")
  return [template.replace("{sentence}", s).replace("{mask}", mask_token) for s in sentences]
