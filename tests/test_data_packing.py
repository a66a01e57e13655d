"""Packing: no attention across segments (mask and the model's real weights), positions, no token lost; CLM."""

import os
import tempfile

import numpy as np
import pytest

from lib import data, hf
from lib.data import packing

DATA = data.DEFAULT_DATA_DIR
CACHE = os.environ.get("WORKBENCH_TEST_DATA_CACHE", os.path.join(tempfile.gettempdir(), "workbench_data_test"))


def _docs(seed, n=30, row_len=16):
  rng = np.random.default_rng(seed)
  return [rng.integers(1000, 2000, rng.integers(1, 3 * row_len)).astype(np.int32) for _ in range(n)]


def _segments_by_brute_force(packed, docs, row_len):
  """Independent reference: (doc index, offset in doc) of every row position, walking the stream."""
  ref = np.full(packed["input_ids"].shape + (2,), -1)
  pos = 0
  for d, doc in enumerate(docs):
    for k in range(len(doc)):
      ref[pos // row_len, pos % row_len] = (d, k)
      pos += 1
  return ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_stream_keeps_every_token_once_and_restarts_positions(seed):
  row_len = 16
  docs = _docs(seed, row_len=row_len)
  p = packing.pack_stream(docs, row_len, pad_id=0)
  ref = _segments_by_brute_force(p, docs, row_len)
  real = p["input_mask"] == 1
  np.testing.assert_array_equal(p["input_ids"][real], np.concatenate(docs))       # nothing lost or duplicated
  assert (p["input_ids"][~real] == 0).all() and not real[:-1].__invert__().any()  # padding only in the last row
  for r in range(len(p["input_ids"])):
    docs_in_row = ref[r, :, 0][real[r]]
    _, first = np.unique(docs_in_row, return_index=True)
    expect_seg = np.searchsorted(np.sort(first), np.arange(len(docs_in_row)), side="right")
    np.testing.assert_array_equal(p["segment_ids"][r][real[r]], expect_seg)       # 1.. in order of appearance
    row_start_offset = {d: ref[r, i, 1] for i, d in reversed(list(enumerate(docs_in_row)))}
    expect_pos = [ref[r, i, 1] - row_start_offset[d] for i, d in enumerate(docs_in_row)]
    np.testing.assert_array_equal(p["position_ids"][r][real[r]], expect_pos)      # restart per segment
  assert (p["segment_ids"][~real] == 0).all()


def test_attention_mask_never_crosses_segments():
  p = packing.pack_stream(_docs(3), 16, pad_id=0)
  for causal in (False, True):
    allowed = packing.attention_mask(p["input_mask"], p["segment_ids"], causal)
    b, t = p["segment_ids"].shape
    for r in range(b):
      for i in range(t):
        for j in range(t):
          want = bool(p["input_mask"][r, j]) and p["segment_ids"][r, i] == p["segment_ids"][r, j]
          assert allowed[r, i, j] == (want and (j <= i or not causal))


def test_model_attention_weights_are_zero_across_segments():
  """The real BERT and GPT-2 attention (lib.models) given our packed batch: no weight crosses a segment."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs.common import model_config  # pylint: disable=g-import-not-at-top
  from lib import models  # pylint: disable=g-import-not-at-top
  p = packing.pack_stream(_docs(4, n=8), 32, pad_id=0)
  batch = {k: np.asarray(v) for k, v in p.items()}
  for preset in ("bert-tiny", "gpt2-tiny"):
    cfg = model_config(preset)
    cfg.num_layers, cfg.vocab_size = 1, 2048   # the mask is built once and shared by every layer
    module = models.build(cfg)
    params, _ = models.init_params(module, jax.random.PRNGKey(0), seq_len=32)
    _, inter = module.apply({"params": params}, **batch, deterministic=True, output_attentions=True)
    cross = batch["segment_ids"][:, :, None] != batch["segment_ids"][:, None, :]            # (B, T, T)
    real_q = batch["input_mask"][:, :, None] == 1
    for att in inter["attentions"]:                                                          # (B, H, T, T)
      w = np.asarray(att).max(axis=1)
      assert w[cross & real_q].max() == 0.0, preset


def test_next_token_labels_stay_within_segment():
  p = packing.pack_stream(_docs(5), 16, pad_id=0)
  labels = packing.next_token_labels(p["input_ids"], p["segment_ids"])
  ids, seg = p["input_ids"], p["segment_ids"]
  b, t = ids.shape
  for r in range(b):
    for i in range(t):
      same = i + 1 < t and seg[r, i] > 0 and seg[r, i + 1] == seg[r, i]
      assert labels[r, i] == (ids[r, i + 1] if same else -1)


def test_clm_pipeline_streams_every_token_of_every_document():
  """Eval CLM over Shakespeare validation, GPT-2 BPE: real tokens == each document tokenised + <|endoftext|>."""
  gpt = hf.load_gpt2_tokenizer(os.path.join(DATA, "gpt2-bpe"))
  it = data.make_batches("text:shakespeare", "validation", gpt, batch_size=8, max_len=64, cache_dir=CACHE)
  assert it.info["objective"] == "clm"
  got = []
  for batch in it:
    assert batch["input_ids"].shape == (8, 64)
    got.append(batch["input_ids"][batch["input_mask"] == 1])
    np.testing.assert_array_equal(batch["labels"], packing.next_token_labels(batch["input_ids"],
                                                                             batch["segment_ids"]))
  src = data.load_split("text:shakespeare", "validation", DATA, CACHE)
  want = [gpt(src[i]["text"].decode())["input_ids"] + [gpt.eos_token_id] for i in range(len(src))]
  np.testing.assert_array_equal(np.concatenate(got), np.concatenate(want))
