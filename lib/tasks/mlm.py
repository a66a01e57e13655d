"""Masked LM (BERT, no NSP): batch spec, loss on the masked positions only, masked accuracy."""

import math

import jax.numpy as jnp

from lib.models import heads
from lib.tasks import common, lm

HEAD = "mlm"
# Batch (packed rows from lib.data text:*): input_ids (corrupted), input_mask, segment_ids,
# position_ids, labels (B, T) int32; labels: the original id at the chosen positions, else -1.

# Whole-word masking keeps the word that crosses a row's budget whole: extra slots for its pieces.
WHOLE_WORD_SLACK = 16


def prediction_slots(seq_len: int, rate: float, whole_word: bool) -> int:
  """Positions per row that the MLM head is applied to (BERT's max_predictions_per_seq).

  lib.data chooses round(rate * candidates) <= ceil(rate * seq_len) tokens per row (whole-word
  masking: up to one word more), so this bound drops nothing in practice; anything over it is
  counted in the 'mlm_dropped' metric.
  """
  return min(seq_len, max(1, math.ceil(rate * seq_len)) + (WHOLE_WORD_SLACK if whole_word else 0))


def gather_labelled(labels, slots: int):
  """The first `slots` labelled positions of each row, in position order.

  Returns:
    positions (B, K) int32, their labels (B, K) (-1 in unused slots), and the number of labelled
    positions that did not fit (int32 scalar).
  """
  is_lab = labels >= 0
  order = jnp.argsort(~is_lab, axis=1, stable=True)[:, :slots].astype(jnp.int32)   # (B, K)
  gathered = jnp.take_along_axis(labels, order, axis=1)
  dropped = jnp.maximum(is_lab.sum(1) - slots, 0).sum().astype(jnp.int32)
  return order, gathered, dropped


def masked_logits(module, params, batch, positions, rng=None, train=False):
  """MLM logits (B, K, V) at `positions` only: the encoder on whole rows, the head (dense, LN,
  decoder tied to the word embeddings) on K positions per row instead of all T."""
  rngs = {"dropout": rng} if train else {}
  bound = module.bind({"params": params}, rngs=rngs)
  inputs = {k: batch[k] for k in common.MODEL_INPUTS if k in batch}
  x, _, _ = bound.encoder(**inputs, deterministic=not train)                 # (B, T, D)
  h = jnp.take_along_axis(x, positions[..., None], axis=1)                  # (B, K, D)
  head = heads.MlmHead(module.args)
  return head.apply({"params": params["mlm"]}, h, bound.encoder.attend, not train, rngs=rngs)


def make_loss_fn(module, slots: int = 0):
  """loss_fn(params, batch, rng, train) -> (loss, metrics) for lib.train.

  Args:
    module: a Bert with head 'mlm'.
    slots: predictions per row (`prediction_slots`); 0 = the head on every position (full logits).

  Metrics: loss and accuracy over the masked tokens, 'weight' (their number: exact means over
  micro-batches and eval batches), 'mlm_dropped', 'fill' (non-padding fraction of the rows).
  """
  def loss_fn(params, batch, rng, train):
    if slots:
      positions, labels, dropped = gather_labelled(batch["labels"], slots)
      logits = masked_logits(module, params, batch, positions, rng, train)
    else:
      out, _ = common.apply_model(module, params, batch, rng, train)
      logits, labels, dropped = out["logits"], batch["labels"], jnp.zeros((), jnp.int32)
    loss, correct, count = common.masked_cross_entropy(logits, labels)
    return loss, {"loss": loss, "accuracy": correct / jnp.maximum(count, 1),
                  "weight": count.astype(jnp.float32), "mlm_dropped": dropped,
                  "fill": batch["input_mask"].mean(dtype=jnp.float32)}
  return loss_fn


def make_eval_fn(module, slots: int = 0):
  """eval_fn(params, batch) -> scalar metrics for lib.train.evaluate (means weighted by 'weight')."""
  loss_fn = make_loss_fn(module, slots)
  return lambda params, batch: loss_fn(params, batch, None, False)[1]



# ----------------------------------------------------------------------------- task interface

ARCH = "bert"
METRIC, MODE = "loss", "min"    # held-out loss picks the best checkpoint
RESTORE_BEST = False            # the report is the final state's held-out evaluation
make_data, load_tokenizer = lm.make_data, lm.load_tokenizer


def slots_of(cfg) -> int:
  """MLM head positions per row (cfg.predictions_per_row; < 0: `prediction_slots`)."""
  slots = cfg.predictions_per_row
  if slots < 0:
    slots = prediction_slots(cfg.data.max_len, cfg.data.mlm_rate, cfg.data.whole_word_masking)
  return slots


def make_loss(module, cfg):
  return make_loss_fn(module, slots_of(cfg))


def head_fraction(cfg) -> float:
  """Share of the positions the tied output layer runs on (for the FLOPs count)."""
  slots = slots_of(cfg)
  return slots / cfg.data.max_len if slots else 1.0


def make_evaluator(run):
  return lm.Evaluator(make_eval_fn(run.module, slots_of(run.cfg)), run.cfg, run.data, run.bsh)
