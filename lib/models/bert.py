"""BERT encoder (post-LN, as the original) and its task models."""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from lib.models import heads
from lib.models.layers import (ModelArgs, SoftPrompt, attention_bias, embed, layer_norm, run_layers,
                               strip_prompt)


class BertEmbeddings(nn.Module):
  """word + position + token-type embeddings, LayerNorm, dropout."""
  args: ModelArgs

  def setup(self):
    a = self.args
    self.word = embed(a, a.vocab_size, ("vocab", "embed"), "word")
    self.position = embed(a, a.max_len, (None, "embed"), "position")
    self.token_type = embed(a, a.type_vocab_size, (None, "embed"), "token_type")
    self.ln = layer_norm(a, "ln")
    self.dropout = nn.Dropout(a.dropout_rate)

  def __call__(self, input_ids, token_type_ids, position_ids, deterministic, inputs_embeds=None,
               embedding_delta=None):
    x = self.word(input_ids) if inputs_embeds is None else inputs_embeds   # (B, T, D)
    if embedding_delta is not None:   # (B, T, D) added to the word embeddings (lib/adversarial)
      x = x + embedding_delta.astype(x.dtype)
    x = x + self.position(position_ids) + self.token_type(token_type_ids)
    return self.dropout(self.ln(x), deterministic=deterministic)


class BertEncoder(nn.Module):
  """Embeddings and `num_layers` post-LN blocks. Returns (last hidden state, hidden states, attentions)."""
  args: ModelArgs

  def setup(self):
    self.embeddings = BertEmbeddings(self.args)

  def attend(self, h):
    """Logits against the word-embedding table (tied MLM decoder)."""
    return self.embeddings.word.attend(h)

  @nn.compact
  def __call__(self, input_ids, input_mask=None, token_type_ids=None, position_ids=None,
               segment_ids=None, deterministic=True, output_attentions=False, inputs_embeds=None,
               embedding_delta=None):
    b, t = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
    if input_mask is None:
      input_mask = jnp.ones((b, t), jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros((b, t), jnp.int32)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.embeddings(input_ids, token_type_ids, position_ids, deterministic, inputs_embeds,
                        embedding_delta)
    if self.args.prompt_len:   # prompt tuning: (B, P + T, D) through the layers, P stripped after
      x, input_mask = SoftPrompt(self.args, name="prompt")(x, input_mask, segment_ids)
    bias = attention_bias(input_mask, segment_ids, causal=False)
    return strip_prompt(self.args, *run_layers(self.args, x, bias, deterministic,
                                               output_attentions, pre_ln=False))


class Bert(nn.Module):
  """BERT with an optional head.

  head: None (encoder + pooler, as HF BertModel), 'mlm' (tied decoder, as BertForMaskedLM),
  'token_cls' (BertForTokenClassification), 'seq_cls' (pooler + classifier, BertForSequenceClassification).
  Returns (outputs, intermediates): outputs has 'last_hidden_state', 'pooled' (pooler heads) and
  'logits' (task heads); intermediates has 'hidden_states' (L+1 tensors) and 'attentions' when asked.
  """
  args: ModelArgs
  head: Optional[str] = None
  num_labels: int = 0
  pooler: bool = True   # only used with head=None (MiniLM and HF BertModel have a pooler)

  def setup(self):
    self.encoder = BertEncoder(self.args)

  @nn.compact
  def __call__(self, input_ids=None, input_mask=None, token_type_ids=None, position_ids=None,
               segment_ids=None, deterministic=True, output_attentions=False, inputs_embeds=None,
               embedding_delta=None):
    x, hidden, attns = self.encoder(input_ids, input_mask, token_type_ids, position_ids, segment_ids,
                                    deterministic, output_attentions, inputs_embeds,
                                    embedding_delta)
    outputs = {"last_hidden_state": x}
    inter = {"hidden_states": hidden}
    if attns is not None:
      inter["attentions"] = attns
    a = self.args
    if self.head is None and self.pooler or self.head == "seq_cls":
      outputs["pooled"] = heads.Pooler(a, name="pooler")(x, deterministic)
    if self.head == "mlm":
      outputs["logits"] = heads.MlmHead(a, name="mlm")(x, self.encoder.attend, deterministic)
    elif self.head == "token_cls":
      outputs["logits"] = heads.Classifier(a, self.num_labels, name="classifier")(x, deterministic)
    elif self.head == "seq_cls":
      outputs["logits"] = heads.Classifier(a, self.num_labels, name="classifier")(
          outputs["pooled"], deterministic)
    elif self.head is not None:
      raise ValueError(f"unknown BERT head {self.head!r}; valid: None, 'mlm', 'token_cls', 'seq_cls'")
    return outputs, inter
