"""Causal LM (GPT-2): batch spec, next-token loss and accuracy; perplexity from the eval mean."""

import jax.numpy as jnp

from lib import metrics
from lib.tasks import common

HEAD = "lm"
# Batch (packed rows from lib.data text:*): input_ids, input_mask, segment_ids, position_ids,
# labels (B, T) int32: the next token of the same segment, -1 at a segment's last token and on
# padding.


def make_loss_fn(module):
  """loss_fn(params, batch, rng, train) -> (loss, metrics) for lib.train.

  Metrics: loss (mean NLL per predicted token) and next-token accuracy, 'weight' (predicted
  tokens: exact means over micro-batches and eval batches), 'fill' (non-padding fraction).
  """
  def loss_fn(params, batch, rng, train):
    out, _ = common.apply_model(module, params, batch, rng, train)
    loss, correct, count = common.masked_cross_entropy(out["logits"], batch["labels"])
    return loss, {"loss": loss, "accuracy": correct / jnp.maximum(count, 1),
                  "weight": count.astype(jnp.float32),
                  "fill": batch["input_mask"].mean(dtype=jnp.float32)}
  return loss_fn


def make_eval_fn(module):
  """eval_fn(params, batch) -> scalar metrics for lib.train.evaluate (means weighted by 'weight')."""
  loss_fn = make_loss_fn(module)
  return lambda params, batch: loss_fn(params, batch, None, False)[1]


def with_perplexity(result: dict) -> dict:
  """Adds 'perplexity' = exp(mean NLL) to an evaluation result with 'loss' and 'weight'."""
  return dict(result, perplexity=metrics.perplexity(result["loss"] * result["weight"],
                                                    result["weight"]))
