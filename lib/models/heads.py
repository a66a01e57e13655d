"""Task heads: BERT pooler, tied MLM head, linear classifier (GPT-2's LM head is the tied embedding)."""

import flax.linen as nn
import jax.numpy as jnp

from lib.models.layers import P, ModelArgs, activation_fn, dense, layer_norm


class Pooler(nn.Module):
  """tanh(dense(h[:, 0])) on the first ([CLS]) token, as BERT."""
  args: ModelArgs

  @nn.compact
  def __call__(self, x, deterministic: bool = True):                    # (B, T, D) -> (B, D)
    a = self.args
    return jnp.tanh(dense(a, a.hidden_size, ("embed", "mlp"), ("mlp",), "dense")(x[:, 0],
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
  """dropout -> linear `kernel` (embed, num_labels) + `bias`."""
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
    return jnp.dot(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)
