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
