"""SetFit-style contrastive task for tagging: the encoder is fine-tuned on word pairs (same or
different tag) with a cosine-similarity loss on the words' hidden states; a logistic-regression
tagger on the training words' embeddings predicts one tag per word, scored with entity F1.

Config: a token-classification data block and the `setfit` block of lib/tasks/contrastive (plus
outside_ratio: 'O' anchors per entity-word anchor; c_grid: the tagger's C values, one chosen by
K-shot dev F1). A word is its first sub-word's last hidden
state (as the token-classification head reads it). Single-process evaluator.
"""

import os

import jax.numpy as jnp
import numpy as np

from lib import atomic, data, fewshot, fewshot_ner, reporting, train
from lib.data import pipeline
from lib.tasks import common, contrastive, ner, supervised

HEAD = None
METRIC, MODE = "f1", "max"         # entity F1 of the tagger on the dev set
RESTORE_BEST = False               # SetFit reports the final encoder
# Batch: input_ids, input_mask, token_type_ids (B, 2, T) int32 (the sentences of the two words);
# positions (B, 2) int32 (each word's first sub-word); target (B,) float32 (1 = same tag).


class WordPairIterator(contrastive.PairIterator):
  """Batches of word pairs (token_pairs), a new deterministic set each epoch (resumable).

  words: (window index, position, tag id) of every labelled training word."""

  kind = "word_pairs"

  def __init__(self, windows, words, outside: int, batch_size: int, iterations: int, seed: int,
               pad_id: int, outside_ratio: float = 1.0, bucket: int = 16):
    # pylint: disable-next=super-init-not-called  # _setup is the shared part
    self.windows, self.words, self.outside, self.outside_ratio = windows, words, outside, \
        outside_ratio
    labels = np.array([w[2] for w in words])
    self._setup(labels, anchors(labels, outside, outside_ratio), batch_size, iterations, seed,
                pad_id, bucket)

  def make_pairs(self, seed: int):
    return fewshot_ner.token_pairs(self.labels, self.outside, self.iterations, seed,
                                   self.outside_ratio)

  def sequence(self, i: int):
    return self.windows[self.words[i][0]]["input_ids"]

  def extras(self, a, b) -> dict:
    """positions (B, 2): each word's first sub-word in its sentence."""
    return {"positions": np.array([[self.words[i][1], self.words[j][1]] for i, j in zip(a, b)],
                                  np.int32).reshape(len(a), 2)}


def anchors(labels, outside: int, outside_ratio: float) -> int:
  """Anchor words per iteration of token_pairs: every entity word and outside_ratio times as
  many 'O' words (at most all of them)."""
  labels = np.asarray(labels)
  entity = int((labels != outside).sum())
  return entity + min(int((labels == outside).sum()), int(round(outside_ratio * max(entity, 1))))


def labelled_words(windows) -> list:
  """(window index, position, tag id) of every position with a label (first sub-words)."""
  return [(w, int(p), int(lab)) for w, win in enumerate(windows)
          for p, lab in enumerate(np.asarray(win["labels"])) if lab >= 0]


def make_data(cfg, tokenizer, workdir=None) -> supervised.Data:
  """Word pairs of the training split for training; train, validation and test for the tagger."""
  del workdir
  kw = supervised.data_kwargs(cfg.data, "train")
  src = data.source_of(kw)
  windows, _ = pipeline.token_cls_features(
      src, "train", tokenizer, max_len=cfg.data.max_len, stride=cfg.data.stride, label_all=False,
      owned_labels_only=True, cache_dir=kw.get("cache_dir"))
  names, words = list(src.label_names), labelled_words(windows)
  outside, ratio = names.index("O"), cfg.setfit.outside_ratio
  r = contrastive.iterations(cfg.setfit, anchors([w[2] for w in words], outside, ratio))
  pairs = WordPairIterator(windows, words, outside, cfg.data.batch_size, r, cfg.seed,
                           tokenizer.pad_token_id, ratio)
  evals = {s: data.from_config(supervised.data_kwargs(cfg.data, s), tokenizer, s, train=False)
           for s in ("train", "validation", "test")}
  return supervised.Data(pairs, evals, names, {"pairs_per_epoch": len(pairs)
                                               * cfg.data.batch_size}, src.name)


def make_loss(module, cfg=None):
  """loss_fn(params, batch, rng, train) -> (cosine-similarity MSE of the word pairs, metrics)."""
  del cfg

  def loss_fn(params, batch, rng, train_mode):
    flat = contrastive._flat(batch)   # pylint: disable=protected-access
    out, _ = common.apply_model(module, params, flat, rng, train_mode)
    pos = batch["positions"].reshape(-1)                                      # (2B,)
    words = jnp.take_along_axis(out["last_hidden_state"], pos[:, None, None], axis=1)[:, 0]
    words = words.astype(jnp.float32).reshape(batch["target"].shape[0], 2, -1)
    loss, cos = fewshot.cosine_similarity_loss(words[:, 0], words[:, 1], batch["target"])
    tgt = batch["target"]
    gap = (jnp.where(tgt > 0.5, cos, 0).sum() / jnp.maximum(tgt.sum(), 1)
           - jnp.where(tgt < 0.5, cos, 0).sum() / jnp.maximum((1 - tgt).sum(), 1))
    return loss, {"loss": loss, "cos_gap": gap}
  return loss_fn


def make_token_embed_fn(module, normalize: bool):
  """embed(params, batch) -> (B, T, D) hidden states (optionally L2-normalised per token)."""
  def embed(params, batch):
    out, _ = common.apply_model(module, params, batch)
    e = out["last_hidden_state"].astype(jnp.float32)
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12) if normalize else e
  return embed


class Evaluator:
  """Embeds the words of each split, fits the logistic-regression tagger on the training words
  and scores it with entity F1 (lib/tasks/ner); final() keeps the tagger, write() saves it
  (head.npz) with the report and the CoNLL predictions."""

  def __init__(self, run):
    self.run, self.cfg = run, run.cfg
    self.step_fn = train.make_eval_step(make_token_embed_fn(run.module, run.cfg.setfit.normalize))
    self.label_names, self.head, self.results = run.data.label_names, None, {}
    self._fitted = None

  def _batches(self, state, split):
    """(batch, (B, T, D) embeddings) of a split, example ids as positions in the split."""
    it = self.run.data.evals[split]
    pos = {e: i for i, e in enumerate(it.info["example_ids"])}
    for batch, e in train.predict(self.step_fn, state, it, self.run.bsh):
      yield dict(batch, example_ids=np.array([pos.get(int(x), -1)
                                              for x in batch["example_ids"]])), np.asarray(e)

  def fit(self, state) -> None:
    """The tagger on the training words' embeddings (the words each window owns); its C is
    setfit.c, or the best K-shot dev F1 over setfit.c_grid (LM-BFF's dev selection); kept for
    the same step (the last dev evaluation is the final state's)."""
    if self._fitted == int(state.step):
      return
    x, y = [], []
    for batch, e in self._batches(state, "train"):
      own = (batch["predict_mask"] == 1) & (batch["example_ids"][:, None] >= 0) & (
          batch["labels"] >= 0)
      x.append(e[own])
      y.append(batch["labels"][own])
    x, y = np.concatenate(x), np.concatenate(y)
    grid = tuple(self.cfg.setfit.get("c_grid", ())) or (self.cfg.setfit.c,)
    dev = list(self._batches(state, "validation")) if len(grid) > 1 else None
    best = None
    for c in grid:
      head = fewshot.fit_logistic_regression(x, y, len(self.label_names), c)
      f1 = self.score(state, "validation", head, dev)[0]["f1"] if dev else 0.0
      if best is None or f1 > best[0]:
        best = (f1, c, head)
    _, self.c, self.head = best
    self._fitted = int(state.step)

  def score(self, state, split, head=None, batches=None):
    """(metrics, inputs, gold, predicted tags) of a split with `head` (default: the fitted one)
    on `batches` (default: the split's, embedded now)."""
    w, b = self.head if head is None else head
    kept, preds = [], []
    for batch, e in batches or self._batches(state, split):
      kept.append(batch)
      preds.append(np.argmax(e @ w + b, -1))
    it = self.run.data.evals[split]
    pred = ner.collect_word_predictions(kept, preds, it.info["num_words"], self.label_names)
    inputs, gold = data.read_gold(supervised.data_kwargs(self.cfg.data, split), split)
    return ner.evaluate(gold, pred), inputs, gold, pred

  def dev(self, state) -> dict:
    self.fit(state)
    return dict(self.score(state, "validation")[0])

  def final(self, state, history=()) -> dict:
    del history
    self.fit(state)
    self.results = {s: self.score(state, s) for s in ("validation", "test")}
    self._step = int(state.step)
    return {"dev": dict(self.results["validation"][0], c=self.c), "test": self.results["test"][0]}

  def write(self, workdir: str) -> None:
    report = "\n".join(ner.report(s, self.results[s], self.label_names, self._step)
                       for s in ("test", "validation"))
    reporting.write_text_atomic(os.path.join(workdir, "report.txt"), report)
    _, inputs, gold, pred = self.results["test"]
    ner.write_predictions(workdir, inputs, gold, pred)
    atomic.write_npz(os.path.join(workdir, "head.npz"), kernel=self.head[0], bias=self.head[1],
                     label_names=np.array(self.label_names))

  def summary(self, out: dict) -> str:
    return f"dev f1 {out['dev']['f1']:.4f}  test f1 {out['test']['f1']:.4f}"

  def curves(self, rows: list) -> dict:
    return supervised.metric_curves(rows, "f1")


make_evaluator = Evaluator
