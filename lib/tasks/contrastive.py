"""SetFit-style contrastive task: the encoder is fine-tuned on sentence pairs with a cosine-
similarity loss on mean-pooled embeddings; a logistic-regression head on the training embeddings
classifies.

Config: the fine-tuning data block (a sequence-classification dataset) and a `setfit` block:
iterations (pairs per example and iteration: one positive, one negative), c (the head's inverse
L2 strength), normalize (L2-normalise the embeddings, as sentence-transformers' all-MiniLM does),
max_pairs (a cap on the pairs per epoch: fewer iterations for a larger K; 0 = none).
The evaluator is single-process (it embeds every split on this process).
"""

import os

import jax.numpy as jnp
import numpy as np

from lib import atomic, data, fewshot, reporting, train
from lib.data import pipeline
from lib.tasks import common, supervised

HEAD = None                        # the bare encoder: embeddings are mean-pooled hidden states
METRIC, MODE = "accuracy", "max"   # of the linear head on the dev set
RESTORE_BEST = False               # SetFit reports the final encoder
# Batch: input_ids, input_mask, token_type_ids (B, 2, T) int32 (the two texts of each pair);
# target (B,) float32, 1 = same label, 0 = different.


class PairIterator:
  """Batches of contrastive pairs of examples, a new deterministic set of pairs each epoch
  (resumable). The base of lib/tasks/token_contrastive's word pairs: a subclass names its items'
  labels and anchors (_setup), their token ids (sequence), how pairs are drawn (make_pairs) and
  any per-item batch fields (extras)."""

  kind = "pairs"

  def __init__(self, feats, batch_size: int, iterations: int, seed: int, pad_id: int,
               bucket: int = 16):
    self.feats = feats
    labels = np.array([f["label"] for f in feats])
    self._setup(labels, len(feats), batch_size, iterations, seed, pad_id, bucket)

  def _setup(self, labels, num_anchors: int, batch_size: int, iterations: int, seed: int,
             pad_id: int, bucket: int) -> None:
    """Common fields: 2 * iterations pairs per anchor and epoch, cut into whole batches."""
    self.labels, self.batch_size, self.iterations = labels, batch_size, iterations
    self.seed, self.pad_id, self.bucket = seed, pad_id, bucket
    self._steps = 2 * iterations * num_anchors // batch_size
    if self._steps == 0:
      raise ValueError(f"setfit: {2 * iterations * num_anchors} {self.kind.replace('_', ' ')} "
                       f"are fewer than data.batch_size={batch_size}")
    self.name = f"{self.kind}/n={len(labels)}/b={batch_size}/r={iterations}/seed={seed}"
    self._epoch, self._index, self._pairs = 0, 0, None

  def make_pairs(self, seed: int):
    """(a, b, target) index arrays of one epoch's pairs."""
    return fewshot.contrastive_pairs(self.labels, self.iterations, seed)

  def sequence(self, i: int):
    """Item i's token ids."""
    return self.feats[i]["input_ids"]

  def extras(self, a, b) -> dict:
    """Further batch fields of the pairs (a[r], b[r])."""
    del a, b
    return {}

  def __len__(self):
    return self._steps

  def __iter__(self):
    return self

  def _epoch_pairs(self):
    if self._pairs is None or self._pairs[0] != self._epoch:
      self._pairs = (self._epoch, self.make_pairs(self.seed * 1000 + self._epoch))
    return self._pairs[1]

  def __next__(self) -> dict:
    if self._index >= self._steps:
      self._epoch, self._index = self._epoch + 1, 0
    a, b, t = self._epoch_pairs()
    rows = slice(self._index * self.batch_size, (self._index + 1) * self.batch_size)
    self._index += 1
    a, b = a[rows], b[rows]
    seqs = [[self.sequence(i), self.sequence(j)] for i, j in zip(a, b)]
    longest = max(len(s) for pair in seqs for s in pair)
    length = -(-longest // self.bucket) * self.bucket
    ids = np.full((len(seqs), 2, length), self.pad_id, np.int32)
    mask = np.zeros_like(ids)
    for r, pair in enumerate(seqs):
      for k, s in enumerate(pair):
        ids[r, k, :len(s)], mask[r, k, :len(s)] = s, 1
    return dict(input_ids=ids, input_mask=mask, token_type_ids=np.zeros_like(ids),
                **self.extras(a, b), target=t[rows].astype(np.float32))

  def get_state(self) -> dict:
    return {"pipeline": self.name, "epoch": self._epoch, "index": self._index}

  def set_state(self, state: dict) -> None:
    if state.get("pipeline") != self.name:
      raise ValueError(f"iterator state is for {state.get('pipeline')!r}, not {self.name!r}")
    self._epoch, self._index = int(state["epoch"]), int(state["index"])


def iterations(setfit_cfg, num_examples: int) -> int:
  """setfit.iterations, lowered so that at most setfit.max_pairs pairs are made (0 = no cap;
  SetFit's budget stays the same as K grows)."""
  r = setfit_cfg.iterations
  if setfit_cfg.max_pairs > 0:
    r = min(r, max(1, setfit_cfg.max_pairs // (2 * num_examples)))
  return r


def make_data(cfg, tokenizer, workdir=None) -> supervised.Data:
  """Pairs of the training split for training; train, validation and test for the head."""
  del workdir
  kw = supervised.data_kwargs(cfg.data, "train")
  src = data.source_of(kw)
  feats, _ = pipeline.seq_cls_features(src, "train", tokenizer, max_len=cfg.data.max_len,
                                       cache_dir=kw.get("cache_dir"))
  pairs = PairIterator(feats, cfg.data.batch_size, iterations(cfg.setfit, len(feats)), cfg.seed,
                       tokenizer.pad_token_id)
  evals = {s: data.from_config(supervised.data_kwargs(cfg.data, s), tokenizer, s, train=False)
           for s in ("train", "validation", "test")}
  return supervised.Data(pairs, evals, list(src.label_names), {"pairs_per_epoch": len(pairs)
                                                                * cfg.data.batch_size}, src.name)


def _flat(batch):
  """(B, 2, T) pair inputs -> (2B, T) rows: pair b's texts are rows 2b and 2b + 1."""
  return {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in common.MODEL_INPUTS if k in batch}


def make_loss(module, cfg=None):
  """loss_fn(params, batch, rng, train) -> (cosine-similarity MSE, metrics)."""
  del cfg

  def loss_fn(params, batch, rng, train_mode):
    flat = _flat(batch)
    out, _ = common.apply_model(module, params, flat, rng, train_mode)
    emb = fewshot.mean_pool(out["last_hidden_state"], flat["input_mask"])
    emb = emb.reshape(batch["target"].shape[0], 2, -1)
    loss, cos = fewshot.cosine_similarity_loss(emb[:, 0], emb[:, 1], batch["target"])
    gap = (jnp.where(batch["target"] > 0.5, cos, 0).sum() / jnp.maximum(batch["target"].sum(), 1)
           - jnp.where(batch["target"] < 0.5, cos, 0).sum()
           / jnp.maximum((1 - batch["target"]).sum(), 1))
    return loss, {"loss": loss, "cos_gap": gap}
  return loss_fn


def make_embed_fn(module, normalize: bool):
  """embed(params, batch) -> (B, D) mean-pooled (optionally L2-normalised) embeddings."""
  def embed(params, batch):
    out, _ = common.apply_model(module, params, batch)
    e = fewshot.mean_pool(out["last_hidden_state"], batch["input_mask"])
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12) if normalize else e
  return embed


class Evaluator:
  """Embeds the splits, fits the logistic-regression head on the training embeddings and scores
  it; final() keeps the head, write() saves it (head.npz) with the report and predictions."""

  def __init__(self, run):
    self.run, self.cfg = run, run.cfg
    self.step_fn = train.make_eval_step(make_embed_fn(run.module, run.cfg.setfit.normalize))
    self.label_names, self.head, self.results = run.data.label_names, None, {}

  def embed(self, state, split):
    """(embeddings, label ids) of a split in example order."""
    it, x, y, ids = self.run.data.evals[split], [], [], []
    for batch, e in train.predict(self.step_fn, state, it, self.run.bsh):
      keep = batch["example_ids"] >= 0
      x.append(np.asarray(e)[keep])
      y.append(batch["label"][keep])
      ids.append(batch["example_ids"][keep])
    order = np.argsort(np.concatenate(ids))
    return np.concatenate(x)[order], np.concatenate(y)[order]

  def _scores(self, state, splits):
    x, y = self.embed(state, "train")
    self.head = fewshot.fit_logistic_regression(x, y, len(self.label_names), self.cfg.setfit.c)
    out = {}
    for s in splits:
      xs, ys = self.embed(state, s)
      pred = fewshot.predict_linear(xs, self.head)
      out[s] = ({"accuracy": float((pred == ys).mean())}, pred)
    return out

  def dev(self, state) -> dict:
    return dict(self._scores(state, ("validation",))["validation"][0])

  def final(self, state, history=()) -> dict:
    del history
    self.results, self._step = self._scores(state, ("validation", "test")), int(state.step)
    return {"dev": self.results["validation"][0], "test": self.results["test"][0]}

  def write(self, workdir: str) -> None:
    inputs, gold = data.read_gold(supervised.data_kwargs(self.cfg.data, "test"), "test")
    pred = [self.label_names[i] for i in self.results["test"][1]]
    reporting.write_tsv_predictions(os.path.join(workdir, "test_predictions.tsv"), inputs, gold,
                                    pred)
    text = "\n".join(f"== {s} (encoder at step {self._step}, logistic-regression head) ==\n"
                     f"accuracy {self.results[s][0]['accuracy']:.4f}" for s in ("test",
                                                                                "validation"))
    reporting.write_text_atomic(os.path.join(workdir, "report.txt"), text + "\n")
    atomic.write_npz(os.path.join(workdir, "head.npz"), kernel=self.head[0], bias=self.head[1],
                     label_names=np.array(self.label_names))

  def summary(self, out: dict) -> str:
    return supervised.accuracy_summary(out)

  def curves(self, rows: list) -> dict:
    return supervised.metric_curves(rows, "accuracy")


make_evaluator = Evaluator
