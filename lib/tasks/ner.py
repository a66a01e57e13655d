"""Token classification (NER, POS): batch spec, loss, and word-level entity evaluation."""

import logging
import os

import numpy as np

from lib import metrics, reporting
from lib.tasks import common, supervised

HEAD = "token_cls"
# Batch: input_ids, input_mask, token_type_ids, labels (-1 = not scored) all (B, T) int32;
# evaluation adds example_ids (B,) (-1 = padding row), word_ids and predict_mask (B, T).


def make_loss_fn(module, cfg=None):
  """loss_fn(params, batch, rng, train) -> (loss, metrics) for lib.train (`cfg` is unused)."""
  del cfg
  def loss_fn(params, batch, rng, train):
    out, _ = common.apply_model(module, params, batch, rng, train)
    loss, correct, count = common.masked_cross_entropy(out["logits"], batch["labels"])
    return loss, {"loss": loss, "token_accuracy": correct / count.clip(1), "labelled": count,
                  "tokens": common.tokens(batch)}
  return loss_fn


make_predict_fn = common.argmax_predict


def collect_word_predictions(batches, predictions, num_words, label_names):
  """Gathers exactly one predicted tag per word from windowed, batched predictions.

  Args:
    batches: the evaluation batches (numpy dicts with example_ids, word_ids, predict_mask).
    predictions: per batch, (B, T) predicted label ids.
    num_words: words per sentence, in example-id order.
    label_names: id -> tag.

  Returns:
    list of tag lists, one per sentence.

  Raises:
    RuntimeError: a word received no prediction or more than one (a windowing bug).
  """
  pred = [[None] * n for n in num_words]
  duplicates = 0
  for batch, p in zip(batches, predictions):
    own = (batch["predict_mask"] == 1) & (batch["example_ids"][:, None] >= 0)
    ex = np.broadcast_to(batch["example_ids"][:, None], own.shape)[own]
    for e, w, lab in zip(ex, batch["word_ids"][own], np.asarray(p)[own]):
      duplicates += pred[e][w] is not None
      pred[e][w] = label_names[lab]
  missing = sum(t is None for sent in pred for t in sent)
  if missing or duplicates:
    raise RuntimeError(f"evaluation covered words wrongly: {missing} words without a prediction, "
                       f"{duplicates} with more than one")
  return pred


def evaluate(gold_tags, pred_tags):
  """Entity-level P/R/F1 (conlleval/seqeval default), plus token accuracy."""
  res = metrics.span_prf(gold_tags, pred_tags)
  out = {k: float(res[k]) for k in ("precision", "recall", "f1")}
  out["token_accuracy"] = metrics.accuracy(gold_tags, pred_tags)
  out["per_type_f1"] = {t: float(v["f1"]) for t, v in res["per_type"].items()}
  logging.info("entity P %.4f R %.4f F1 %.4f", out["precision"], out["recall"], out["f1"])
  return out


# ----------------------------------------------------------------------------- task interface

METRIC, MODE = "f1", "max"      # the dev metric that picks the reported checkpoint
RESTORE_BEST = True             # test results are those of the best dev checkpoint
make_data = supervised.make_data
make_loss = make_loss_fn


def collect(batches, predictions, info, label_names):
  return collect_word_predictions(batches, predictions, info["num_words"], label_names)


def report(split, result, label_names, step) -> str:
  _, _, gold, pred = result
  return "\n".join([
      f"== {split} (checkpoint at step {step}) ==", "-- conlleval --",
      reporting.conlleval_summary(gold, pred),
      "-- entity level (seqeval, default mode) --", metrics.classification_report_entities(gold, pred),
      "-- token level (every word, including O) --", metrics.token_report(gold, pred, label_names)])


def write_predictions(workdir, inputs, gold, pred) -> None:
  reporting.write_conll_predictions(os.path.join(workdir, "test_predictions.conll"), inputs, gold,
                                    pred)


make_evaluator = supervised.evaluator_factory(
    supervised.TaskOps(collect, evaluate, report, write_predictions, METRIC), make_predict_fn)
