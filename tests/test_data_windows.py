"""Windowing of long sentences: every word gets exactly one prediction, in order; [UNK] fallback; real CoNLL."""

import logging
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lib import data, hf
from lib.data import tokenize as tok_lib

DATA = data.DEFAULT_DATA_DIR
CACHE = os.environ.get("WORKBENCH_TEST_DATA_CACHE", os.path.join(tempfile.gettempdir(), "workbench_data_test"))
CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def bert_tok():
  return hf.load_bert_tokenizer("minilm")


@st.composite
def sentences(draw):
  counts = draw(st.lists(st.integers(1, 6), min_size=1, max_size=60))
  max_len = draw(st.integers(3, 40))
  stride = draw(st.integers(1, max_len))
  return counts, max_len, stride


@settings(max_examples=300, deadline=None)
@given(sentences(), st.booleans())
def test_windowing_then_reconstruction_gives_one_prediction_per_word_in_order(case, label_all):
  counts, max_len, stride = case
  budget = max_len - 2
  # Piece ids encode (word, piece) so the test can see exactly which pieces each window holds.
  pieces = [np.array([1000 * w + k for k in range(c)], np.int32) for w, c in enumerate(counts)]
  wins = tok_lib.windows_for_sentence(pieces, np.arange(len(counts)), max_len=max_len, stride=stride,
                                      prefix=[CLS], suffix=[SEP], label_all=label_all, owned_labels_only=True)
  predicted = []                              # (word, "prediction" = the label the model would be scored on)
  spans = []
  for win in wins:
    ids = win["input_ids"]
    assert len(ids) <= max_len and ids[0] == CLS and ids[-1] == SEP
    words = sorted({int(i) // 1000 for i in ids[1:-1]})
    assert words == list(range(words[0], words[-1] + 1))                  # contiguous words
    for w in words:                                                       # whole words (cut only if > budget)
      assert [int(i) for i in ids[1:-1] if i // 1000 == w] == [1000 * w + k for k in range(min(counts[w], budget))]
    spans.append((words[0], words[-1] + 1))
    own = np.flatnonzero(win["predict_mask"])
    assert all(ids[p] == 1000 * win["word_ids"][p] for p in own)          # owned at the word's first piece
    assert all(win["labels"][p] == win["word_ids"][p] for p in own)
    assert (win["labels"][win["predict_mask"] == 0] == -1).all()          # eval: each word scored once
    predicted += [(int(win["word_ids"][p]), int(win["labels"][p])) for p in own]
  assert predicted == [(w, w) for w in range(len(counts))]                # exactly once each, in order
  assert spans[0][0] == 0 and spans[-1][1] == len(counts)
  assert all(b2 <= e1 and b2 > b1 for (b1, e1), (b2, _) in zip(spans, spans[1:]))   # no gaps, progress
  # Each word is owned by a window where it has the most context (independent brute force).
  cut = [min(c, budget) for c in counts]
  for w, _ in predicted:
    ctx = [min(sum(cut[b:w]), sum(cut[w + 1:e])) for b, e in spans if b <= w < e]
    owner = next(k for k, win in enumerate(wins) if w in win["word_ids"][win["predict_mask"] == 1])
    b, e = spans[owner]
    assert min(sum(cut[b:w]), sum(cut[w + 1:e])) == max(ctx)


def test_short_sentence_is_one_window_with_first_subword_labels():
  pieces = [np.array([5, 6]), np.array([7]), np.array([8, 9, 10])]
  (win,) = tok_lib.windows_for_sentence(pieces, np.array([1, 2, 3]), max_len=16, stride=8, prefix=[CLS],
                                        suffix=[SEP], label_all=False, owned_labels_only=False)
  assert win["input_ids"].tolist() == [CLS, 5, 6, 7, 8, 9, 10, SEP]
  assert win["labels"].tolist() == [-1, 1, -1, 2, 3, -1, -1, -1]
  assert win["word_ids"].tolist() == [-1, 0, -1, 1, 2, -1, -1, -1]
  assert win["predict_mask"].tolist() == [0, 1, 0, 1, 1, 0, 0, 0]
  (win,) = tok_lib.windows_for_sentence(pieces, np.array([1, 2, 3]), max_len=16, stride=8, prefix=[CLS],
                                        suffix=[SEP], label_all=True, owned_labels_only=False)
  assert win["labels"].tolist() == [-1, 1, 1, 2, 3, 3, 3, -1]


def test_word_with_no_pieces_becomes_unk(bert_tok, caplog):
  wp = tok_lib.WordPieces(bert_tok)
  with caplog.at_level(logging.WARNING):
    out = wp(["Hello", "\u200b", "world"])
  assert [o.tolist() for o in out] == [[7592], [bert_tok.unk_token_id], [2088]]
  assert wp.unk_fallbacks == 1 and "tokenises to no pieces" in caplog.text


def test_gpt2_words_get_a_leading_space():
  gpt = hf.load_gpt2_tokenizer(os.path.join(DATA, "gpt2-bpe"))
  out = tok_lib.WordPieces(gpt)(["Hello", "world"])
  assert gpt.decode(np.concatenate(out)) == " Hello world"


def _raw_conll_tags(path):
  """Independent minimal parse: per sentence, the last column of each line."""
  sents, cur = [], []
  for line in open(path, encoding="utf-8"):
    cols = line.split()
    if not cols or cols[0] == "-DOCSTART-":
      if cur:
        sents.append(cur)
      cur = []
    else:
      cur.append(cols[-1])
  return sents + ([cur] if cur else [])


def test_real_conll_eval_predicts_every_word_with_short_windows(bert_tok):
  gold = _raw_conll_tags(os.path.join(DATA, "conll2003", "valid.txt"))
  it = data.make_batches("conll2003", "validation", bert_tok, batch_size=64, max_len=24, stride=8,
                         train=False, cache_dir=CACHE)
  assert it.info["long_sentences"] > 200                        # many sentences need several windows
  names = it.info["label_names"]
  pred = [[None] * len(g) for g in gold]
  for batch in it:
    own = batch["predict_mask"] == 1
    rows, cols = np.nonzero(own)
    for r, c in zip(rows, cols):
      e, w = batch["example_ids"][r], batch["word_ids"][r, c]
      assert pred[e][w] is None
      pred[e][w] = names[batch["labels"][r, c]]      # the label sits exactly where the prediction is read
    assert (batch["labels"][~own] == -1).all()
  assert pred == gold                                 # no word dropped, none defaulted to O
