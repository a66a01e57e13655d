"""Composable grain MapTransforms: tokenise, align labels to windows, gather, pad to bucket, cast, MLM, CLM."""

import dataclasses
import logging
from typing import Optional, Sequence

import grain
import ml_dtypes
import numpy as np

from lib.data import masking, packing
from lib.data import tokenize as tok_lib


def bucket_lengths(max_len: int, buckets: Optional[Sequence[int]] = None, step: int = 16) -> list:
  """Allowed padded lengths: `buckets` (capped at max_len) or multiples of `step` up to max_len; max_len last."""
  if buckets:
    bad = [b for b in buckets if b < 1 or b > max_len]
    if bad:
      raise ValueError(f"buckets {bad} outside [1, max_len={max_len}]")
    return sorted(set(buckets) | {max_len})
  return sorted(set(range(step, max_len, step)) | {max_len})


def _text(x):
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class TokenizeWords(grain.transforms.Map):
  """Example with 'tokens' (words) -> adds 'pieces': per word a non-empty piece-id array ([UNK] fallback)."""

  def __init__(self, word_pieces: tok_lib.WordPieces):
    self.word_pieces = word_pieces

  def map(self, element):
    words = [_text(w) for w in element["tokens"]]
    return dict(element, words=words, pieces=self.word_pieces(words))


class AlignLabels(grain.transforms.Map):
  """Tokenised example -> list of windows with sub-word labels (first sub-word, or all), word_ids, ownership."""

  def __init__(self, label_key, *, max_len, stride, prefix, suffix, label_all=False, owned_labels_only=False):
    self.label_key = label_key
    self.kw = dict(max_len=max_len, stride=stride, prefix=prefix, suffix=suffix, label_all=label_all,
                   owned_labels_only=owned_labels_only)

  def map(self, element):
    labels = None if self.label_key is None else np.asarray(element[self.label_key])
    wins = tok_lib.windows_for_sentence(element["pieces"], labels, **self.kw)
    for w in wins:
      w["example_id"] = int(element["idx"])
    return wins


class Gather(grain.transforms.Map):
  """Batch spec {'indices': [...], 'step': s} -> {'rows': [feature dicts], 'step': s}."""

  def __init__(self, features):
    self.features = features

  def map(self, element):
    return dict(rows=[self.features[i] for i in element["indices"]], step=element["step"])


@dataclasses.dataclass
class PadToBucket(grain.transforms.Map):
  """Rows of 1-D arrays -> (B, T) arrays, T the smallest bucket >= the longest row; dummy rows to batch_size.

  `pad_values` gives each sequence field's padding value; `scalar_fields` (e.g. example_id -> example_ids)
  become (B,) arrays with -1 on dummy rows.
  """
  batch_size: int
  buckets: Sequence[int]
  pad_values: dict
  scalar_fields: dict = dataclasses.field(default_factory=dict)

  def map(self, element):
    rows = element["rows"]
    longest = max([len(r["input_ids"]) for r in rows] + [1])
    t = next((b for b in self.buckets if b >= longest), None)
    if t is None:
      raise ValueError(f"a row of {longest} tokens exceeds the largest bucket {self.buckets[-1]}")
    out = {}
    for key, value in self.pad_values.items():
      arr = np.full((self.batch_size, t), value, np.int32)
      for i, r in enumerate(rows):
        if key in r:  # fields a row lacks (token_type_ids) stay at their pad value
          arr[i, :len(r[key])] = r[key]
      out[key] = arr
    out["input_mask"] = np.zeros((self.batch_size, t), np.int32)
    for i, r in enumerate(rows):
      out["input_mask"][i, :len(r["input_ids"])] = 1
    for src, dst in self.scalar_fields.items():
      out[dst] = np.full(self.batch_size, -1, np.int32)
      out[dst][:len(rows)] = [r[src] for r in rows]
    out["_step"] = element["step"]
    return out


@dataclasses.dataclass
class PackRows(grain.transforms.Map):
  """Batch spec {'rows': [[example indices], ...], 'step': s} -> (rows, row_len) arrays of
  examples laid end to end: each example a segment (segment_ids 1.. within a row, 0 = padding)
  with its own positions from 0, so that attention (lib/models: same segment only) and position
  embeddings see each example exactly as an unpacked row would. `pad_values` as PadToBucket's."""
  features: Sequence[dict]
  rows: int
  row_len: int
  pad_values: dict
  # Per-example scalars (classification: label -> label) as (rows, slots) arrays, -1 on empty
  # slots, with pool_positions (rows, slots): each example's first token (0 on empty slots).
  slot_fields: dict = dataclasses.field(default_factory=dict)
  slots: int = 0

  def map(self, element):
    out = {k: np.full((self.rows, self.row_len), v, np.int32) for k, v in self.pad_values.items()}
    for k in ("input_mask", "segment_ids", "position_ids"):
      out[k] = np.zeros((self.rows, self.row_len), np.int32)
    if self.slot_fields:
      out["pool_positions"] = np.zeros((self.rows, self.slots), np.int32)
      for dst in self.slot_fields.values():
        out[dst] = np.full((self.rows, self.slots), -1, np.int32)
    for r, row in enumerate(element["rows"]):
      t = sum(len(self.features[i]["input_ids"]) for i in row)
      if t > self.row_len:   # checked before writing (numpy would fail on the slice first)
        raise ValueError(f"packed row of {t} tokens exceeds row_len={self.row_len}")
      if self.slot_fields and len(row) > self.slots:
        raise ValueError(f"a packed row holds {len(row)} examples, more than slots={self.slots}")
      t = 0
      for seg, i in enumerate(row, start=1):
        f = self.features[i]
        n = len(f["input_ids"])
        for key in self.pad_values:
          if key in f:
            out[key][r, t:t + n] = f[key]
        out["input_mask"][r, t:t + n] = 1
        out["segment_ids"][r, t:t + n] = seg
        out["position_ids"][r, t:t + n] = np.arange(n)
        for src, dst in self.slot_fields.items():
          out[dst][r, seg - 1] = f[src]
        if self.slot_fields:
          out["pool_positions"][r, seg - 1] = t
        t += n
    out["_step"] = element["step"]
    return out


class GatherRows(grain.transforms.Map):
  """Batch spec {'rows': (start, end), 'step': s} -> packed (B, T) arrays; dummy rows past the end."""

  def __init__(self, packed: dict, batch_size: int, pad_id: int):
    self.packed = packed
    self.batch_size = batch_size
    self.pad_id = pad_id

  def map(self, element):
    start, end = element["rows"]
    out = {}
    for k, v in self.packed.items():
      arr = np.full((self.batch_size, v.shape[1]), self.pad_id if k == "input_ids" else 0, np.int32)
      arr[:end - start] = v[start:end]
      out[k] = arr
    out["_step"] = element["step"]
    return out


class MaskTokens(grain.transforms.Map):
  """MLM corruption of a batch; deterministic in (seed, the batch's step). Adds 'labels'."""

  def __init__(self, tokenizer, seed: int, rate=0.15, whole_word=False, mask_frac=0.8, random_frac=0.1):
    if tokenizer.mask_token_id is None:
      raise ValueError("MLM masking needs a tokenizer with a mask token (e.g. BERT WordPiece)")
    self.kw = dict(mask_id=tokenizer.mask_token_id, special_ids=tuple(tokenizer.all_special_ids),
                   pool=masking.random_token_pool(tokenizer), rate=rate, mask_frac=mask_frac,
                   random_frac=random_frac,
                   word_starts=masking.word_start_table(tokenizer) if whole_word else None)
    self.seed = seed

  def map(self, element):
    ids, labels = masking.mask_tokens(element["input_ids"], element["input_mask"], seed=self.seed,
                                      step=element["_step"], **self.kw)
    return dict(element, input_ids=ids, labels=labels)


class NextTokenLabels(grain.transforms.Map):
  """CLM targets: next token within the same segment, -1 at a segment's last token and on padding."""

  def map(self, element):
    return dict(element, labels=packing.next_token_labels(element["input_ids"], element["segment_ids"]))


class NoLabels(grain.transforms.Map):
  """Packed rows as they are, unmasked and without labels (e.g. general distillation's inputs)."""

  def map(self, element):
    return element


class CastDtypes(grain.transforms.Map):
  """int64 -> int32 everywhere; float -> bfloat16 for the keys in `bfloat16_keys`; drops private '_' keys."""

  def __init__(self, bfloat16_keys: Sequence[str] = ()):
    self.bfloat16_keys = set(bfloat16_keys)

  def map(self, element):
    out = {}
    for k, v in element.items():
      if k.startswith("_"):
        continue
      v = np.asarray(v)
      if v.dtype == np.int64:
        v = v.astype(np.int32)
      elif k in self.bfloat16_keys and np.issubdtype(v.dtype, np.floating):
        v = v.astype(ml_dtypes.bfloat16)
      out[k] = v
    return out


def log_counts(name: str, counts: dict) -> None:
  """Logs non-zero skip/repair/fallback counts (nothing is skipped silently)."""
  nonzero = {k: v for k, v in counts.items() if v}
  if nonzero:
    logging.warning("%s: %s", name, nonzero)
