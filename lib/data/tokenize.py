"""Sub-word tokenisation that never loses a word: word pieces with [UNK] fallback, overlapping windows, ownership."""

import bisect
import hashlib
import logging
from typing import Sequence

import numpy as np

_FINGERPRINTS = {}


def tokenizer_fingerprint(tokenizer) -> str:
  """Stable hash of a fast tokenizer's full definition (vocab, merges, normaliser, specials)."""
  key = id(tokenizer)
  if key not in _FINGERPRINTS or _FINGERPRINTS[key][0] is not tokenizer:
    digest = hashlib.blake2b(tokenizer.backend_tokenizer.to_str().encode(), digest_size=8).hexdigest()
    _FINGERPRINTS[key] = (tokenizer, digest)
  return _FINGERPRINTS[key][1]


def is_byte_level(tokenizer) -> bool:
  """True for byte-level BPE (GPT-2), where a word inside a sentence is tokenised with a leading space."""
  return "ByteLevel" in repr(tokenizer.backend_tokenizer.pre_tokenizer)


def special_wrap(tokenizer):
  """(prefix ids, suffix ids) around one sequence: BERT [CLS] .. [SEP]; GPT-2 nothing."""
  pre = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
  suf = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
  return pre, suf


class WordPieces:
  """Word -> piece ids, tokenising each distinct word once with the batched fast tokenizer.

  A word that tokenises to no pieces (e.g. a lone zero-width space under BERT's normaliser) becomes
  [UNK] so it still gets a label and a prediction; such words are counted in `unk_fallbacks`.
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.prefix = " " if is_byte_level(tokenizer) else ""
    self.unk = tokenizer.unk_token_id
    self.cache = {}
    self.unk_fallbacks = 0

  def prime(self, words) -> None:
    """Tokenises every not-yet-seen word of `words` in one batched call."""
    new = sorted({w for w in words if w not in self.cache})
    if not new:
      return
    ids = self.tokenizer([self.prefix + w for w in new], add_special_tokens=False)["input_ids"]
    for w, p in zip(new, ids):
      if not p:
        if self.unk is None:
          raise ValueError(f"word {w!r} tokenises to no pieces and the tokenizer has no unk token")
        p = [self.unk]
        self.unk_fallbacks += 1
        logging.warning("word %r tokenises to no pieces; using the unk token %d", w, self.unk)
      self.cache[w] = np.asarray(p, np.int32)

  def __call__(self, words: Sequence[str]) -> list:
    """Piece ids (int32 arrays, each non-empty) of each word."""
    self.prime(words)
    return [self.cache[w] for w in words]


def plan_windows(counts: Sequence[int], budget: int, stride: int) -> list:
  """Splits a sentence into windows of whole words holding at most `budget` pieces.

  Args:
    counts: pieces per word (each >= 1 and <= budget; longer words must be cut by the caller).
    budget: pieces per window (max_len minus special tokens).
    stride: pieces between consecutive window starts (the next window starts at the first word at least
      `stride` pieces after the previous start, never leaving a gap).

  Returns:
    list of (first word, end word) half-open ranges covering all words, in order.
  """
  offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
  n, b, windows = len(counts), 0, []
  while True:
    e = bisect.bisect_right(offsets, offsets[b] + budget) - 1   # last word end that fits
    e = max(e, b + 1)
    windows.append((b, min(e, n)))
    if e >= n:
      return windows
    nb = bisect.bisect_left(offsets, offsets[b] + stride)
    b = min(max(nb, b + 1), e)


def window_owners(counts: Sequence[int], windows: Sequence[tuple]) -> np.ndarray:
  """For each word, the window where it has most context: max of min(left, right) pieces, ties -> earlier.

  Returns:
    (num_words,) int array of window indices.
  """
  offsets = np.concatenate([[0], np.cumsum(counts)])
  best = np.full(len(counts), -1.0)
  owner = np.full(len(counts), -1, np.int64)
  for k, (b, e) in enumerate(windows):
    left = offsets[b:e] - offsets[b]
    right = offsets[e] - offsets[b + 1:e + 1]
    score = np.minimum(left, right).astype(np.float64)
    better = score > best[b:e]
    owner[b:e][better] = k
    best[b:e][better] = score[better]
  return owner


def windows_for_sentence(pieces: list, labels, *, max_len: int, stride: int, prefix, suffix,
                         label_all: bool, owned_labels_only: bool) -> list:
  """Token-classification windows of one sentence.

  Args:
    pieces: per word, non-empty piece-id arrays.
    labels: per word label id (or None for unlabelled data).
    max_len: window length including special tokens.
    stride: see plan_windows.
    prefix, suffix: special-token ids around each window.
    label_all: label every sub-word with its word's label (else only the first); training only.
    owned_labels_only: evaluation: a label only at the first sub-word of each word this window owns, so
      each word is scored exactly once (label_all is ignored).

  Returns:
    list of dicts input_ids, labels, word_ids, predict_mask (1-D int32 arrays, no padding). A word with
    more pieces than a window holds keeps its first `budget` pieces (callers count these: cut_words).
  """
  budget = window_budget(max_len, prefix, suffix)
  pieces = [p[:budget] for p in pieces]
  counts = [len(p) for p in pieces]
  windows = plan_windows(counts, budget, stride) if sum(counts) > budget else [(0, len(pieces))]
  owner = window_owners(counts, windows) if len(windows) > 1 else np.zeros(len(pieces), np.int64)
  out = []
  for k, (b, e) in enumerate(windows):
    ids = np.concatenate([prefix] + pieces[b:e] + [suffix]).astype(np.int32)
    word_ids = np.full(len(ids), -1, np.int32)
    lab = np.full(len(ids), -1, np.int32)
    own = np.zeros(len(ids), np.int32)
    pos = len(prefix)
    for w in range(b, e):
      word_ids[pos] = w
      own[pos] = owner[w] == k
      if labels is not None and not owned_labels_only:
        lab[pos:pos + (counts[w] if label_all else 1)] = labels[w]
      elif labels is not None and own[pos]:
        lab[pos] = labels[w]
      pos += counts[w]
    out.append(dict(input_ids=ids, labels=lab, word_ids=word_ids, predict_mask=own))
  return out


def window_budget(max_len: int, prefix, suffix) -> int:
  """Word pieces that fit in one window next to the special tokens."""
  budget = max_len - len(prefix) - len(suffix)
  if budget < 1:
    raise ValueError(f"max_len={max_len} leaves no room for words after {len(prefix) + len(suffix)} special tokens")
  return budget
