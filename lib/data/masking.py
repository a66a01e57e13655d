"""BERT masked-LM corruption (15%; 80/10/10; optional whole-word), deterministic given (seed, step)."""

import numpy as np


def word_start_table(tokenizer) -> np.ndarray:
  """(vocab,) bool: True where a token starts a word (WordPiece: not '##...'; byte-level BPE: 'Ġ...').

  Used by whole-word masking to group the pieces of one word.
  """
  vocab = tokenizer.get_vocab()
  table = np.ones(max(vocab.values()) + 1, bool)
  byte_level = "ByteLevel" in repr(tokenizer.backend_tokenizer.pre_tokenizer)
  for tok, i in vocab.items():
    table[i] = tok.startswith("Ġ") if byte_level else not tok.startswith("##")
  return table


def random_token_pool(tokenizer) -> np.ndarray:
  """Ids a 'random token' replacement draws from: the vocabulary without special tokens."""
  special = set(tokenizer.all_special_ids)
  return np.array([i for i in range(len(tokenizer)) if i not in special], np.int32)


def _choose(cand, starts, rate, rng):
  """(B, T) bool of chosen positions: per row round(rate * candidates) tokens, or whole words if `starts`."""
  n_cand = cand.sum(1)
  target = np.where(n_cand > 0, np.maximum(1, np.round(rate * n_cand)), 0)          # (B,)
  if starts is None:
    score = np.where(cand, rng.random(cand.shape), np.inf)
    rank = np.argsort(np.argsort(score, axis=1, kind="stable"), axis=1)
    return cand & (rank < target[:, None])
  # Whole words: a word is a start candidate plus the following non-start candidates; pick words in a
  # random order until the row's token budget is reached (words straddling the budget are kept whole).
  word = np.cumsum(cand & starts, axis=1) * cand                                   # (B, T) 1.. per word, 0 = none
  chosen = np.zeros_like(cand)
  for r in range(cand.shape[0]):
    n_words = word[r].max()
    if n_words == 0:
      continue
    sizes = np.bincount(word[r], minlength=n_words + 1)[1:]
    order = rng.permutation(n_words)
    k = np.searchsorted(np.cumsum(sizes[order]), target[r]) + 1                    # words to reach the budget
    picked = np.zeros(n_words + 1, bool)
    picked[order[:k] + 1] = True
    chosen[r] = picked[word[r]] & cand[r]
  return chosen


def mask_tokens(input_ids, input_mask, *, seed: int, step: int, mask_id: int, special_ids, pool,
                rate: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1, word_starts=None):
  """Applies MLM corruption to a batch.

  Args:
    input_ids, input_mask: (B, T) int arrays.
    seed, step: the corruption is a pure function of (seed, step) and the inputs.
    mask_id: id of [MASK].
    special_ids: ids never chosen (CLS, SEP, PAD, ...); padding (input_mask 0) is never chosen either.
    pool: ids a random replacement draws from (random_token_pool).
    rate: fraction of candidate tokens chosen per row (at least one if the row has candidates).
    mask_frac, random_frac: of the chosen, fraction set to [MASK] / a random token; the rest unchanged.
    word_starts: (vocab,) bool table for whole-word masking (word_start_table), or None.

  Returns:
    (corrupted input_ids, labels) with labels = original id at chosen positions, -1 elsewhere (int32).
  """
  rng = np.random.default_rng([seed, step])
  ids = np.asarray(input_ids)
  cand = (np.asarray(input_mask) > 0) & ~np.isin(ids, np.asarray(list(special_ids)))
  starts = None if word_starts is None else word_starts[ids]
  chosen = _choose(cand, starts, rate, rng)
  u = rng.random(ids.shape)
  to_mask = chosen & (u < mask_frac)
  to_random = chosen & (u >= mask_frac) & (u < mask_frac + random_frac)
  out = np.where(to_mask, mask_id, ids)
  out = np.where(to_random, pool[rng.integers(0, len(pool), ids.shape)], out)
  labels = np.where(chosen, ids, -1)
  return out.astype(np.int32), labels.astype(np.int32)
