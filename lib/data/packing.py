"""Packing documents into fixed-length rows with segment ids and per-segment positions; CLM labels."""

import numpy as np


def pack_stream(docs, row_len: int, pad_id: int):
  """Concatenates documents (in the given order) and cuts the stream into rows of `row_len` tokens.

  A document that does not fit in the rest of a row continues in the next row as a new segment, so no
  token is lost or duplicated and only the last row has padding.

  Args:
    docs: sequence of 1-D int arrays (each already wrapped in its special tokens).
    row_len: tokens per row.
    pad_id: id of padding.

  Returns:
    dict of (R, row_len) int32 arrays: input_ids, input_mask, segment_ids (1.. within each row, 0 = pad),
    position_ids (0 at each segment's first token in the row, 0 on padding).
  """
  lengths = np.array([len(d) for d in docs], np.int64)
  ids = np.concatenate([np.asarray(d, np.int32) for d in docs]) if len(docs) else np.zeros(0, np.int32)
  doc = np.repeat(np.arange(len(docs)), lengths)
  n = len(ids)
  rows = max(1, -(-n // row_len))
  pad = rows * row_len - n
  ids = np.concatenate([ids, np.full(pad, pad_id, np.int32)]).reshape(rows, row_len)
  doc = np.concatenate([doc, np.full(pad, -1)]).reshape(rows, row_len)
  mask = (doc >= 0).astype(np.int32)
  new_seg = np.ones_like(mask, bool)
  new_seg[:, 1:] = doc[:, 1:] != doc[:, :-1]
  segment_ids = np.cumsum(new_seg, axis=1) * mask
  t = np.broadcast_to(np.arange(row_len), (rows, row_len))
  seg_start = np.maximum.accumulate(np.where(new_seg, t, 0), axis=1)
  position_ids = (t - seg_start) * mask
  return dict(input_ids=ids, input_mask=mask, segment_ids=segment_ids.astype(np.int32),
              position_ids=position_ids.astype(np.int32))


def next_token_labels(input_ids, segment_ids):
  """CLM targets: the next token when it is in the same (non-pad) segment, else -1. (B, T) int32."""
  ids, seg = np.asarray(input_ids), np.asarray(segment_ids)
  labels = np.full(ids.shape, -1, np.int32)
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  labels[:, :-1] = np.where(same, ids[:, 1:], -1)
  return labels


def attention_mask(input_mask, segment_ids, causal: bool = False):
  """(B, T, T) bool: query i may attend key j (same non-pad segment; j <= i if causal). Mirrors the models."""
  m = np.asarray(input_mask).astype(bool)
  seg = np.asarray(segment_ids)
  allowed = m[:, None, :] & (seg[:, :, None] == seg[:, None, :])
  if causal:
    allowed &= np.tril(np.ones((seg.shape[1],) * 2, bool))[None]
  return allowed


def pack_windows(lengths, row_len: int, order) -> list:
  """First-fit decreasing: the examples `order` (indices into `lengths`) into rows of at most
  `row_len` tokens, none split; longest first, each into the first row it fits.

  Returns:
    list of rows, each a list of example indices (longest first within a row).

  Raises:
    ValueError: an example longer than row_len.
  """
  lengths = np.asarray(lengths)
  order = np.asarray(order, np.int64)
  if len(order) and lengths[order].max() > row_len:
    raise ValueError(f"an example of {int(lengths[order].max())} tokens exceeds the row length "
                     f"{row_len}")
  rows, free = [], []
  for i in order[np.argsort(-lengths[order], kind="stable")].tolist():
    n = int(lengths[i])
    for r, f in enumerate(free):
      if f >= n:
        rows[r].append(i)
        free[r] -= n
        break
    else:
      rows.append([i])
      free.append(row_len - n)
  return rows


def train_pack_plan(lengths, rows_per_batch: int, row_len: int, seed: int, epoch: int,
                    chunk: int = 1600, num_batches: int = 0) -> list:
  """Batches of one packed training epoch, a pure function of (seed, epoch): shuffle the examples;
  pack each `chunk` of them into rows (pack_windows); shuffle the rows; `rows_per_batch` rows a
  batch. Without `num_batches` the remainder rows are left out (different examples each epoch).
  With it the epoch has exactly that many batches (epochs pack to slightly different counts, and a
  training iterator needs one length): extra batches are left out, and a short epoch is topped up
  with rows packed from a second shuffle of the examples (a few examples seen twice).

  Returns:
    list of batches, each a list of rows (lists of example indices).
  """
  rng = np.random.default_rng([seed, epoch])
  perm = rng.permutation(len(lengths))
  rows = []
  for c in range(0, len(perm), max(1, chunk)):
    rows += pack_windows(lengths, row_len, perm[c:c + chunk])
  rows = [rows[i] for i in rng.permutation(len(rows))]
  while num_batches and len(rows) < num_batches * rows_per_batch and len(perm):
    extra = rng.permutation(len(lengths))[:max(1, chunk)]
    rows += pack_windows(lengths, row_len, extra)
  n = num_batches or len(rows) // rows_per_batch
  return [rows[b * rows_per_batch:(b + 1) * rows_per_batch] for b in range(n)]
