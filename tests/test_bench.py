"""Smoke test of the train-step benchmark core: a tiny BERT, two timed steps per side."""

import math

import pytest

from lib import bench, hf, models

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")


def test_benchmark_row_tiny():
  args = models.ModelArgs(vocab_size=1200, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                          max_len=16)
  spec = bench.ModelSpec(
      "tiny", args, None,
      lambda: transformers.BertForTokenClassification(hf.hf_config(args, "token_cls", 3)),
      num_labels=3)
  row = bench.benchmark_row(spec, batch=2, seq_len=8, steps=2, warmup=0, peak_n=64, pad_frac=0.25)
  assert set(bench.COLUMNS) <= set(row)
  numeric = [c for c in bench.COLUMNS if c not in ("model", "dtype")]
  assert all(math.isfinite(row[c]) and row[c] > 0 for c in numeric), row
  assert len(row["ours_step_s"]) == len(row["hf_step_s"]) == 2
  assert row["ratio"] == pytest.approx(row["ours_ex_s"] / row["hf_ex_s"])
  # 6 N tokens + 12 L D T tokens by hand: N = matmul params (embedding tables excluded).
  d, f, t = 16, 32, 8
  n = 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d) + 2 * d + (d * 3 + 3)
  assert row["model_gflop"] * 1e9 == pytest.approx(2 * t * (6 * n + 12 * 1 * d * t))
  table = bench.format_table([row])
  assert table.splitlines()[0] == "| " + " | ".join(bench.COLUMNS) + " |"
  assert "| tiny | float32 | 2 | 8 |" in table


def test_synthetic_batch_padding_and_labels():
  b = bench.synthetic_batch(3, 10, 2000, 5, pad_frac=0.3)
  assert (b["input_mask"].sum(1) == 7).all()
  assert (b["labels"][b["input_mask"] == 0] == -1).all()
  assert (b["input_ids"][b["input_mask"] == 0] == 0).all()
  assert (b["labels"][:, 0] == -1).all() and (b["labels"][:, 6] == -1).all()
  assert ((b["labels"] >= -1) & (b["labels"] < 5)).all()
