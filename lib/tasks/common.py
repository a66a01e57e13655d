"""Shared pieces of the task modules: the model call on a batch and a masked cross-entropy."""


import jax.numpy as jnp
import optax

# Batch keys the models accept; anything else in a batch (labels, ids for evaluation) stays out.
# embedding_delta (B, T, D) is added to the word embeddings: lib/adversarial puts it in a batch;
# pool_positions (B, S): packed classification rows, each example pooled at its first token.
MODEL_INPUTS = ("input_ids", "input_mask", "token_type_ids", "position_ids", "segment_ids",
                "embedding_delta", "pool_positions")


def apply_model(module, params, batch, rng=None, train=False, **kw):
  """Runs `module` on the model inputs of `batch`; dropout only when `train`."""
  inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
  rngs = {"dropout": rng} if train else {}
  return module.apply({"params": params}, **inputs, deterministic=not train, rngs=rngs, **kw)


def masked_cross_entropy(logits, labels):
  """Mean token cross-entropy (float32) over labels >= 0; returns (loss, correct, count)."""
  valid = labels >= 0
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.where(valid, labels, 0))
  count = valid.sum()
  loss = jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1)
  correct = ((jnp.argmax(logits, -1) == labels) & valid).sum()
  return loss, correct, count


def tokens(batch):
  """Non-padding tokens in a batch (for tokens/s)."""
  return batch["input_mask"].sum()


def argmax_predict(module):
  """predict_fn(params, batch) -> argmax class ids ((B,) or (B, T)), int32."""
  def predict(params, batch):
    out, _ = apply_model(module, params, batch)
    return jnp.argmax(out["logits"], -1).astype(jnp.int32)
  return predict


