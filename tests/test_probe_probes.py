"""lib/probe/probes.py: planted linear signal found at its layer, shuffled labels fail, controls."""

import jax
import numpy as np

from lib import models
from lib.probe import probes


def _planted(n=1200, d=8, layers=3, signal_layer=1, seed=0):
  """Features (L, N, D) random except at `signal_layer`, where y = argmax(x W) (3 classes)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(layers, n, d)).astype(np.float32)
  y = np.argmax(x[signal_layer] @ rng.normal(size=(d, 3)), -1).astype(np.int32)
  return x, y


def test_probe_recovers_a_planted_signal_and_fails_on_shuffled_labels():
  x, y = _planted()
  tr, ev = slice(0, 800), slice(800, None)
  kw = dict(steps=400, batch=128, lr=1e-2)
  res = probes.probe_task(x[:, tr], y[tr], x[:, ev], y[ev], 3, **kw)
  acc = np.asarray(res["accuracy"])
  assert acc[1] > 0.9, acc
  assert acc[0] < 0.55 and acc[2] < 0.55, acc          # chance is ~1/3 (majority <= ~0.45)
  assert res["mix_weights"][1] > 0.6 and abs(res["expected_layer"] - 1) < 0.4, res
  assert res["mix_accuracy"] > 0.9
  xt, xe = probes.standardize(x[:, tr], x[:, ev])
  shuffled = np.random.default_rng(1).permutation(y[tr])
  bad = probes.layer_accuracy(probes.train_layer_probes(xt, shuffled, 3, **kw), xe, y[ev])
  assert max(bad) < res["majority"] + 0.08, bad
  mlp = probes.train_layer_probes(xt, y[tr], 3, hidden=16, **kw)
  assert probes.layer_accuracy(mlp, xe, y[ev])[1] > 0.85


def test_control_labels_are_fixed_per_type_and_follow_the_label_distribution():
  types = [f"w{i % 50}" for i in range(5000)]
  labels = np.array([0] * 4000 + [1] * 1000)
  ct, ce = probes.control_labels(types, labels, ["w3", "new", "w3"], seed=0)
  by_type = {}
  for t, c in zip(types, ct):
    assert by_type.setdefault(t, c) == c
  assert ce[0] == ce[2] == by_type["w3"]
  assert 0.5 < np.mean(list(by_type.values()) == np.int32(0)) <= 1.0


def test_word_features_first_and_mean_pool_match_the_model():
  args = models.ModelArgs(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=32,
                          vocab_size=30522)
  module = models.build(args)
  params, _ = models.init_params(module, jax.random.key(0))

  class Tok:   # two pieces per word 'ab', one per other word; [CLS]=101, [SEP]=102
    cls_token_id, sep_token_id, unk_token_id = 101, 102, 100
    backend_tokenizer = type("B", (), {"pre_tokenizer": None})()
    def __call__(self, words, add_special_tokens=False):
      return {"input_ids": [[7, 8] if w == "ab" else [len(w) + 10] for w in words]}

  feats, kept = probes.word_features(module, params, Tok(), [["x", "ab", "yy"]], pool="first")
  _, inter = module.apply({"params": params}, np.array([[101, 11, 7, 8, 12, 102]]))
  ref = np.stack(inter["hidden_states"])[:, 0]                             # (L+1, T, D)
  np.testing.assert_allclose(feats, ref[:, [1, 2, 4]], atol=1e-5)
  mean, _ = probes.word_features(module, params, Tok(), [["x", "ab", "yy"]], pool="mean")
  np.testing.assert_allclose(mean[:, 1], ref[:, 2:4].mean(1), atol=1e-5)
  assert kept == [0]
  _, kept = probes.word_features(module, params, Tok(), [["x"] * 40, ["x"]], max_len=32)
  assert kept == [1]
