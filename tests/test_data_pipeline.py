"""Batch iterators: determinism, exact resume, sharding, fixed shapes and buckets, labels vs the raw files."""

import json
import os
import tempfile

import ml_dtypes
import numpy as np
import pytest

from lib import data, hf
from lib.data import transforms

DATA = data.DEFAULT_DATA_DIR
CACHE = os.environ.get("WORKBENCH_TEST_DATA_CACHE", os.path.join(tempfile.gettempdir(), "workbench_data_test"))


@pytest.fixture(scope="module")
def tok():
  return hf.load_bert_tokenizer("minilm")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _conll(tok, **kw):
  args = dict(batch_size=32, max_len=128, seed=0, train=True, cache_dir=CACHE)
  return data.make_batches("conll2003", "train", tok, **dict(args, **kw))


def test_same_seed_same_batches_other_seed_differs(tok):
  a, b, c = _take(_conll(tok), 5), _take(_conll(tok), 5), _take(_conll(tok, seed=1), 5)
  _assert_same(a, b)
  assert any(x["input_ids"].shape != y["input_ids"].shape or (x["input_ids"] != y["input_ids"]).any()
             for x, y in zip(a, c))


@pytest.mark.parametrize("dataset,kw", [
    ("conll2003", dict(batch_size=512, max_len=128)),        # 27 batches/epoch: the resume crosses an epoch
    ("sst2", dict(batch_size=64, max_len=66)),
    ("text:conll2003", dict(batch_size=64, max_len=128, whole_word_masking=True)),   # MLM masks resume too
])
def test_restored_iterator_yields_the_same_remaining_batches(tok, dataset, kw):
  it = data.make_batches(dataset, "train", tok, seed=3, train=True, cache_dir=CACHE, **kw)
  _take(it, 20)
  state = json.loads(json.dumps(it.get_state()))
  rest = _take(it, 15)
  fresh = data.make_batches(dataset, "train", tok, seed=3, train=True, cache_dir=CACHE, **kw)
  fresh.set_state(state)
  _assert_same(_take(fresh, 15), rest)
  if dataset == "conll2003":
    assert len(it) == 27 and it.get_state()["epoch"] == 1


def test_set_state_rejects_another_pipeline(tok):
  state = _conll(tok).get_state()
  with pytest.raises(ValueError, match="iterator state is for pipeline"):
    _conll(tok, seed=9).set_state(state)


def test_train_epoch_uses_each_example_at_most_once_and_reshuffles(tok):
  it = data.make_batches("sst2", "train", tok, batch_size=500, max_len=66, train=True, cache_dir=CACHE)
  epochs = [np.concatenate([b["example_ids"] for b in _take(it, len(it))]) for _ in range(2)]
  for ids in epochs:
    assert len(ids) == 67349 // 500 * 500 == len(set(ids.tolist()))     # only the n % 500 remainder is left out
  assert (epochs[0] != epochs[1]).any() and set(epochs[0]) != set(epochs[1])


def test_fixed_shapes_buckets_and_dummy_rows(tok):
  buckets = transforms.bucket_lengths(128)
  assert buckets == [16, 32, 48, 64, 80, 96, 112, 128] and transforms.bucket_lengths(66) == [16, 32, 48, 64, 66]
  seen = set()
  for b in _take(_conll(tok), 100):
    t = b["input_ids"].shape[1]
    assert b["input_ids"].shape == (32, t) and t in buckets and all(v.dtype == np.int32 for v in b.values())
    assert b["input_mask"].sum(1).max() > (t - 16)                 # the smallest bucket that fits
    seen.add(t)
  assert len(seen) >= 3
  ev = list(data.make_batches("sst2", "validation", tok, batch_size=100, max_len=66, cache_dir=CACHE))
  assert len(ev) == 9 and all(b["input_ids"].shape[0] == 100 for b in ev)
  last = ev[-1]
  assert (last["example_ids"][72:] == -1).all() and (last["input_mask"][72:] == 0).all()
  assert (last["label"][72:] == -1).all() and (last["example_ids"][:72] >= 0).all()
  it = data.make_batches("sst2", "validation", tok, batch_size=100, max_len=66, cache_dir=CACHE)
  assert len(list(it)) == len(list(it)) == 9                     # each `for` over an eval iterator is a full pass


def test_sst2_batches_match_the_tsv(tok):
  lines = open(os.path.join(DATA, "sst2", "dev.tsv"), encoding="utf-8").read().splitlines()[1:]
  gold = [(s.strip(), int(l)) for s, l in (x.rsplit("\t", 1) for x in lines)]
  seen = 0
  for b in data.make_batches("sst2", "validation", tok, batch_size=64, max_len=66, cache_dir=CACHE):
    for r in np.flatnonzero(b["example_ids"] >= 0):
      sent, label = gold[b["example_ids"][r]]
      assert b["label"][r] == label
      ids = b["input_ids"][r][b["input_mask"][r] == 1]
      assert ids.tolist() == tok(sent)["input_ids"]
      seen += 1
  assert seen == 872


def test_token_cls_train_labels_sit_on_first_subwords(tok):
  src = data.load_split("conll2003", "train", DATA, CACHE)
  for label_all in (False, True):
    b = next(_conll(tok, label_all_subwords=label_all))
    for r in range(4):
      words = [w.decode() for w in src[b["example_ids"][r]]["tokens"]]
      gold = src[b["example_ids"][r]]["ner"]
      pieces = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
      want = [-1] + [g if k == 0 or label_all else -1 for p, g in zip(pieces, gold) for k in range(len(p))] + [-1]
      n = len(want)
      assert b["labels"][r, :n].tolist() == want and (b["labels"][r, n:] == -1).all()


def test_shards_are_disjoint_and_cover_the_split(tok):
  for dataset, n in (("sst2", 872), ("conll2003", 3250)):
    ids = []
    for i in range(3):
      it = data.make_batches(dataset, "validation", tok, batch_size=64, max_len=128, shard_index=i,
                             shard_count=3, cache_dir=CACHE)
      shard = {int(e) for b in it for e in b["example_ids"] if e >= 0}
      assert shard == set(range(*data.shard_range(n, i, 3)))
      ids.append(shard)
    assert sorted(set.union(*ids)) == list(range(n)) and sum(map(len, ids)) == n
  with pytest.raises(ValueError, match="shard_index=2 must be in"):
    data.shard_range(10, 2, 2)


def test_multi_host_eval_can_run_equal_steps_with_dummy_batches(tok):
  its = [data.make_batches("sst2", "validation", tok, batch_size=100, max_len=66, shard_index=i, shard_count=2,
                           steps_per_epoch=6, cache_dir=CACHE) for i in range(2)]
  for it in its:
    batches = list(it)
    assert len(batches) == 6 and {b["input_ids"].shape for b in batches} == {(100, 66)}
    assert (batches[-1]["example_ids"] == -1).all() and (batches[-1]["input_mask"] == 0).all()
  with pytest.raises(ValueError, match="steps_per_epoch=9999 but this shard has only"):
    data.make_batches("sst2", "train", tok, batch_size=100, max_len=66, train=True, steps_per_epoch=9999,
                      cache_dir=CACHE)


def test_padding_stats_and_state_is_kept(tok):
  it = _conll(tok)
  _take(it, 3)
  state = it.get_state()
  stats = data.padding_stats(it, 10)
  assert it.get_state() == state
  first = _take(_conll(tok), 10)
  real = sum(int(b["input_mask"].sum()) for b in first)
  total = sum(b["input_mask"].size for b in first)
  assert stats["real_tokens"] == real and stats["total_tokens"] == total
  assert stats["padding_fraction"] == pytest.approx(1 - real / total)


def test_from_config(tok):
  cfg = dict(dataset="sst2", batch_size=16, eval_batch_size=50, max_len=66, seed=0, cache_dir=CACHE,
             buckets=None)
  it = data.from_config(cfg, tok, "validation", train=False)
  assert len(it) == 18
  with pytest.raises(ValueError, match=r"unknown keys \['stride'\] for dataset 'sst2'"):
    data.from_config(dict(cfg, stride=8), tok, "validation", train=False)


def test_cast_dtypes():
  out = transforms.CastDtypes(bfloat16_keys=["w"]).map(
      {"a": np.arange(3, dtype=np.int64), "w": np.ones(2, np.float32), "v": np.ones(2, np.float32), "_step": 1})
  assert out["a"].dtype == np.int32 and out["w"].dtype == ml_dtypes.bfloat16 and out["v"].dtype == np.float32
  assert "_step" not in out
