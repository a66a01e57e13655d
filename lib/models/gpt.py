"""GPT-2 decoder (pre-LN, causal) with the tied LM head."""

import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from lib.models import heads
from lib.models.layers import ModelArgs, attention_bias, embed, layer_norm, run_layers
from lib.models.peft_layers import SoftPrompt, strip_prompt


class GptDecoder(nn.Module):
  """word + position embeddings, `num_layers` pre-LN causal blocks, `final_ln`."""
  args: ModelArgs

  def setup(self):
    a = self.args
    self.word = embed(a, a.vocab_size, ("vocab", "embed"), "word")
    self.position = embed(a, a.max_len, (None, "embed"), "position")

  def attend(self, h):
    """Logits against the word-embedding table (GPT-2's tied LM head, no bias)."""
    return self.word.attend(h)

  @nn.compact
  def __call__(self, input_ids, input_mask=None, position_ids=None, segment_ids=None,
               deterministic=True, output_attentions=False, inputs_embeds=None,
               embedding_delta=None):
    a = self.args
    b, t = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
    if input_mask is None:
      input_mask = jnp.ones((b, t), jnp.int32)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.word(input_ids) if inputs_embeds is None else inputs_embeds    # (B, T, D)
    if embedding_delta is not None:   # (B, T, D) added to the word embeddings (lib/adversarial)
      x = x + embedding_delta.astype(x.dtype)
    x = nn.Dropout(a.dropout_rate)(x + self.position(position_ids), deterministic=deterministic)
    if a.prompt_len:   # prompt tuning: (B, P + T, D) through the layers, P stripped after
      x, input_mask = SoftPrompt(a, name="prompt")(x, input_mask, segment_ids)
    bias = attention_bias(input_mask, segment_ids, causal=True)
    # GPT-2 scales the init of residual projections by 1/sqrt(2 * num_layers).
    out_std = a.initializer_range / math.sqrt(2 * a.num_layers)
    x, hidden, attns = run_layers(a, x, bias, deterministic, output_attentions, pre_ln=True,
                                  out_std=out_std)
    x = layer_norm(a, "final_ln")(x)
    # As HF, the last hidden state is reported after the final LayerNorm.
    hidden = hidden[:-1] + (x,)
    return strip_prompt(a, x, hidden, attns)


class Gpt(nn.Module):
  """GPT-2 with an optional head (a name in lib/models/heads.py's HEADS): None (as HF GPT2Model),
  'lm' (tied, GPT2LMHeadModel), 'token_cls', 'seq_cls', or any registered head.

  'seq_cls' classifies from the last non-padding token, as HF GPT2ForSequenceClassification
  (its `score` layer has no bias; ours has one, initialised at zero).
  """
  args: ModelArgs
  head: Optional[str] = None
  num_labels: int = 0

  def setup(self):
    self.decoder = GptDecoder(self.args)

  @nn.compact
  def __call__(self, input_ids=None, input_mask=None, token_type_ids=None, position_ids=None,
               segment_ids=None, deterministic=True, output_attentions=False, inputs_embeds=None,
               embedding_delta=None, pool_positions=None):
    del token_type_ids  # GPT-2 has no token types; accepted so batches are interchangeable.
    if pool_positions is not None:
      raise ValueError("packed sequence-classification rows (pool_positions) need BERT's "
                       "first-token pooler; GPT-2 pools each row's last token")
    x, hidden, attns = self.decoder(input_ids, input_mask, position_ids, segment_ids, deterministic,
                                    output_attentions, inputs_embeds, embedding_delta)
    outputs, inter = {"last_hidden_state": x}, {"hidden_states": hidden}
    if attns is not None:
      inter["attentions"] = attns
    if self.head is None:
      return outputs, inter
    mask = jnp.ones(x.shape[:2], jnp.int32) if input_mask is None else input_mask

    def pool():   # the last real token of each row
      last = jnp.maximum(mask.sum(-1) - 1, 0)                              # (B,)
      return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]   # (B, D)

    inputs = heads.HeadInputs(self.args, self.num_labels, x, mask, deterministic,
                              self.decoder.attend, pool)
    outputs.update(heads.get_head(self.head)(inputs))
    return outputs, inter
