"""Sequence classification (SST-2): batch spec, loss, accuracy."""

import os

import jax.numpy as jnp
import numpy as np

from lib import metrics, reporting
from lib.tasks import common, supervised

HEAD = "seq_cls"
# Batch: input_ids, input_mask, token_type_ids (B, T) int32; label (B,) int32;
# evaluation adds example_ids (B,) (-1 = padding row).


def make_loss_fn(module, cfg=None):
  """loss_fn(params, batch, rng, train) -> (loss, metrics) for lib.train (`cfg` is unused)."""
  del cfg
  def loss_fn(params, batch, rng, train):
    out, _ = common.apply_model(module, params, batch, rng, train)
    labels = batch["label"]
    if "example_ids" in batch:  # padding rows of a final eval batch carry no label
      labels = jnp.where(batch["example_ids"] >= 0, labels, -1)
    loss, correct, count = common.masked_cross_entropy(out["logits"], labels)
    return loss, {"loss": loss, "accuracy": correct / count.clip(1), "tokens": common.tokens(batch)}
  return loss_fn


make_predict_fn = common.argmax_predict


def collect_predictions(batches, predictions, num_examples):
  """One predicted class per example, in example-id order; raises if any is missing or repeated."""
  pred = np.full(num_examples, -1, np.int64)
  seen = np.zeros(num_examples, np.int64)
  for batch, p in zip(batches, predictions):
    keep = batch["example_ids"] >= 0
    pred[batch["example_ids"][keep]] = np.asarray(p)[keep]
    np.add.at(seen, batch["example_ids"][keep], 1)
  if (seen != 1).any():
    raise RuntimeError(f"evaluation covered examples wrongly: {(seen == 0).sum()} missing, "
                       f"{(seen > 1).sum()} repeated")
  return pred


def evaluate(gold, pred):
  return {"accuracy": metrics.accuracy(list(gold), list(pred))}


# ----------------------------------------------------------------------------- task interface

METRIC, MODE = "accuracy", "max"   # the dev metric that picks the reported checkpoint
RESTORE_BEST = True                # test results are those of the best dev checkpoint
make_data = supervised.make_data
make_loss = make_loss_fn


def collect(batches, predictions, info, label_names):
  pred = collect_predictions(batches, predictions, len(info["example_ids"]))
  return [label_names[i] for i in pred]


def report(split, result, label_names, step) -> str:
  m, _, gold, pred = result
  return "\n".join([f"== {split} (checkpoint at step {step}) ==", f"accuracy {m['accuracy']:.4f}",
                    metrics.token_report([gold], [pred], label_names)])


def write_predictions(workdir, inputs, gold, pred) -> None:
  reporting.write_tsv_predictions(os.path.join(workdir, "test_predictions.tsv"), inputs, gold, pred)


make_evaluator = supervised.evaluator_factory(
    supervised.TaskOps(collect, evaluate, report, write_predictions, METRIC), make_predict_fn)
