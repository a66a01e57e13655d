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


# ----------------------------------------------------------------------------- packed fine-tuning

def test_pack_windows_first_fit_decreasing_by_hand():
  # lengths 5, 9, 3, 6, 4 into rows of 10: longest first (9, 6, 5, 4, 3), each into the first
  # row with room: [9], [6, 4], [5, 3].
  rows = packing.pack_windows([5, 9, 3, 6, 4], 10, [0, 1, 2, 3, 4])
  assert rows == [[1], [3, 4], [0, 2]]
  with pytest.raises(ValueError, match="exceeds the row length 4"):
    packing.pack_windows([5, 3], 4, [0, 1])


@pytest.mark.parametrize("seed", [0, 1])
def test_train_pack_plan_uses_each_example_once_per_epoch_and_is_deterministic(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 60, 500)
  plan = packing.train_pack_plan(lengths, 4, 128, seed, epoch=0)
  flat = [i for b in plan for r in b for i in r]
  assert len(flat) == len(set(flat)) and len(flat) > 0.95 * len(lengths)   # remainder rows only
  assert all(len(b) == 4 and all(lengths[r].sum() <= 128 for r in b) for b in plan)
  assert packing.train_pack_plan(lengths, 4, 128, seed, epoch=0) == plan   # pure in (seed, epoch)
  assert packing.train_pack_plan(lengths, 4, 128, seed, epoch=1) != plan
  fill = lengths[flat].sum() / (len(plan) * 4 * 128)
  assert fill > 0.97, fill
  for target in (len(plan) - 3, len(plan) + 3):    # an epoch of a fixed length: cut or topped up
    fixed = packing.train_pack_plan(lengths, 4, 128, seed, epoch=2, num_batches=target)
    assert len(fixed) == target and all(len(b) == 4 for b in fixed)


def test_pack_rows_lays_windows_end_to_end_with_their_own_segments_and_positions():
  feats = [dict(input_ids=np.array([101, 7, 8, 102]), labels=np.array([-1, 1, 2, -1]),
                example_id=0),
           dict(input_ids=np.array([101, 9, 102]), labels=np.array([-1, 3, -1]), example_id=1),
           dict(input_ids=np.array([101, 5, 6, 4, 102]), labels=np.array([-1, 0, 0, 1, -1]),
                example_id=2)]
  t = data.transforms.PackRows(feats, rows=3, row_len=8,
                               pad_values=dict(input_ids=0, token_type_ids=0, labels=-1))
  out = t.map({"rows": [[0, 1], [2]], "step": 5})
  np.testing.assert_array_equal(out["input_ids"][0], [101, 7, 8, 102, 101, 9, 102, 0])
  np.testing.assert_array_equal(out["labels"][0], [-1, 1, 2, -1, -1, 3, -1, -1])
  np.testing.assert_array_equal(out["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 0])
  np.testing.assert_array_equal(out["position_ids"][0], [0, 1, 2, 3, 0, 1, 2, 0])
  np.testing.assert_array_equal(out["input_mask"][1], [1, 1, 1, 1, 1, 0, 0, 0])
  assert not out["input_mask"][2].any() and (out["labels"][2] == -1).all()   # a dummy row
  assert out["_step"] == 5 and out["token_type_ids"].shape == (3, 8)


def test_packed_rows_give_each_window_its_unpacked_logits():
  """The real BERT token classifier on a packed row: every window's logits equal those of the
  window alone in its own row (attention within the segment, positions from 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs.common import model_config  # pylint: disable=g-import-not-at-top
  from lib import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  feats = [dict(input_ids=rng.integers(1000, 2000, n).astype(np.int32),
                labels=np.zeros(n, np.int32)) for n in (7, 12, 5, 9)]
  pad = dict(input_ids=0, token_type_ids=0, labels=-1)
  packed = data.transforms.PackRows(feats, rows=1, row_len=40, pad_values=pad).map(
      {"rows": [[0, 1, 2, 3]], "step": 0})
  cfg = model_config("bert-tiny")
  cfg.vocab_size, cfg.max_len = 2048, 64
  module = models.build(cfg, "token_cls", 3)
  params, _ = models.init_params(module, jax.random.PRNGKey(0), seq_len=40)
  inputs = ("input_ids", "input_mask", "token_type_ids", "position_ids", "segment_ids")
  out, _ = module.apply({"params": params}, **{k: packed[k] for k in inputs}, deterministic=True)
  start = 0
  for f in feats:
    n = len(f["input_ids"])
    alone, _ = module.apply({"params": params}, input_ids=f["input_ids"][None],
                            input_mask=np.ones((1, n), np.int32), deterministic=True)
    # float32, different row lengths: the softmax sums over masked keys differ in order only
    np.testing.assert_allclose(np.asarray(out["logits"])[0, start:start + n],
                               np.asarray(alone["logits"])[0], rtol=1e-5, atol=1e-5)
    start += n


def test_packed_conll_training_batches(tmp_path):
  """conll: files through make_batches with pack_rows: one shape, every labelled word of the
  packed windows kept, evaluation batches unchanged."""
  from lib import model_io  # pylint: disable=g-import-not-at-top
  tok = model_io.load_tokenizer("minilm", "bert", DATA)[0]
  words = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
  tags = ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
  rng = np.random.default_rng(0)
  lines, total = [], 0
  for _ in range(60):
    n = int(rng.integers(1, 9))
    lines += [f"{w} {t}" for w, t in zip(words[:n], tags[:n])] + [""]
    total += n
  for name in ("train.txt", "valid.txt", "test.txt"):
    (tmp_path / name).write_text("\n".join(lines) + "\n")
  kw = dict(batch_size=8, max_len=32, cache_dir=str(tmp_path / "cache"))
  packed = data.make_batches(f"conll:{tmp_path}", "train", tok, train=True, pack_rows=2, **kw)
  batches = [next(packed) for _ in range(len(packed))]
  assert {b["input_ids"].shape for b in batches} == {(2, 32)}
  windows = sum(int(b["segment_ids"].max(-1).sum()) for b in batches)
  assert packed.info["examples_per_batch"] == pytest.approx(windows / len(batches))
  assert data.padding_stats(packed)["padding_fraction"] < 0.1
  labelled = sum(int((b["labels"] >= 0).sum()) for b in batches)   # one label per word
  assert 0.8 * total <= labelled <= total   # only the remainder rows' windows left out
  ev = data.make_batches(f"conll:{tmp_path}", "validation", tok, pack_rows=2, **kw)
  assert "segment_ids" not in next(iter(ev))


def test_packed_classification_rows_pool_each_sentence_at_its_own_cls():
  """Packed SST-2-style rows: labels and pool positions per slot, and the real BERT sequence
  classifier gives each packed sentence its unpacked logits; GPT-2 refuses packed pooling."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs.common import model_config  # pylint: disable=g-import-not-at-top
  from lib import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  feats = [dict(input_ids=rng.integers(1000, 2000, n).astype(np.int32), label=lab, example_id=i)
           for i, (n, lab) in enumerate([(6, 1), (11, 0), (4, 1)])]
  pad = dict(input_ids=0, token_type_ids=0)
  t = data.transforms.PackRows(feats, rows=2, row_len=24, pad_values=pad,
                               slot_fields={"label": "label"}, slots=4)
  b = t.map({"rows": [[1, 0], [2]], "step": 0})
  np.testing.assert_array_equal(b["label"], [[0, 1, -1, -1], [1, -1, -1, -1]])
  np.testing.assert_array_equal(b["pool_positions"], [[0, 11, 0, 0], [0, 0, 0, 0]])
  cfg = model_config("bert-tiny")
  cfg.vocab_size, cfg.max_len = 2048, 32
  module = models.build(cfg, "seq_cls", 2)
  params, _ = models.init_params(module, jax.random.PRNGKey(0), seq_len=24)
  inputs = ("input_ids", "input_mask", "token_type_ids", "position_ids", "segment_ids",
            "pool_positions")
  out, _ = module.apply({"params": params}, **{k: b[k] for k in inputs}, deterministic=True)
  assert out["logits"].shape == (2, 4, 2)
  for (r, s), i in {(0, 0): 1, (0, 1): 0, (1, 0): 2}.items():
    ids = feats[i]["input_ids"]
    alone, _ = module.apply({"params": params}, input_ids=ids[None],
                            input_mask=np.ones((1, len(ids)), np.int32), deterministic=True)
    np.testing.assert_allclose(np.asarray(out["logits"])[r, s], np.asarray(alone["logits"])[0],
                               rtol=1e-5, atol=1e-5)
  gpt = model_config("gpt2-tiny")
  gpt.vocab_size = 2048
  g = models.build(gpt, "seq_cls", 2)
  gparams, _ = models.init_params(g, jax.random.PRNGKey(0), seq_len=24)
  with pytest.raises(ValueError, match="need BERT's first-token pooler"):
    g.apply({"params": gparams}, **{k: b[k] for k in inputs}, deterministic=True)


def test_packed_tsv_classification_batches(tmp_path):
  from lib import model_io  # pylint: disable=g-import-not-at-top
  tok = model_io.load_tokenizer("minilm", "bert", DATA)[0]
  rng = np.random.default_rng(0)
  words = "a fine film with a dull and tedious middle but a great end".split()
  rows = ["sentence\tlabel"] + [
      " ".join(rng.choice(words, int(rng.integers(1, 12)))) + f"\t{int(rng.integers(0, 2))}"
      for _ in range(120)]
  for name in ("train.tsv", "dev.tsv", "test.tsv"):
    (tmp_path / name).write_text("\n".join(rows) + "\n")
  it = data.make_batches(f"tsv:{tmp_path}", "train", tok, batch_size=8, max_len=24, train=True,
                         pack_rows=3, cache_dir=str(tmp_path / "cache"))
  batches = [next(it) for _ in range(len(it))]
  labels = np.concatenate([b["label"][b["label"] >= 0] for b in batches])
  assert {b["input_ids"].shape for b in batches} == {(3, 24)}
  assert 0.8 * 120 <= len(labels) <= 120 and set(labels.tolist()) <= {0, 1}
  for b in batches:   # every labelled slot points at a [CLS] that starts its segment
    r, s = np.nonzero(b["label"] >= 0)
    pos = b["pool_positions"][r, s]
    assert (b["input_ids"][r, pos] == tok.cls_token_id).all() and (b["position_ids"][r, pos] == 0).all()
