"""Sequence classification (SST-2): batch spec, loss, accuracy."""

import jax.numpy as jnp
import numpy as np

from lib import metrics
from lib.tasks import common

HEAD = "seq_cls"
# Batch: input_ids, input_mask, token_type_ids (B, T) int32; label (B,) int32;
# evaluation adds example_ids (B,) (-1 = padding row).


def make_loss_fn(module):
  """loss_fn(params, batch, rng, train) -> (loss, metrics) for lib.train."""
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
