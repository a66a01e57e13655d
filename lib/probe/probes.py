"""Layer-wise probes on frozen hidden states: features, linear/MLP probes vmapped over the layer
axis, control tasks and selectivity (Hewitt & Liang 2019), scalar mix and expected layer
(Tenney et al. 2019)."""

import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lib.data.tokenize import WordPieces, special_wrap
from lib.probe import hooks


# ------------------------------------------------------------------------------ features
def _hidden_fn(module, edit=None):
  @jax.jit
  def run(params, ids, mask):
    batch = {"input_ids": ids, "input_mask": mask}
    _, inter = hooks.apply(module, params, batch, edit)
    return jnp.stack(inter["hidden_states"])                                 # (L+1, B, T, D)
  return run


def _batches(seqs: list, batch: int):
  """Padded (ids, mask) of `seqs` in order, `batch` rows each, lengths bucketed to x16."""
  for lo in range(0, len(seqs), batch):
    part = seqs[lo:lo + batch]
    t = -(-max(len(s) for s in part) // 16) * 16
    ids = np.zeros((batch, t), np.int32)
    mask = np.zeros((batch, t), np.int32)
    for r, s in enumerate(part):
      ids[r, :len(s)], mask[r, :len(s)] = s, 1
    yield part, ids, mask


def word_features(module, params, tokenizer, sentences: Sequence[Sequence[str]],
                  max_len: int = 128, batch: int = 32, pool: str = "first", edit=None):
  """Every hidden state of every word: (L+1, words, D) float32, and the kept sentence indices.

  Args:
    sentences: lists of words.
    max_len: word pieces per row with the special tokens; longer sentences are skipped (counted
      and logged), so word-level labels must be taken from the returned sentence indices.
    pool: "first" (the word's first sub-word) or "mean" (of its sub-words).
    edit: a `hooks` edit applied in the forward pass (e.g. an INLP projection); the states
      from its layer on show its effect.
  """
  if pool not in ("first", "mean"):
    raise ValueError(f"pool: expected 'first' or 'mean', got {pool!r}")
  pieces, (pre, suf) = WordPieces(tokenizer), special_wrap(tokenizer)
  seqs, spans, kept = [], [], []
  for k, words in enumerate(sentences):
    ps = pieces(list(words))
    if len(pre) + sum(len(p) for p in ps) + len(suf) > max_len:
      continue
    starts = np.cumsum([len(pre)] + [len(p) for p in ps])
    seqs.append(np.concatenate([pre] + [list(p) for p in ps] + [suf]).astype(np.int32))
    spans.append(list(zip(starts[:-1], starts[1:])))
    kept.append(k)
  if len(kept) < len(sentences):
    logging.warning("word_features: skipped %d of %d sentences longer than %d pieces",
                    len(sentences) - len(kept), len(sentences), max_len)
  run, out, i = _hidden_fn(module, edit), [], 0
  for part, ids, mask in _batches(seqs, batch):
    h = np.asarray(run(params, ids, mask))                                  # (L+1, B, T, D)
    for r in range(len(part)):
      for a, b in spans[i]:
        out.append(h[:, r, a] if pool == "first" else h[:, r, a:b].mean(1))
      i += 1
  return np.stack(out, 1).astype(np.float32), kept


def sentence_features(module, params, tokenizer, texts: Sequence[str], max_len: int = 128,
                      batch: int = 32):
  """Mean over each sentence's real tokens of every hidden state: (L+1, N, D) float32.

  Sentences over `max_len` pieces are truncated (counted and logged): the mean of a sentence's
  first `max_len` pieces still describes it.
  """
  enc = tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
  full = tokenizer(list(texts))["input_ids"]
  cut = sum(len(a) != len(b) for a, b in zip(enc, full))
  if cut:
    logging.warning("sentence_features: truncated %d of %d texts to %d pieces", cut, len(texts),
                    max_len)
  run, out = _hidden_fn(module), []
  for part, ids, mask in _batches([np.asarray(e, np.int32) for e in enc], batch):
    h = np.asarray(run(params, ids, mask))                                  # (L+1, B, T, D)
    m = mask[None, :, :, None]
    out.append(((h * m).sum(2) / np.maximum(m.sum(2), 1))[:, :len(part)])   # pad rows: 0
  return np.concatenate(out, 1).astype(np.float32)


# ------------------------------------------------------------------------------ labels
def control_labels(types_train: Sequence[str], labels_train, types_eval: Sequence[str],
                   seed: int = 0):
  """Hewitt & Liang's control task: each word type gets one random label, drawn from the
  empirical label distribution of the training words; unseen types get one the same way.

  Returns:
    (control train labels, control eval labels) as int32 arrays.
  """
  labels_train = np.asarray(labels_train)
  rng = np.random.default_rng(seed)
  table = {}
  def label(t):
    if t not in table:
      table[t] = labels_train[rng.integers(len(labels_train))]
    return table[t]
  return (np.array([label(t) for t in types_train], np.int32),
          np.array([label(t) for t in types_eval], np.int32))


def encode(labels: Sequence[str], names=None):
  """(int ids, sorted names) of string labels; with `names`, unknown labels raise."""
  names = sorted(set(labels)) if names is None else list(names)
  index = {n: i for i, n in enumerate(names)}
  missing = sorted(set(labels) - set(index))
  if missing:
    raise ValueError(f"labels {missing[:5]} are not among the training labels {names[:10]}...")
  return np.array([index[x] for x in labels], np.int32), names


# ------------------------------------------------------------------------------ probes
def _init(rng, d: int, c: int, hidden: int) -> dict:
  k1, k2 = jax.random.split(rng)
  if not hidden:
    return {"w": jax.random.normal(k1, (d, c)) * d ** -0.5, "b": jnp.zeros(c)}
  return {"w1": jax.random.normal(k1, (d, hidden)) * d ** -0.5, "b1": jnp.zeros(hidden),
          "w2": jax.random.normal(k2, (hidden, c)) * hidden ** -0.5, "b2": jnp.zeros(c)}


def probe_logits(p: dict, x):
  """A linear probe (w, b) or a one-hidden-layer ReLU MLP (w1, b1, w2, b2): (..., D) -> (..., C)."""
  if "w" in p:
    return x @ p["w"] + p["b"]
  return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _fit(loss, params, data, steps: int, batch: int, lr: float, rng):
  """Adam on minibatches (drawn with replacement) of `data` (a tuple of arrays over axis 0)."""
  opt = optax.adam(lr)
  idx = jax.random.randint(rng, (steps, batch), 0, data[0].shape[0])

  def step(carry, ix):
    p, s = carry
    g = jax.grad(loss)(p, *(a[ix] for a in data))
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), idx)
  return params


def standardize(x_train, *others):
  """Per layer and feature, with the training set's mean and std: x (L, N, D) each."""
  mu = x_train.mean(1, keepdims=True)
  sd = x_train.std(1, keepdims=True) + 1e-6
  return tuple((x - mu) / sd for x in (x_train,) + others)


def _xent(p, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(probe_logits(p, x), y).mean()


def train_layer_probes(x, y, num_classes: int, *, hidden: int = 0, steps: int = 1000,
                       batch: int = 256, lr: float = 1e-3, seed: int = 0) -> dict:
  """One probe per hidden state, trained at once: vmapped over the layer axis in one jit.

  Args:
    x: (L, N, D) standardized features; y: (N,) int labels.
    hidden: 0 = linear probe, else the MLP's width.

  Returns:
    params with a leading layer axis.
  """
  rngs = jax.random.split(jax.random.key(seed), x.shape[0] + 1)

  @jax.jit
  def run(x, y, rngs):
    def one(xl, init_rng):
      p = _init(init_rng, x.shape[-1], num_classes, hidden)
      return _fit(_xent, p, (xl, y), steps, batch, lr, rngs[0])   # same minibatches per layer
    return jax.vmap(one)(x, rngs[1:])

  return run(jnp.asarray(x), jnp.asarray(y), rngs)


@jax.jit
def layer_accuracy(params, x, y):
  """(L,) accuracy of each layer's probe on its own features x (L, N, D)."""
  pred = jnp.argmax(jax.vmap(probe_logits)(params, x), -1)                 # (L, N)
  return jnp.mean(pred == y[None], axis=1)


def train_scalar_mix(x, y, num_classes: int, *, hidden: int = 0, steps: int = 1000,
                     batch: int = 256, lr: float = 1e-3, seed: int = 0) -> dict:
  """Tenney et al.'s scalar mix: gamma * sum_l softmax(s)_l x_l, then a probe, trained jointly."""
  r1, r2 = jax.random.split(jax.random.key(seed))
  p = {"s": jnp.zeros(x.shape[0]), "gamma": jnp.ones(()),
       "probe": _init(r1, x.shape[-1], num_classes, hidden)}

  def loss(p, xb, yb):   # xb (B, L, D): the minibatch axis first for _fit
    return _xent(p["probe"], mix(p, jnp.moveaxis(xb, 1, 0)), yb)

  run = jax.jit(lambda p, x, y: _fit(loss, p, (jnp.moveaxis(x, 0, 1), y), steps, batch, lr, r2))
  return run(p, jnp.asarray(x), jnp.asarray(y))


def mix(p: dict, x):
  """The scalar mix of x (L, N, D) -> (N, D)."""
  return p["gamma"] * jnp.einsum("l,lnd->nd", jax.nn.softmax(p["s"]), x)


def expected_layer(p: dict) -> float:
  """sum_l l * softmax(s)_l: the centre of gravity of the mixing weights (Tenney et al.)."""
  w = np.asarray(jax.nn.softmax(p["s"]))
  return float((np.arange(len(w)) * w).sum())


def mix_accuracy(p: dict, x, y) -> float:
  pred = jnp.argmax(probe_logits(p["probe"], mix(p, jnp.asarray(x))), -1)
  return float(jnp.mean(pred == jnp.asarray(y)))


def probe_task(x_train, y_train, x_eval, y_eval, num_classes: int, *, control=None,
               hidden: int = 0, steps: int = 1000, batch: int = 256, lr: float = 1e-3,
               seed: int = 0) -> dict:
  """Layer-wise probes, their control task and the scalar mix of one task.

  Args:
    x_train, x_eval: (L, N, D) raw features; y_train, y_eval: (N,) int labels.
    control: (control train labels, control eval labels) or None.

  Returns:
    a JSON-able dict: accuracy per layer, control accuracy and selectivity per layer (with a
    control), majority baseline, mix weights, expected layer, mix accuracy, sizes.
  """
  xt, xe = standardize(np.asarray(x_train), np.asarray(x_eval))
  xt, xe = jnp.asarray(xt), jnp.asarray(xe)
  kw = dict(hidden=hidden, steps=steps, batch=batch, lr=lr, seed=seed)
  p = train_layer_probes(xt, y_train, num_classes, **kw)
  acc = np.asarray(layer_accuracy(p, xe, jnp.asarray(y_eval)))
  counts = np.bincount(np.asarray(y_train), minlength=num_classes)
  out = dict(accuracy=acc.tolist(), n_train=int(len(y_train)), n_eval=int(len(y_eval)),
             num_classes=num_classes,
             majority=float(np.mean(np.asarray(y_eval) == counts.argmax())))
  if control is not None:
    pc = train_layer_probes(xt, control[0], num_classes, **kw)
    cacc = np.asarray(layer_accuracy(pc, xe, jnp.asarray(control[1])))
    out.update(control_accuracy=cacc.tolist(), selectivity=(acc - cacc).tolist())
  m = train_scalar_mix(xt, y_train, num_classes, **kw)
  out.update(mix_weights=np.asarray(jax.nn.softmax(m["s"])).tolist(),
             expected_layer=expected_layer(m), mix_accuracy=mix_accuracy(m, xe, y_eval))
  return out
