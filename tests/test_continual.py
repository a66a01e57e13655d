"""lib/continual.py: the accuracy-matrix metrics, EWC's diagonal Fisher and penalty against hand
computations, the shared label space, replay rows and the per-task logit mask; the script's
metrics.json."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib import continual

NAN = float("nan")


def test_matrix_metrics_by_hand():
  r = [[0.6, 0.1, 0.2],
       [0.9, 0.8, 0.3],
       [0.5, 0.7, 0.85]]
  assert continual.average_accuracy(r) == pytest.approx((0.5 + 0.7 + 0.85) / 3)
  # BWT: (R[2,0] - R[0,0] + R[2,1] - R[1,1]) / 2 = (-0.1 - 0.1) / 2
  assert continual.backward_transfer(r) == pytest.approx(-0.1)
  # forgetting: the best earlier accuracy, not the one just after learning the task:
  # task 0: max(0.6, 0.9) - 0.5 = 0.4; task 1: max(0.1, 0.8) - 0.7 = 0.1
  assert continual.forgetting(r) == pytest.approx(0.25)


def test_matrix_metrics_skip_undefined_entries():
  r = [[0.9, NAN], [0.9, 0.7]]
  assert continual.forgetting(r) == pytest.approx(0.0)
  assert continual.backward_transfer(r) == pytest.approx(0.0)
  assert continual.average_accuracy(r) == pytest.approx(0.8)


def _softmax_regression(params, row):
  logits = row["x"] @ params["w"] + params["b"]
  return -jax.nn.log_softmax(logits)[row["y"]]


def test_diagonal_fisher_matches_hand_computation():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 3)).astype(np.float32)
  y = rng.integers(0, 4, size=7)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}
  fisher = continual.diagonal_fisher(_softmax_regression, params, {"x": x, "y": y}, chunk=3)
  # By hand: d(-log p_y)/dW = x (p - onehot(y))^T, d/db = p - onehot(y); Fisher = mean of squares.
  z = x @ params["w"] + params["b"]
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  r = p - np.eye(4)[y]
  want_w = np.mean([np.outer(x[i], r[i]) ** 2 for i in range(7)], axis=0)
  np.testing.assert_allclose(fisher["w"], want_w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(fisher["b"], np.mean(r ** 2, axis=0), rtol=1e-5, atol=1e-7)


def test_ewc_penalty_by_hand():
  params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0]])}
  anchors = [({"a": jnp.array([1.0, 0.5]), "b": jnp.array([[2.0]])},
              {"a": jnp.array([0.0, 2.0]), "b": jnp.array([[1.0]])}),
             ({"a": jnp.array([0.0, 1.0]), "b": jnp.array([[0.0]])},
              {"a": jnp.array([1.0, 1.0]), "b": jnp.array([[3.0]])})]
  # task 1: 1*(1-0)^2 + 0.5*0 + 2*(3-1)^2 = 9; task 2: 1*(2-1)^2 = 1; lam/2 * 10 with lam = 3
  assert float(continual.ewc_penalty(params, anchors, 3.0)) == pytest.approx(15.0)


def test_union_labels_and_batches():
  names, ranges = continual.union_labels({"sst": ["neg", "pos"], "ner": ["O", "B-PER", "I-PER"]})
  assert names == ["sst:neg", "sst:pos", "ner:O", "ner:B-PER", "ner:I-PER"]
  assert ranges == {"sst": (0, 2), "ner": (2, 5)}
  ids = np.ones((2, 4), np.int32)
  seq = continual.to_union(dict(input_ids=ids, input_mask=ids, token_type_ids=0 * ids,
                                label=np.array([1, 0]), example_ids=np.array([0, -1])), 0, 2)
  np.testing.assert_array_equal(seq["labels"], [[1, -1, -1, -1], [-1, -1, -1, -1]])
  tok = continual.to_union(dict(input_ids=ids, input_mask=ids, token_type_ids=0 * ids,
                                labels=np.array([[-1, 0, 2, -1], [1, -1, -1, -1]])), 2, 5)
  np.testing.assert_array_equal(tok["labels"], [[-1, 2, 4, -1], [3, -1, -1, -1]])
  np.testing.assert_array_equal(tok["label_lo"], [2, 2])
  both = continual.concat_rows(tok, {k: v[:1, :2] if v.ndim == 2 else v[:1]
                                     for k, v in seq.items()}, pad_id=0)
  assert both["input_ids"].shape == (3, 4)
  np.testing.assert_array_equal(both["labels"][2], [1, -1, -1, -1])
  np.testing.assert_array_equal(both["input_mask"][2], [1, 1, 0, 0])
  np.testing.assert_array_equal(both["label_hi"], [5, 5, 2])


def test_mask_logits_keeps_only_the_rows_block():
  logits = jnp.zeros((2, 1, 5))
  masked = np.asarray(continual.mask_logits(logits, jnp.array([0, 2]), jnp.array([2, 5])))
  assert (masked[0, 0, :2] == 0).all() and (masked[0, 0, 2:] < -1e8).all()
  assert (masked[1, 0, :2] < -1e8).all() and (masked[1, 0, 2:] == 0).all()


# research/continual.py with run_sequence replaced by a hand-made matrix per method (the script's
# own code computes the metrics from it and prints them): metrics.json must hold what it printed.
_DRIVER = """
import runpy, sys
from lib import continual
MATRICES = {"naive": [[0.8, 0.1, 0.2], [0.6, 0.7, 0.1], [0.5, 0.6, 0.9]],
            "lora": [[0.8, None, None], [0.8, 0.7, None], [0.8, 0.7, 0.9]]}
def fake(cfg, method, workdir):
  r = [[float("nan") if v is None else v for v in row] for row in MATRICES[method]]
  return dict(method=method, tasks=["sst2", "ner", "pos"], matrix=r,
              average_accuracy=continual.average_accuracy(r),
              backward_transfer=continual.backward_transfer(r),
              forgetting=continual.forgetting(r), trainable_params_per_stage=[10, 30, 20])
continual.run_sequence = fake
continual.plot_heatmap = lambda *args, **kwargs: None
sys.argv = ["research/continual.py", "--config=configs/continual.py:quick",
            "--workdir=" + sys.argv[1]]
runpy.run_path("research/continual.py", run_name="__main__")
"""


def test_script_metrics_json_holds_what_it_printed(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path)], cwd=repo, timeout=300,
                        capture_output=True, text=True, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = re.findall(r"^(\w+): average accuracy ([\d.]+)  BWT ([+-][\d.]+)  forgetting ([\d.]+)",
                       proc.stdout, re.M)
  with open(tmp_path / "metrics.json", encoding="utf-8") as f:
    methods = json.load(f)["methods"]
  assert [p[0] for p in printed] == [m["method"] for m in methods] == ["naive", "lora"]
  for (_, avg, bwt, forget), m in zip(printed, methods):
    assert (f"{m['average_accuracy']:.4f}", f"{m['backward_transfer']:+.4f}",
            f"{m['forgetting']:.4f}") == (avg, bwt, forget)
  # By hand: naive's last row (0.5, 0.6, 0.9); forgetting ((0.8-0.5) + (0.7-0.6)) / 2.
  naive, lora = methods
  assert naive["average_accuracy"] == pytest.approx(2 / 3)
  assert naive["forgetting"] == pytest.approx(0.2)
  assert naive["backward_transfer"] == pytest.approx(-0.2)
  assert naive["final"] == pytest.approx({"sst2": 0.5, "ner": 0.6, "pos": 0.9})
  assert naive["learned"] == pytest.approx({"sst2": 0.8, "ner": 0.7, "pos": 0.9})
  assert lora["forgetting"] == 0 and lora["trainable_params_per_task"] == 30
