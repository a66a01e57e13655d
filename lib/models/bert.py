"""BERT encoder (post-LN, as the original) and the model with a head from lib/models/heads.py."""

import functools
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from lib.models import heads
from lib.models.layers import ModelArgs, attention_bias, embed, layer_norm, run_layers
from lib.models.peft_layers import SoftPrompt, strip_prompt


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
  """Embeddings and `num_layers` post-LN blocks.

  Returns (last hidden state, hidden states, attentions).
  """
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
  """BERT with an optional head (a name in lib/models/heads.py's HEADS).

  head: None (encoder + pooler, as HF BertModel), 'mlm' (tied decoder, as BertForMaskedLM),
  'token_cls' (BertForTokenClassification), 'seq_cls' (pooler + classifier,
  BertForSequenceClassification), or any registered head.
  Returns (outputs, intermediates): outputs has 'last_hidden_state', 'pooled' (pooler heads) and
  the head's outputs ('logits'); intermediates has 'hidden_states' (L+1 tensors) and 'attentions'
  when asked.
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
               embedding_delta=None, pool_positions=None):
    """pool_positions (B, S): packed rows (lib/data pack_rows): pool each example at its first
    ([CLS]) token instead of each row at position 0."""
    x, hidden, attns = self.encoder(input_ids, input_mask, token_type_ids, position_ids,
                                    segment_ids, deterministic, output_attentions, inputs_embeds,
                                    embedding_delta)
    outputs = {"last_hidden_state": x}
    inter = {"hidden_states": hidden}
    if attns is not None:
      inter["attentions"] = attns
    a = self.args
    pool = functools.cache(lambda: heads.Pooler(a, name="pooler")(x, deterministic,
                                                                    pool_positions))  # (B, D)
    if self.head is None:
      if self.pooler:
        outputs["pooled"] = pool()
      return outputs, inter
    mask = jnp.ones(x.shape[:2], jnp.int32) if input_mask is None else input_mask
    inputs = heads.HeadInputs(a, self.num_labels, x, mask, deterministic, self.encoder.attend, pool)
    outputs.update(heads.get_head(self.head)(inputs))
    return outputs, inter
