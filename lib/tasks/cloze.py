"""Prompt-based (cloze) classification: each text holds one mask token and each class is a label
word whose MLM logit at the mask scores it (PET's patterns, LM-BFF's prompt-based fine-tuning).

Config: a sequence-classification data block whose texts already carry the pattern (see
lib/fewshot.write_cloze_data) and a `cloze` block with `verbalizer`: (label, word) pairs, one
single-token word per label. The model is a BERT with its MLM head ('mlm'; e.g. a
research/pretrain_mlm.py workdir as config.model.init_from); the run's model is that MLM model
(no classifier: the record says head 'mlm', 0 labels), so the MLM head is carried over, trained
and saved. The loss is the cross-entropy of the label-word log-softmax at the mask (only the C
label words enter it). The evaluator is single-process.
"""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from lib import atomic, data, fewshot, reporting, train
from lib.tasks import common, mlm, supervised

HEAD = "mlm"
ARCH = "bert"
METRIC, MODE = "accuracy", "max"   # K-shot dev accuracy picks the reported checkpoint
RESTORE_BEST = True
# Batch: the sequence-classification batch (input_ids with one mask token per real row,
# input_mask, token_type_ids (B, T), label (B,), evaluation: example_ids (B,), -1 = padding row)
# plus mask_pos (B,) int32 (the mask's index; 0 in padding rows) and label_token_ids (B, C) int32
# (the label words' vocabulary ids, the same in every row).


@dataclasses.dataclass
class ClozeData(supervised.Data):
  """supervised.Data (label_names [] : the model has no classifier) and the classes."""
  classes: list = dataclasses.field(default_factory=list)       # class names, index = class id
  words: list = dataclasses.field(default_factory=list)         # label word of each class


class ClozeBatches:
  """A batch iterator with mask_pos and label_token_ids added (state and length passed through).

  Raises (when a batch is drawn):
    ValueError: a real row without exactly one mask token (e.g. truncated at data.max_len).
  """

  def __init__(self, inner, mask_id: int, word_ids):
    self.inner, self.mask_id = inner, mask_id
    self.word_ids = np.asarray(word_ids, np.int32)
    self.info = getattr(inner, "info", {})

  def __len__(self):
    return len(self.inner)

  def __iter__(self):
    iter(self.inner)   # a finished evaluation pass starts over
    return self

  def __next__(self) -> dict:
    batch = dict(next(self.inner))
    is_mask = batch["input_ids"] == self.mask_id                          # (B, T)
    real = batch["example_ids"] >= 0 if "example_ids" in batch else np.ones(len(is_mask), bool)
    bad = real & (is_mask.sum(1) != 1)
    if bad.any():
      raise ValueError(f"cloze data: {int(bad.sum())} texts of a batch hold "
                       f"{sorted(set(is_mask.sum(1)[bad].tolist()))} mask tokens, expected one "
                       "(a pattern without '{mask}', or the mask cut at config.data.max_len)")
    batch["mask_pos"] = np.argmax(is_mask, 1).astype(np.int32)
    batch["label_token_ids"] = np.broadcast_to(self.word_ids, (len(is_mask),
                                                               len(self.word_ids))).copy()
    return batch

  def get_state(self) -> dict:
    return self.inner.get_state()

  def set_state(self, state: dict) -> None:
    self.inner.set_state(state)


def make_data(cfg, tokenizer, workdir=None) -> ClozeData:
  """The sequence-classification iterators with the cloze keys; the label words from
  cfg.cloze.verbalizer (one token each, else ValueError naming the word)."""
  inner = supervised.make_data(cfg, tokenizer, workdir)
  classes = list(inner.label_names)
  words = fewshot.label_words(cfg.cloze.verbalizer, classes)
  ids = fewshot.verbalizer_token_ids(tokenizer, words)
  wrap = lambda it: ClozeBatches(it, tokenizer.mask_token_id, ids)
  stats = dict(inner.stats, classes=classes, label_words=words)
  return ClozeData(wrap(inner.train), {s: wrap(it) for s, it in inner.evals.items()}, [], stats,
                   inner.fingerprint, classes, words)


def label_log_probs(module, params, batch, rng=None, train_mode=False):
  """(B, C) log-softmax over the label words of the MLM logits at each row's mask (the head runs
  on that position only)."""
  logits = mlm.masked_logits(module, params, batch, batch["mask_pos"][:, None], rng,
                             train_mode)[:, 0]                                  # (B, V)
  return fewshot.label_word_log_probs(logits, batch["label_token_ids"])


def make_loss(module, cfg=None):
  """loss_fn(params, batch, rng, train) -> (mean cross-entropy over the label words, metrics)."""
  del cfg

  def loss_fn(params, batch, rng, train_mode):
    lp = label_log_probs(module, params, batch, rng, train_mode)
    labels = batch["label"]
    if "example_ids" in batch:   # padding rows of a final eval batch carry no label
      labels = jnp.where(batch["example_ids"] >= 0, labels, -1)
    loss, correct, count = common.masked_cross_entropy(lp, labels)
    return loss, {"loss": loss, "accuracy": correct / count.clip(1),
                  "tokens": common.tokens(batch)}
  return loss_fn


def head_fraction(cfg) -> float:
  """The tied output layer runs on one position per row (for the FLOPs count)."""
  return 1.0 / cfg.data.max_len


class Evaluator:
  """Label log-probabilities of a split (in example order) and their accuracy; write() saves the
  report, the test predictions and log_probs.npz (validation and test log-probs and gold ids,
  for PET's ensemble of patterns)."""

  def __init__(self, run):
    self.run, self.cfg, self.classes = run, run.cfg, run.data.classes
    self.step_fn = train.make_eval_step(lambda p, b: label_log_probs(run.module, p, b))
    self.results = {}

  def log_probs(self, state, split: str) -> tuple:
    """((N, C) label log-probabilities, (N,) gold class ids) of a split in example order."""
    lps, gold, ids = [], [], []
    for batch, lp in train.predict(self.step_fn, state, self.run.data.evals[split], self.run.bsh):
      keep = batch["example_ids"] >= 0
      lps.append(np.asarray(lp)[keep])
      gold.append(batch["label"][keep])
      ids.append(batch["example_ids"][keep])
    order = np.argsort(np.concatenate(ids))
    return np.concatenate(lps)[order], np.concatenate(gold)[order]

  def _score(self, state, split: str) -> tuple:
    lp, gold = self.log_probs(state, split)
    return {"accuracy": float((lp.argmax(1) == gold).mean())}, lp, gold

  def dev(self, state) -> dict:
    return dict(self._score(state, "validation")[0])

  def final(self, state, history=()) -> dict:
    del history
    self.results = {s: self._score(state, s) for s in ("validation", "test")}
    self._step = int(state.step)
    return {"dev": self.results["validation"][0], "test": self.results["test"][0]}

  def write(self, workdir: str) -> None:
    inputs, gold = data.read_gold(supervised.data_kwargs(self.cfg.data, "test"), "test")
    pred = [self.classes[i] for i in self.results["test"][1].argmax(1)]
    reporting.write_tsv_predictions(os.path.join(workdir, "test_predictions.tsv"), inputs, gold,
                                    pred)
    words = dict(zip(self.classes, self.run.data.words))
    text = "\n".join(f"== {s} (checkpoint at step {self._step}; label words {words}) ==\n"
                     f"accuracy {self.results[s][0]['accuracy']:.4f}"
                     for s in ("test", "validation"))
    reporting.write_text_atomic(os.path.join(workdir, "report.txt"), text + "\n")
    atomic.write_npz(os.path.join(workdir, "log_probs.npz"), classes=np.array(self.classes),
                     words=np.array(self.run.data.words),
                     **{k: self.results[s][i] for s in ("validation", "test")
                        for k, i in ((s, 1), (f"{s}_gold", 2))})

  def summary(self, out: dict) -> str:
    return supervised.accuracy_summary(out)

  def curves(self, rows: list) -> dict:
    return supervised.metric_curves(rows, "accuracy")


make_evaluator = Evaluator
