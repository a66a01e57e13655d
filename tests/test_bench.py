"""Smoke test of the train-step benchmark core: a tiny BERT, two timed steps per side."""

import math

import pytest

from lib import bench, hf, models

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")


def _tiny_spec():
  args = models.ModelArgs(vocab_size=1200, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                          max_len=16)
  return bench.ModelSpec(
      "tiny", args, None,
      lambda: transformers.BertForTokenClassification(hf.hf_config(args, "token_cls", 3)),
      num_labels=3)


def test_benchmark_row_tiny():
  spec = _tiny_spec()
  row = bench.benchmark_row(spec, batch=2, seq_len=8, steps=2, warmup=0, peak_n=64, pad_frac=0.25)
  assert set(bench.COLUMNS) <= set(row)
  numeric = [c for c in bench.COLUMNS if c not in ("model", "dtype")]
  assert all(math.isfinite(row[c]) and row[c] > 0 for c in numeric), row
  assert len(row["ours_step_s"]) == len(row["hf_step_s"]) == 2
  assert row["ratio"] == pytest.approx(row["ours_ex_s"] / row["hf_ex_s"])
  assert row["hf_gflop_s"] * row["ratio"] == pytest.approx(row["ours_gflop_s"])   # same FLOPs
  assert row["hf_peak_frac"] == pytest.approx(row["hf_gflop_s"] / row["hf_peak_gflop_s"])
  # 6 N tokens + 12 L D T tokens by hand: N = every parameter but the embedding tables (gathers),
  # the LayerNorms included (lib/flops.py's one rule): embeddings LN, then the layer, classifier.
  d, f, t = 16, 32, 8
  n = 2 * d + 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d) + 2 * d + (d * 3 + 3)
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


# ------------------------------------------------- the speed-motivated layer pieces (lib/models/layers.py)

def test_dense_f32acc_grads_match_float32_autodiff():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax
  from lib.models import layers
  rng = np.random.default_rng(0)
  for xs, ks, n in [((2, 5, 8), (8, 3, 4), 1), ((2, 5, 3, 4), (3, 4, 8), 2)]:
    x, k = rng.standard_normal(xs), rng.standard_normal(ks)
    b = rng.standard_normal(ks[n:])
    dims = ((tuple(range(len(xs) - n, len(xs))), tuple(range(n))), ((), ()))
    ref = lambda x, k, b: jnp.sum(jnp.sin(lax.dot_general(x, k, dims) + b))
    new = lambda x, k, b: jnp.sum(jnp.sin(layers.dense_f32acc(
        x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), b, n).astype(jnp.float32)))
    args = [jnp.asarray(a, jnp.float32) for a in (x, k, b)]
    for g_ref, g_new in zip(jax.grad(ref, (0, 1, 2))(*args), jax.grad(new, (0, 1, 2))(*args)):
      assert g_new.shape == g_ref.shape and g_new.dtype == jnp.float32
      assert float(jnp.abs(g_new - g_ref).max() / jnp.abs(g_ref).max()) < 3e-2  # bf16 inputs


def test_dense_same_params_and_float32_output_as_dense_general():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lib.models import layers
  args = models.ModelArgs(hidden_size=16, num_heads=2)
  x = jax.random.normal(jax.random.key(1), (2, 3, 2, 8))
  ours = layers.dense(args, 16, ("heads", "head_dim", "embed"), ("embed",), "out", axis=(-2, -1))
  ref = nn.DenseGeneral(16, axis=(-2, -1), kernel_init=nn.initializers.normal(0.02),
                        name="out")
  p_ours = nn.meta.unbox(ours.init(jax.random.key(0), x))
  p_ref = ref.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, p_ours, p_ref)
  np.testing.assert_allclose(ours.apply(p_ours, x), ref.apply(p_ref, x), rtol=1e-6, atol=1e-6)


def test_hash_dropout_rate_scale_and_independence():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lib.models import layers
  x = jnp.ones((64, 128, 128), jnp.float32)
  a = np.asarray(layers.hash_dropout(x, 0.1, jax.random.key(0)))
  assert set(np.unique(a)) == {0.0, np.float32(1 / 0.9)}
  keep = a > 0
  assert abs(keep.mean() - 0.9) < 2e-3                                  # 1M draws: sd 3e-4
  assert abs(keep[:, :, :64].mean() - keep[:, :, 64:].mean()) < 3e-3  # no position drift
  flat = keep.reshape(-1).astype(np.float64)
  assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 5e-3          # neighbours independent
  np.testing.assert_array_equal(a, layers.hash_dropout(x, 0.1, jax.random.key(0)))
  other = np.asarray(layers.hash_dropout(x, 0.1, jax.random.key(1))) > 0
  assert abs(np.corrcoef(flat, other.reshape(-1))[0, 1]) < 5e-3      # keys independent


@pytest.mark.slow
def test_peft_rows_tiny():
  """LoRA trains only its factors: fewer FLOPs than full fine-tuning (no kernel gradients); the
  ratios are against the full row of the same call."""
  args = models.ModelArgs(vocab_size=1200, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                          max_len=16)
  spec = bench.ModelSpec("tiny", args, None, None, num_labels=3)
  rows = bench.peft_rows(spec, 4, 8, ["lora_all", "head_only"], steps=2, warmup=0)
  by = {r["setting"]: r for r in rows}
  assert list(by) == ["full", "lora_all", "head_only"]
  assert by["full"]["vs_full"] == by["full"]["flop_vs_full"] == 1.0
  assert by["head_only"]["xla_gflop"] < by["lora_all"]["xla_gflop"] < by["full"]["xla_gflop"]
  assert all(r["gb_accessed"] > 0 and r["step_s"] > 0 for r in rows)
  assert "| tiny | lora_all | float32 | 4 | 8 |" in bench.format_table(rows, bench.PEFT_COLUMNS)
  with pytest.raises(ValueError, match="unknown PEFT settings"):
    bench.peft_rows(spec, 4, 8, ["lora_everything"], steps=1, warmup=0)


@pytest.mark.slow
def test_breakdown_row_tiny(monkeypatch):
  """The parts add up: forward + backward + rest = the step; the fixed cost plus the marginal
  cost of the batch's tokens = forward + backward; FLOP/s are the model FLOPs over that margin
  (hand-computed from given medians). Twice the batch timed no slower -> NaN margins."""
  spec = _tiny_spec()
  row = bench.breakdown_row(spec, 2, 8, steps=3, warmup=1, peak_n=64)   # real timings
  assert set(bench.BREAKDOWN_COLUMNS) <= set(row)
  assert row["tokens"] == 16 and row["model"] == "tiny"
  assert all(math.isfinite(row[c]) for c in ("step_ms", "forward_ms", "backward_ms", "update_ms",
                                             "rest_ms", "peak_gflop_s")), row
  assert row["step_ms"] > 0 and row["forward_ms"] > 0 and row["update_ms"] > 0
  assert row["forward_ms"] + row["backward_ms"] + row["rest_ms"] == pytest.approx(row["step_ms"])
  assert "| tiny | float32 | 2 | 8 | 16 |" in bench.format_table([row], bench.BREAKDOWN_COLUMNS)

  def fake(medians):   # time_interleaved with given per-call seconds
    return lambda fns, steps: {k: [medians[k]] * steps for k in fns}
  ms = dict(step=0.012, forward=0.004, grads=0.010, grads_2x=0.016, update=0.003)
  monkeypatch.setattr(bench, "time_interleaved", fake(ms))
  row = bench.breakdown_row(spec, 2, 8, steps=3, warmup=0, peak_n=64)
  fl = bench.step_flops(spec, spec.args, 2, 8)
  assert (row["forward_ms"], row["backward_ms"], row["rest_ms"]) == pytest.approx((4, 6, 2))
  assert row["fixed_ms"] == pytest.approx(4.0)                    # 2 x 10 - 16
  assert row["ms_per_1k_tokens"] == pytest.approx(6.0 / 16 * 1e3)  # 6 ms for 16 more tokens
  assert row["marginal_gflop_s"] == pytest.approx(fl / 6e-3 / 1e9)
  assert row["marginal_peak_frac"] == pytest.approx(row["marginal_gflop_s"] / row["peak_gflop_s"])
  monkeypatch.setattr(bench, "time_interleaved", fake(dict(ms, grads_2x=0.009)))
  row = bench.breakdown_row(spec, 2, 8, steps=3, warmup=0, peak_n=64)
  assert all(math.isnan(row[c]) for c in ("fixed_ms", "ms_per_1k_tokens", "marginal_gflop_s",
                                          "marginal_peak_frac"))
  assert row["step_ms"] == pytest.approx(12.0)


@pytest.mark.parametrize("head,arch", [("lm", "gpt2"), ("mlm", "bert")])
def test_lm_benchmark_sides_compute_the_same_loss(head, arch):
  """The accelerator benchmark compares like with like: on its synthetic batch, our loss and the
  HF model's loss (same weights, dropout off) agree to float32 rounding (1e-5 relative)."""
  import numpy as np
  import torch
  extra = dict(type_vocab_size=0) if arch == "gpt2" else {}
  args = models.ModelArgs(arch=arch, vocab_size=1200, hidden_size=16, num_layers=1, num_heads=2,
                          mlp_dim=32, max_len=32, **extra)
  cls = transformers.GPT2LMHeadModel if head == "lm" else transformers.BertForMaskedLM
  spec = bench.ModelSpec("tiny", args, None, lambda: cls(hf.hf_config(args, head)),
                         num_labels=0, head=head)
  data = bench.spec_batch(spec, batch=3, seq_len=24)
  module = models.build(args, head)
  params = models.init_params(module, __import__("jax").random.key(0))[0]
  ours = float(spec.loss_fn(module, 24)(params, data, None, False)[0])
  model = spec.hf_factory()
  state = hf.params_to_hf(params, args, head)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
  model.eval()
  inputs = {k: torch.from_numpy(np.asarray(v, np.int64))
            for k, v in bench._hf_inputs(spec, data).items()}  # pylint: disable=protected-access
  with torch.no_grad():
    theirs = float(model(**inputs).loss)
  assert ours == pytest.approx(theirs, rel=1e-5)
  if head == "mlm":   # ~15% of the positions scored, the rest ignored
    assert 0.05 < (data["labels"] >= 0).mean() < 0.3


def test_device_peak_reads_the_datasheet_for_known_accelerators(monkeypatch):
  class Dev:
    device_kind = "NVIDIA H100 80GB HBM3"
  monkeypatch.setattr(bench.jax, "devices", lambda: [Dev()])
  assert bench.device_peak("bfloat16") == (989e12, "datasheet dense bf16 (NVIDIA H100 80GB HBM3)")
  Dev.device_kind = "NVIDIA H100 PCIe"
  assert bench.device_peak("bfloat16")[0] == 756e12


@pytest.mark.slow
def test_adversarial_rows_tiny():
  """The overhead table: plain first, each method's FLOPs above plain (FGM: 2 forward/backward
  passes; PGD-3 and FreeLB-3: more)."""
  from lib import adversarial
  spec = _tiny_spec()
  fgm, pgd = adversarial.default_config(), adversarial.default_config()
  fgm.method, pgd.method, pgd.steps = "fgm", "pgd", 3
  rows = bench.adversarial_rows(spec, 2, 8, {"fgm": fgm, "pgd": pgd}, steps=2, warmup=0)
  assert [r["setting"] for r in rows] == ["plain", "fgm", "pgd"]
  assert rows[0]["vs_plain"] == 1.0 and rows[0]["flop_vs_plain"] == 1.0
  assert 1.5 < rows[1]["flop_vs_plain"] < rows[2]["flop_vs_plain"], rows
  assert all(r["step_s"] > 0 for r in rows)


@pytest.mark.slow
def test_benchmark_script_names_the_cpu_on_every_row(tmp_path):
  """research/benchmark.py end to end on bert-tiny: the printed table and metrics.json carry the
  CPU model on every row (speed ratios differ between the CPU types our machines have)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from lib import reporting  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "research/benchmark.py", "--models=bert-tiny", "--seq_len=8", "--batch=2",
       "--steps=1", "--warmup=1", "--dtype=float32", f"--workdir={tmp_path}"],
      cwd=repo, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  header = next(l for l in proc.stdout.splitlines() if l.startswith("| model |"))
  assert header.rstrip(" |").endswith("| cpu")
  with open(tmp_path / "metrics.json", encoding="utf-8") as f:
    rows = json.load(f)["rows"]
  assert len(rows) == 1 and rows[0]["cpu"] == reporting.cpu_model()
  assert rows[0]["ours_ex_s"] > 0 and rows[0]["hf_ex_s"] > 0
