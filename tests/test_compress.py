"""lib/compress.py: PTQ of a saved model into a model directory, its real size, the table row;
research/compress.py's metrics.json."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from lib import compress, errors, model_io, models, quant

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(vocab_size=50, hidden_size=64, num_layers=2, num_heads=2, mlp_dim=128, max_len=32)


@pytest.fixture
def source(tmp_path):
  args = models.ModelArgs(**BASE)
  params, _ = models.init_params(models.build(args, "seq_cls", 2), jax.random.key(0))
  path = str(tmp_path / "float")
  model_io.save_model_dir(path, args, params, "seq_cls", 2, ["neg", "pos"], tokenizer="minilm")
  return path


def test_quantize_source_writes_an_int8_model_dir(source, tmp_path):
  out = str(tmp_path / "int8")
  src = compress.quantize_source(source, out, "int8_w8a8", r"encoder/layer_\d+/.*")
  meta = model_io.read_model_json(out)
  assert meta["args"].dot_general == ((r"encoder/layer_\d+/.*", "int8_w8a8"),)
  assert (meta["head"], meta["label_names"], meta["tokenizer"]) == ("seq_cls", ["neg", "pos"],
                                                                   "minilm")
  assert meta["compression"] == dict(method="int8_w8a8", kernels=r"encoder/layer_\d+/.*",
                                    calibration_batches=0)
  # The encoder kernels (65,536 weights) drop from 4 bytes to 1; orbax's compression of the
  # float file (random normal values) keeps the saving under the full 3 bytes a weight.
  kernels = sum(v.size for p, v in _flat(src.params).items()
                if p.startswith("encoder/layer_") and p.endswith("/kernel"))
  assert kernels == 2 * (4 * 64 * 64 + 2 * 64 * 128)
  saved = compress.dir_bytes(os.path.join(out, "params"))
  floats = compress.dir_bytes(os.path.join(source, "params"))
  assert floats - saved > 2 * kernels
  # Loads back through model_io with the same logits as quantising in memory.
  loaded = model_io.load_for_inference(out, data_dir="")
  ids = np.array([[5, 6, 7, 3]])
  q = quant.quantize_params(src.params, meta["args"].dot_general)
  want = loaded.module.apply({"params": q}, input_ids=ids, input_mask=np.ones_like(ids))[0]
  got = loaded.module.apply({"params": loaded.params}, input_ids=ids,
                            input_mask=np.ones_like(ids))[0]
  np.testing.assert_array_equal(got["logits"], want["logits"])
  with pytest.raises(errors.UserError, match="overwrite"):
    compress.quantize_source(source, out, "int8_w8a8", r"encoder/layer_\d+/.*")   # not empty


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def test_row_reports_drop_in_points_and_speedup():
  scores = {"dev": {"accuracy": 0.9}, "test": {"accuracy": 0.885}}
  base = {"dev": {"accuracy": 0.9}, "test": {"accuracy": 0.89}}
  r = compress.row("int8", 10, 2_500_000, (5.0, 30.0), (10.0, 12.0), scores, base, "accuracy")
  assert (r["file_MB"], r["speedup"], r["drop"], r["test"]) == (2.5, 2.5, 0.5, 0.885)
  assert "| int8 | 10 | 2.5 | 5.0 | 30.0 | 2.5 | 0.9000 | 0.8850 | 0.5 |" in compress.format_rows([r])


@pytest.mark.slow
def test_prune_source_removes_the_least_important_heads_and_neurons(tmp_path):
  from configs import sst2
  from lib import prune
  import training_helpers  # pylint: disable=import-outside-toplevel
  args = models.ModelArgs(**dict(BASE, vocab_size=30522, num_heads=4, hidden_size=32))
  params, _ = models.init_params(models.build(args, "seq_cls", 2), jax.random.key(0))
  source = str(tmp_path / "float")
  model_io.save_model_dir(source, args, params, "seq_cls", 2, ["neg", "pos"], tokenizer="minilm")
  cfg = sst2.get_config("quick")
  cfg.data.dataset = "tsv:" + training_helpers.write_toy_sentiment(tmp_path / "toy")
  cfg.data.cache_dir, cfg.data.max_len, cfg.data.eval_batch_size = str(tmp_path / "c"), 16, 8
  out = str(tmp_path / "heads")
  compress.prune_heads_source(source, out, cfg, 0.5, max_batches=1)
  meta = model_io.read_model_json(out)
  info = meta["compression"]
  assert sum(meta["args"].heads_per_layer) == 4   # half of 2 x 4
  assert (info["method"], info["dev_batches"]) == ("heads", 1)
  scores = [np.array(s) for s in info["importance"]]
  # A layer's last head stays (min_per_layer=1) whatever its score; the others go in global order.
  kept = [s[k] for s, k in zip(scores, info["kept"]) if len(k) > 1]
  dropped = [np.delete(s, k) for s, k in zip(scores, info["kept"])]
  assert max(d.max() for d in dropped if d.size) <= min(k.min() for k in kept)   # global order
  # The saved model computes what the source with those heads masked computes.
  loaded = model_io.load_for_inference(out, data_dir="")
  masked = prune.mask_heads(params, args, info["kept"])
  ids = np.array([[101, 2307, 3185, 102]])
  want = models.build(args, "seq_cls", 2).apply({"params": masked}, input_ids=ids)[0]["logits"]
  got = loaded.module.apply({"params": loaded.params}, input_ids=ids)[0]["logits"]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # Heads and FFN neurons together, scored in one pass on the unpruned model.
  out = str(tmp_path / "structured")
  compress.prune_structured_source(source, out, cfg, heads=0.5, neurons=0.25, max_batches=1)
  meta = model_io.read_model_json(out)
  info = meta["compression"]
  assert (info["method"], meta["args"].mlp_per_layer) == ("heads+neurons", (96, 96))
  assert info["kept"] == model_io.read_model_json(str(tmp_path / "heads"))["compression"]["kept"]
  loaded = model_io.load_for_inference(out, data_dir="")
  masked = prune.mask_neurons(prune.mask_heads(params, args, info["kept"]), args,
                              info["neurons_kept"])
  want = models.build(args, "seq_cls", 2).apply({"params": masked}, input_ids=ids)[0]["logits"]
  got = loaded.module.apply({"params": loaded.params}, input_ids=ids)[0]["logits"]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sparse_finetune_runs_through_the_skeleton_and_stays_sparse(tmp_path):
  from configs import compress as compress_config
  from lib import prune
  import training_helpers  # pylint: disable=import-outside-toplevel
  args = models.ModelArgs(**dict(BASE, vocab_size=30522, hidden_size=32))
  params, _ = models.init_params(models.build(args, "seq_cls", 2), jax.random.key(0))
  source = str(tmp_path / "float")
  model_io.save_model_dir(source, args, params, "seq_cls", 2, ["neg", "pos"], tokenizer="minilm")
  c = compress_config.get_config("prune_movement70")
  cfg = c.eval
  cfg.data.dataset = "tsv:" + training_helpers.write_toy_sentiment(tmp_path / "toy")
  cfg.data.cache_dir, cfg.data.max_len, cfg.data.batch_size = str(tmp_path / "c"), 16, 16
  cfg.data.max_train_examples, cfg.train.epochs, cfg.optim.lr = 0, 3, 1e-3   # 12 steps
  c.sparsity.every = 2
  out = compress.sparse_finetune(cfg, str(tmp_path / "run"), source, c.sparsity)
  assert out["sparsity"]["total"] == pytest.approx(0.7, abs=0.01)
  # 30% values + a 1/32 bitmask (33%), and .npz headers (~1 kB a kernel, 12 small kernels here).
  assert out["sparse_bytes"]["sparse_npz"] < 0.5 * out["sparse_bytes"]["pruned_dense"]
  # The run workdir is a model source whose pruned kernels are the sparse file's, zeros included.
  loaded = model_io.load_model(str(tmp_path / "run"), "seq_cls", 2)
  flat = _flat(loaded.params)
  with np.load(tmp_path / "run" / "sparse.npz") as z:
    dense = prune.sparse_decode(dict(z))
  assert sorted(dense) == sorted(p for p in flat if p.startswith("encoder/layer_")
                                 and p.endswith("kernel"))
  for p, v in dense.items():
    np.testing.assert_array_equal(flat[p], v)
  assert np.mean([(flat[p] == 0).mean() for p in dense]) > 0.6
  assert "test" in out and "accuracy" in out["test"]


def test_static_quantize_source_calibrates_and_round_trips(source, tmp_path):
  ids = np.array([[5, 6, 7, 3], [9, 8, 4, 3]])
  batch = dict(input_ids=ids, input_mask=np.ones_like(ids))
  out = str(tmp_path / "static")
  with pytest.raises(ValueError, match="calibration"):
    compress.quantize_source(source, out, "int8_static", r"encoder/layer_\d+/.*")
  src = compress.quantize_source(source, out, "int8_static", r"encoder/layer_\d+/.*",
                                 calibration=[batch])
  assert model_io.read_model_json(out)["compression"]["calibration_batches"] == 1
  loaded = model_io.load_for_inference(out, data_dir="")
  scale = loaded.params["encoder"]["layer_0"]["attention"]["query"]["input_scale"]
  plain = models.build(src.args, src.head, src.num_labels)
  emb = plain.apply({"params": src.params}, **batch)[1]["hidden_states"][0]   # query's input
  assert float(scale) == pytest.approx(float(np.abs(emb).max()) / 127, rel=1e-6)
  got = loaded.module.apply({"params": loaded.params}, **batch)[0]["logits"]
  want = plain.apply({"params": src.params}, **batch)[0]["logits"]
  np.testing.assert_allclose(got, want, atol=0.05)   # int8 of a calibrated input: close


@pytest.mark.slow
def test_qat_finetune_trains_through_the_fake_seat_then_quantises(tmp_path, monkeypatch):
  from configs import compress as compress_config
  import training_helpers  # pylint: disable=import-outside-toplevel
  args = models.ModelArgs(**dict(BASE, vocab_size=30522, hidden_size=32))
  params, _ = models.init_params(models.build(args, "seq_cls", 2), jax.random.key(0))
  source = str(tmp_path / "float")
  model_io.save_model_dir(source, args, params, "seq_cls", 2, ["neg", "pos"], tokenizer="minilm")
  cfg = compress_config.get_config("qat").eval
  cfg.data.dataset = "tsv:" + training_helpers.write_toy_sentiment(tmp_path / "toy")
  cfg.data.cache_dir, cfg.data.max_len, cfg.data.batch_size = str(tmp_path / "c"), 16, 16
  cfg.data.max_train_examples, cfg.optim.lr = 0, 1e-3                      # 4 steps
  with pytest.raises(ValueError, match="matches no kernel"):
    compress.qat_finetune(cfg, str(tmp_path / "bad"), source, r"encoder/layer_\d+/atention/.*")
  calls = []   # every Dense of the encoder goes through the fake seat, in training and eval
  real = quant.int8_fake
  monkeypatch.setitem(models.DOT_GENERALS, "int8_fake",
                      lambda m: calls.append("/".join(m.path)) or real(m))
  run = compress.qat_finetune(cfg, str(tmp_path / "run"), source, r"encoder/layer_\d+/.*")
  assert len(set(calls)) == 2 * 6 and all("layer_" in c for c in calls)
  # Made at every trace: the rule check, the train step and the eval step (at least).
  assert len(calls) >= 3 * 2 * 6, len(calls)
  assert model_io.read_model_json(run)["args"].dot_general == ()   # float weights saved
  compress.quantize_source(run, str(tmp_path / "int8"), "int8_w8a8", r"encoder/layer_\d+/.*")
  assert model_io.read_model_json(str(tmp_path / "int8"))["args"].dot_general


@pytest.mark.slow
def test_script_metrics_json_holds_the_printed_row(tmp_path):
  # research/compress.py on a tiny model (no evaluation, minimal timing): metrics.json (what
  # tables/compress.py reads) holds the compressed model's printed row and the float32 one.
  args = models.ModelArgs(**dict(BASE, vocab_size=1100))   # the timing batch draws ids >= 1000
  params, _ = models.init_params(models.build(args, "seq_cls", 2), jax.random.key(0))
  source = str(tmp_path / "float")
  model_io.save_model_dir(source, args, params, "seq_cls", 2, ["neg", "pos"], tokenizer="minilm")
  out = tmp_path / "cell"
  cmd = [sys.executable, "research/compress.py", "--config=configs/compress.py:quick",
         "--config.evaluate=False", "--config.speed.steps=1", "--config.speed.latency_steps=2",
         "--config.speed.batch=2", "--config.speed.seq_len=16", f"--model={source}",
         f"--workdir={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  printed = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ")
             for line in proc.stdout.splitlines() if line.startswith("| ")}
  with open(out / "metrics.json", encoding="utf-8") as f:
    m = json.load(f)
  c = m["compress"]
  assert m["dev"] == {"accuracy": None} and m["test"] == {"accuracy": None}
  for row in (c, c["float32"]):
    assert printed[row["model"]] == [row["model"]] + [
        "-" if row[k] is None else str(row[k]) for k in compress.COLUMNS[1:]]
  assert c["model"] == "int8_w8a8" and c["metric"] == "accuracy"
  assert c["file_MB"] == round(compress.dir_bytes(str(out / "params")) / 1e6, 2)
  assert c["speedup"] == round(c["b32x128_seq_s"] / c["float32"]["b32x128_seq_s"], 2)
