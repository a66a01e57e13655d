"""MLM masking: 15% and 80/10/10 over a large sample, specials and padding never masked, whole words, determinism."""

import os
import tempfile

import numpy as np
import pytest

from lib import data, hf
from lib.data import masking

DATA = data.DEFAULT_DATA_DIR
CACHE = os.environ.get("WORKBENCH_TEST_DATA_CACHE", os.path.join(tempfile.gettempdir(), "workbench_data_test"))


@pytest.fixture(scope="module")
def tok():
  return hf.load_bert_tokenizer("minilm")


def _batch(tok, seed, b=64, t=128):
  """Random rows: [CLS] words [SEP] [CLS] words [SEP] then padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, len(tok), (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  for r in range(b):
    n = rng.integers(10, t)
    cut = rng.integers(2, n - 2)
    ids[r, [0, cut + 1]] = tok.cls_token_id
    ids[r, [cut, n - 1]] = tok.sep_token_id
    ids[r, n:] = tok.pad_token_id
    mask[r, n:] = 0
  return ids, mask


def _kw(tok, whole_word=False):
  return dict(mask_id=tok.mask_token_id, special_ids=tok.all_special_ids, pool=masking.random_token_pool(tok),
              word_starts=masking.word_start_table(tok) if whole_word else None)


@pytest.mark.parametrize("whole_word", [False, True])
def test_rates_over_a_large_sample_and_specials_never_masked(tok, whole_word):
  chosen = cand_total = n_mask = n_random = n_same = 0
  for step in range(30):
    ids, mask = _batch(tok, step)
    out, labels = masking.mask_tokens(ids, mask, seed=0, step=step, **_kw(tok, whole_word))
    special = np.isin(ids, tok.all_special_ids) | (mask == 0)
    picked = labels >= 0
    assert not (picked & special).any() and (out[special] == ids[special]).all()
    assert (labels[picked] == ids[picked]).all() and (out[~picked] == ids[~picked]).all()
    chosen += picked.sum()
    cand_total += (~special).sum()
    n_mask += (out[picked] == tok.mask_token_id).sum()
    n_same += (out[picked] == ids[picked]).sum()
    n_random += ((out[picked] != ids[picked]) & (out[picked] != tok.mask_token_id)).sum()
    assert not np.isin(out[picked & (out != tok.mask_token_id)], tok.all_special_ids).any()
  # ~110k candidates, ~16k chosen: binomial sd of the 10% shares is ~0.25%.
  assert abs(chosen / cand_total - 0.15) < (0.01 if not whole_word else 0.02)
  assert abs(n_mask / chosen - 0.8) < 0.01
  assert abs(n_random / chosen - 0.1) < 0.01 and abs(n_same / chosen - 0.1) < 0.01


def test_whole_word_masking_masks_all_pieces_of_a_word(tok):
  text = "the unbelievably extraordinary sesquipedalian lexicographers antidisestablishmentarianism " * 6
  ids = np.array([tok(text)["input_ids"]] * 16, np.int32)
  mask = np.ones_like(ids)
  starts = masking.word_start_table(tok)[ids]
  word = np.cumsum(starts, axis=1)
  _, labels = masking.mask_tokens(ids, mask, seed=1, step=0, **_kw(tok, whole_word=True))
  for r in range(len(ids)):
    for w in np.unique(word[r]):
      sel = labels[r][(word[r] == w) & ~np.isin(ids[r], tok.all_special_ids)] >= 0
      assert sel.all() or not sel.any()
  assert (labels >= 0).any()


def test_deterministic_given_seed_and_step(tok):
  ids, mask = _batch(tok, 0)
  a = masking.mask_tokens(ids, mask, seed=3, step=7, **_kw(tok))
  b = masking.mask_tokens(ids, mask, seed=3, step=7, **_kw(tok))
  c = masking.mask_tokens(ids, mask, seed=3, step=8, **_kw(tok))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert (a[1] != c[1]).any()


def test_mlm_pipeline_masks_the_packed_rows_it_would_otherwise_emit(tok):
  """MLM and CLM pipelines with the same seed pack identically; MLM only corrupts what its labels record."""
  kw = dict(batch_size=16, max_len=128, seed=5, train=True, cache_dir=CACHE)
  mlm = data.make_batches("text:conll2003", "train", tok, objective="mlm", **kw)
  clm = data.make_batches("text:conll2003", "train", tok, objective="clm", **kw)
  for _ in range(3):
    m, c = next(mlm), next(clm)
    picked = m["labels"] >= 0
    np.testing.assert_array_equal(m["input_ids"][~picked], c["input_ids"][~picked])
    np.testing.assert_array_equal(m["labels"][picked], c["input_ids"][picked])
    assert not np.isin(c["input_ids"][picked], tok.all_special_ids).any()
    assert 0.12 < picked.sum() / m["input_mask"].sum() < 0.16
