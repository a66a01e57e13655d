"""lib/fewshot_ner.py and lib/tasks/token_contrastive.py: K-shot NER samples, word pairs, the
word-pair loss; a tiny end-to-end few-shot NER run of research/fewshot.py (slow)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lib import fewshot_ner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTITIES = {"PER": ["John Smith", "Mary"], "ORG": ["Acme Corp", "UN"],
            "LOC": ["Paris", "New York"], "MISC": ["German", "Olympic Games"]}


def _sentence(rng, name, i):
  words, tags = ["the", "man", f"{name}{i}"], ["O"] * 3
  for t in rng.choice(list(ENTITIES), size=rng.integers(0, 3), replace=False):
    e = ENTITIES[t][rng.integers(2)].split()
    words += ["near"] + e
    tags += ["O", f"B-{t}"] + [f"I-{t}"] * (len(e) - 1)
  return words, tags


def _toy_conll(folder, sizes=(("train", 80), ("validation", 10), ("test", 15)), seed=0):
  """A CoNLL folder whose every sentence names its split and index (a word like 'train7')."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  for name, n in sizes:
    fewshot_ner.write_conll(os.path.join(folder, f"{name}.conll"),
                            [_sentence(rng, name, i) for i in range(n)])
  return str(folder)


def _read(path):
  sents, cur = [], []
  for line in open(path, encoding="utf-8").read().split("\n"):
    if line.strip():
      cur.append(line.split())
    elif cur:
      sents.append(cur)
      cur = []
  return sents + ([cur] if cur else [])


def _types(sent):
  return {t.split("-")[1] for _, t in sent if t != "O"}


def test_greedy_sample_covers_each_type_k_times_deterministically():
  rng = np.random.default_rng(1)
  type_sets = [set(rng.choice(["PER", "ORG", "LOC", "MISC"], size=rng.integers(0, 3),
                              replace=False)) for _ in range(300)]
  for k in (1, 5, 10):
    idx = fewshot_ner.greedy_sample(type_sets, k, seed=3)
    for t in ("PER", "ORG", "LOC", "MISC"):       # counted by hand: sentences holding t
      assert sum(t in type_sets[i] for i in idx) >= k
    assert all(type_sets[i] for i in idx)          # only sentences with an entity are chosen
    assert np.array_equal(idx, fewshot_ner.greedy_sample(type_sets, k, seed=3))
  assert not np.array_equal(fewshot_ner.greedy_sample(type_sets, 5, seed=3),
                            fewshot_ner.greedy_sample(type_sets, 5, seed=4))
  excluded = fewshot_ner.greedy_sample(type_sets, 5, seed=3, exclude=range(150))
  assert excluded.min() >= 150


def test_greedy_sample_refuses_a_rare_type():
  with pytest.raises(ValueError, match="'LOC' occurs in only 2"):
    fewshot_ner.greedy_sample([{"PER"}] * 10 + [{"LOC"}] * 2, 3, seed=0)


def test_kshot_files_are_disjoint_from_train_only_and_cover_k(tmp_path):
  folder = _toy_conll(tmp_path / "toy")
  data_cfg = dict(dataset=f"conll:{folder}", dir="", tag_scheme="iob2")
  paths = fewshot_ner.write_kshot_data(data_cfg, 4, seed=0, out_dir=str(tmp_path / "k4"))
  train, dev, test = (_read(paths[s]) for s in ("train", "validation", "test"))
  words = lambda sents: [next(w for w, _ in s if w[-1].isdigit()) for s in sents]
  assert all(w.startswith("train") for w in words(train) + words(dev))     # never dev/test
  assert not set(words(train)) & set(words(dev))
  assert words(test) == [f"test{i}" for i in range(15)]                   # the whole test split
  for sents in (train, dev):
    for t in ENTITIES:
      assert sum(t in _types(s) for s in sents) >= 4
  again = fewshot_ner.write_kshot_data(data_cfg, 4, seed=0, out_dir=str(tmp_path / "again"))
  assert open(again["train"]).read() == open(paths["train"]).read()


def test_token_pairs_are_balanced_and_labelled_correctly():
  labels = np.array([0] * 20 + [1, 2, 2, 3, 4, 4, 4])   # 0 = 'O', 7 entity words
  a, b, t = fewshot_ner.token_pairs(labels, outside=0, iterations=3, seed=0)
  anchors = 7 + 7                                       # every entity word + as many 'O' words
  assert len(a) == 2 * 3 * anchors and (t == 1).sum() == (t == 0).sum()
  np.testing.assert_array_equal(t, (labels[a] == labels[b]).astype(np.float32))
  counts = np.bincount(a, minlength=len(labels))
  assert np.all(counts[20:] == 6)                       # each entity word anchors 2 x 3 pairs
  assert counts[:20].sum() == 2 * 3 * 7                 # 7 'O' anchors per iteration
  single = np.isin(labels[a], [1, 3])                   # tags with one word pair it with itself
  assert not np.any((a == b) & (t == 1) & ~single) and np.any((a == b) & single)
  half = fewshot_ner.token_pairs(labels, 0, 1, 0, outside_ratio=0.5)[0]
  assert len(half) == 2 * (7 + 4)
  with pytest.raises(ValueError, match="two tags"):
    fewshot_ner.token_pairs([0, 0, 0], 0, 1, 0)


def test_word_pair_loss_reads_each_words_hidden_state():
  from lib import fewshot, model_io, models
  from lib.tasks import token_contrastive
  tok, _ = model_io.load_tokenizer("minilm", "bert", "")
  args = models.ModelArgs(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=32,
                          vocab_size=len(tok))
  module = models.build(args, None)
  params, _ = models.init_params(module, jax.random.key(0))
  ids = np.array([[[101, 2198, 2003, 102], [101, 3000, 102, 0]],
                  [[101, 2198, 2003, 102], [101, 2198, 2003, 102]]], np.int32)
  mask = (ids != 0).astype(np.int32)
  batch = dict(input_ids=ids, input_mask=mask, token_type_ids=np.zeros_like(ids),
               positions=np.array([[1, 1], [1, 2]], np.int32), target=np.array([1.0, 0.0]))
  loss, _ = token_contrastive.make_loss(module)(params, batch, None, False)
  hidden = [[np.asarray(module.apply({"params": params}, ids[r, k][None], mask[r, k][None])[0]
                        ["last_hidden_state"])[0] for k in range(2)] for r in range(2)]
  u = np.stack([hidden[0][0][1], hidden[1][0][1]])     # the anchors' words
  v = np.stack([hidden[0][1][1], hidden[1][1][2]])
  cos = (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
  np.testing.assert_allclose(float(loss), np.mean((cos - [1.0, 0.0]) ** 2), rtol=1e-4)
  ref, _ = fewshot.cosine_similarity_loss(u, v, np.array([1.0, 0.0]))
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-4)


@pytest.mark.slow
def test_tiny_fewshot_ner_run_writes_the_outputs(tmp_path):
  folder = _toy_conll(tmp_path / "toy")
  wd = tmp_path / "fs"
  cmd = [sys.executable, "research/fewshot.py", "--config=configs/fewshot_ner.py:quick",
         f"--workdir={wd}", f"--config.data.dataset=conll:{folder}",
         "--config.model.preset=bert-tiny", "--config.model.tokenizer=minilm",
         "--config.train.num_steps=2", "--config.train.eval_every=2", "--config.data.max_len=32",
         "--config.setfit.max_pairs=32", "--config.fewshot.ks=(3,)",
         "--config.fewshot.grid=((1e-4, 4),)", f"--config.data.cache_dir={tmp_path / 'cache'}"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))  # one device
  assert out.returncode == 0, out.stderr[-3000:]
  for name in ("table.md", "results.json", "learning_curve.png", "metrics.json"):
    assert (wd / name).exists()
  results = json.load(open(wd / "results.json"))["results"]
  assert sorted(r["method"] for r in results) == ["finetune", "frozen", "setfit"]
  metrics = json.load(open(wd / "metrics.json"))
  for r in results:   # each run's test F1 equals its own metrics.json (the full test split)
    run = json.load(open(os.path.join(r["workdir"], "metrics.json")))
    assert r["test"] == run["test"]["f1"] == metrics["methods"][r["method"]]["k3"]["test"]
    assert r["test"] == metrics["at_k"][r["method"]]["test"]
    if r["method"] != "finetune":     # the tagger's C: the best K-shot dev F1 of the grid
      assert run["dev"]["c"] in (1.0, 10.0, 100.0, 1000.0)
  preds = _read(os.path.join(results[0]["workdir"], "test_predictions.conll"))
  assert len(preds) == 15 and "| finetune | 3 | 1 |" in open(wd / "table.md").read()
