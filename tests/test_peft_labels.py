"""Parameter labels from ordered path rules (lib/peft.py, label part)."""

import jax
import numpy as np
import pytest

from lib import models, peft
from training_helpers import tiny_args

PARAMS = {"encoder": {"layer_0": {"query": {"kernel": np.zeros((4, 2, 2)), "bias": np.zeros((2, 2))},
                                  "attention_ln": {"scale": np.zeros(4), "bias": np.zeros(4)}},
                      "embeddings": {"word": {"embedding": np.zeros((10, 4))}}},
          "classifier": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}}


def test_first_matching_rule_wins_and_paths_are_slash_joined():
  rules = [("classifier/.*", "head"), (".*/bias", "freeze"), (".*", "train")]
  labels = peft.label_params(PARAMS, rules, log=False)
  assert labels["classifier"] == {"kernel": "head", "bias": "head"}
  assert labels["encoder"]["layer_0"]["query"] == {"kernel": "train", "bias": "freeze"}
  assert labels["encoder"]["layer_0"]["attention_ln"] == {"scale": "train", "bias": "freeze"}
  assert labels["encoder"]["embeddings"]["word"]["embedding"] == "train"


def test_full_match_not_search():
  # 'bias' alone must not match 'classifier/bias' (fullmatch): it then matches nothing -> error.
  with pytest.raises(ValueError, match=r"match no parameter.*#0 \('bias', 'freeze'\)"):
    peft.label_params(PARAMS, [("bias", "freeze"), (".*", "train")], log=False)


def test_unmatched_parameters_raise_listing_every_path():
  with pytest.raises(ValueError) as e:
    peft.label_params(PARAMS, [("encoder/.*", "train")], log=False)
  msg = str(e.value)
  assert "2 parameters match no peft rule" in msg
  assert "classifier/kernel" in msg and "classifier/bias" in msg


def test_rule_shadowed_by_earlier_rule_raises():
  with pytest.raises(ValueError, match="match no parameter"):
    peft.label_params(PARAMS, [(".*", "train"), ("classifier/.*", "head")], log=False)


@pytest.mark.parametrize("rules", [[], [("(", "train")], [(".*",)], [(".*", 3)]])
def test_malformed_rules_raise(rules):
  with pytest.raises(ValueError):
    peft.label_params(PARAMS, rules, log=False)


def test_label_table_counts_by_hand():
  labels = peft.label_params(PARAMS, [("classifier/.*", "head"), (".*", "train")], log=False)
  table = peft.label_table(PARAMS, labels)
  # head: 4*3 + 3 = 15 in 2 tensors; train: 16 + 4 + 4 + 4 + 40 = 68 in 5 tensors.
  assert [line.split()[:3] for line in table.splitlines()[1:]] == [
      ["head", "2", "15"], ["train", "5", "68"], ["total", "7", "83"]]


def test_split_and_merge_roundtrip_on_model_params():
  module = models.build(tiny_args(), head="seq_cls", num_labels=2)
  params, _ = models.abstract_params(module)   # ShapeDtypeStruct leaves: labels need no values
  labels = peft.label_params(params, [("classifier/.*", "head"), ("encoder/layer_0/mlp/.*", "train"),
                                      (".*", peft.FREEZE)], log=False)
  trainable, frozen = peft.split_trainable(params, labels)
  assert set(peft.flatten_paths(trainable)) == {
      p for p, l in peft.flatten_paths(labels).items() if l != peft.FREEZE}
  assert set(peft.flatten_paths(frozen)) == {
      p for p, l in peft.flatten_paths(labels).items() if l == peft.FREEZE}
  merged = peft.merge_trainable(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    assert a is b
