"""Causal LM (GPT-2): batch spec, next-token loss and accuracy; perplexity from the eval mean."""

import os

import jax.numpy as jnp

from lib import metrics
from lib.tasks import common, lm

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


# ----------------------------------------------------------------------------- task interface

ARCH = "gpt2"
METRIC, MODE = "loss", "min"    # held-out loss picks the best checkpoint
RESTORE_BEST = False            # the report is the final state's held-out evaluation
make_data, load_tokenizer = lm.make_data, lm.load_tokenizer


def make_loss(module, cfg):
  del cfg
  return make_loss_fn(module)


def head_fraction(cfg) -> float:
  del cfg
  return 1.0


def make_evaluator(run):
  """Held-out evaluation with perplexity; samples of cfg.samples.prompts at each evaluation."""
  sampler = None
  if run.cfg.samples.prompts:
    sampler = lm.Sampler(run.module, run.tokenizer, run.cfg, run.bsh,
                         os.path.join(run.workdir, "samples.txt"))
  return lm.Evaluator(make_eval_fn(run.module), run.cfg, run.data, run.bsh,
                      finish=with_perplexity, sampler=sampler, second="perplexity")
