"""Model heads: the registry HEADS (name -> head function) and the modules the heads use."""

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lib.models.layers import P, ModelArgs, activation_fn, dense, kernel_dot, layer_norm


class HeadInputs(NamedTuple):
  """What a model (Bert, Gpt) hands its head function, inside the model's compact call.

  Modules the head creates (give them names) are children of the model, so their parameters sit
  at the top of the tree: `classifier/kernel`, `mlm/dense/kernel`, `pooler/dense/kernel`.
  """
  args: ModelArgs
  num_labels: int
  x: jax.Array                 # (B, T, D) last hidden state
  input_mask: jax.Array        # (B, T) 1 = real token
  deterministic: bool
  attend: Callable             # (..., D) -> (..., V): logits against the word embeddings (tied)
  pool: Callable               # () -> (B, D): the model's summary of each row (BERT: the
                               # pooler on [CLS]; GPT-2: the last real token), made once;
                               # (B, S, D) for packed rows (BERT's pool_positions)


class Pooler(nn.Module):
  """tanh(dense(h[:, 0])) on the first ([CLS]) token, as BERT; with `positions` (B, S) the
  tokens at those positions (the [CLS] of each example of a packed row): (B, S, D)."""
  args: ModelArgs

  @nn.compact
  def __call__(self, x, deterministic: bool = True, positions=None):    # (B, T, D) -> (B, D)
    a = self.args
    h = x[:, 0] if positions is None else jnp.take_along_axis(x, positions[..., None], axis=1)
    return jnp.tanh(dense(a, a.hidden_size, ("embed", "mlp"), ("mlp",), "dense")(h,
                                                                            deterministic))


class MlmHead(nn.Module):
  """dense -> activation -> LayerNorm -> logits against the word embeddings + `bias` (vocab,)."""
  args: ModelArgs

  @nn.compact
  def __call__(self, x, attend, deterministic: bool = True):             # (B, T, D) -> (B, T, V)
    a = self.args
    h = dense(a, a.hidden_size, ("embed", "mlp"), ("mlp",), "dense")(x, deterministic)
    h = layer_norm(a, "ln")(activation_fn(a.activation)(h))
    bias = self.param("bias", P(nn.initializers.zeros, ("vocab",)), (a.vocab_size,), a.param_dtype)
    return attend(h) + bias.astype(h.dtype)


class Classifier(nn.Module):
  """dropout -> linear `kernel` (embed, num_labels) + `bias`, in the compute dtype (no float32
  accumulation, unlike a Dense); the product goes through the ModelArgs.dot_general seat."""
  args: ModelArgs
  num_labels: int

  @nn.compact
  def __call__(self, x, deterministic: bool):
    a = self.args
    if self.num_labels < 1:
      raise ValueError(f"classifier head needs num_labels >= 1, got {self.num_labels}")
    x = nn.Dropout(a.dropout_rate)(x, deterministic=deterministic)
    kernel = self.param("kernel", P(nn.initializers.normal(a.initializer_range), ("embed", None)),
                        (a.hidden_size, self.num_labels), a.param_dtype)
    bias = self.param("bias", P(nn.initializers.zeros, (None,)), (self.num_labels,), a.param_dtype)
    y = kernel_dot(self, a.dot_general, x, kernel.astype(x.dtype), 1, x.dtype)
    return y + bias.astype(x.dtype)


def mlm_head(h: HeadInputs) -> dict:
  """BertForMaskedLM's head `mlm`: dense, activation, LayerNorm, tied decoder + bias."""
  return {"logits": MlmHead(h.args, name="mlm")(h.x, h.attend, h.deterministic)}


def lm_head(h: HeadInputs) -> dict:
  """GPT2LMHeadModel's head: the tied word embeddings, no parameters of its own."""
  return {"logits": h.attend(h.x)}


def token_cls_head(h: HeadInputs) -> dict:
  """A `classifier` on every position (BertForTokenClassification)."""
  return {"logits": Classifier(h.args, h.num_labels, name="classifier")(h.x, h.deterministic)}


def seq_cls_head(h: HeadInputs) -> dict:
  """A `classifier` on the model's pooled row (Bert/GPT2ForSequenceClassification); on each
  pooled example of a packed row: logits (B, S, num_labels)."""
  pooled = h.pool()
  return {"pooled": pooled,
          "logits": Classifier(h.args, h.num_labels, name="classifier")(pooled, h.deterministic)}


# name -> head(HeadInputs) -> dict of outputs (at least 'logits'), merged into the model's outputs.
HEADS = {"mlm": mlm_head, "lm": lm_head, "token_cls": token_cls_head, "seq_cls": seq_cls_head}


def register_head(name: str, head: Callable[[HeadInputs], dict]) -> None:
  """Adds `head` (a function of HeadInputs returning a dict of outputs) as `name`.

  Raises:
    ValueError: `name` is already registered.
  """
  if name in HEADS:
    raise ValueError(f"head {name!r} is already registered; registered: {sorted(HEADS)}")
  HEADS[name] = head


def get_head(name: str) -> Callable[[HeadInputs], dict]:
  """The head function registered as `name`.

  Raises:
    ValueError: an unknown name, listing the registered ones.
  """
  if name not in HEADS:
    raise ValueError(f"unknown model head {name!r}; registered: {sorted(HEADS)} "
                     "(or None: no head)")
  return HEADS[name]
