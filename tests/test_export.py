"""Tests of lib/export.py: StableHLO and ONNX artifacts match the model, loaders, refusals."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lib import atomic, export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = "/work/shared/data"


def _tiny(tmp, head="seq_cls", num_labels=3):
  import jax   # pylint: disable=g-import-not-at-top
  from lib import model_io, models   # pylint: disable=g-import-not-at-top
  args = models.ModelArgs(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=32)
  params, _ = models.init_params(models.build(args, head, num_labels), jax.random.key(1))
  names = [f"c{i}" for i in range(num_labels)]
  src = model_io.save_model_dir(os.path.join(tmp, "src"), args, params, head, num_labels, names,
                                tokenizer="minilm")
  return model_io.load_for_inference(src, data_dir=DATA_DIR)


def _reference(model, ids, mask):
  """Each row run alone through the module, unpadded (default positions), pooled in numpy."""
  import jax   # pylint: disable=g-import-not-at-top
  apply = jax.jit(lambda x: model.module.apply({"params": model.params}, input_ids=x)[0])
  logits, emb = [], []
  for row, m in zip(ids, mask):
    out = apply(row[None, :int(m.sum())])
    logits.append(np.asarray(out["logits"][0]))
    h = np.asarray(out["last_hidden_state"][0], np.float64).mean(0)
    emb.append(h / np.linalg.norm(h))
  return np.stack(logits), np.stack(emb)


def _inputs(model, b, t, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1000, 2000, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[1:, t // 2:] = 0
  ids[mask == 0] = 0
  return ids, mask


def test_stablehlo_artifact_matches_the_module_at_any_batch_and_length(tmp_path):
  model = _tiny(str(tmp_path))
  meta = export.write(model, str(tmp_path / "out"), "stablehlo", sources=[str(tmp_path / "src")],
                      check_shapes=((2, 8),))
  assert max(meta["check"]["stablehlo"].values()) < 1e-5
  fn = export.load(str(tmp_path / "out"))
  for b, t in ((1, 5), (3, 12)):     # shapes never seen at export: symbolic b, t
    ids, mask = _inputs(model, b, t, seed=b)
    got = fn(ids, mask)
    logits, emb = _reference(model, ids, mask)
    np.testing.assert_allclose(got["logits"], logits, atol=1e-5)
    np.testing.assert_allclose(got["embedding"], emb, atol=1e-5)
  with pytest.raises(ValueError, match="input_ids: length 33; the model takes 1..32"):
    fn(*_inputs(model, 1, 33))
  with pytest.raises(ValueError, match="input_mask: shape"):
    fn(np.zeros((2, 4), np.int32), np.zeros((2, 5), np.int32))
  saved = json.load(open(tmp_path / "out" / "export.json"))
  assert saved["label_names"] == ["c0", "c1", "c2"] and saved["files"] == {
      "stablehlo": "model.stablehlo"}
  assert os.path.exists(tmp_path / "out" / "tokenizer" / "tokenizer.json")


def test_loader_needs_no_model_code(tmp_path):
  """The artifact runs in a fresh interpreter that imports jax and numpy but not lib/."""
  model = _tiny(str(tmp_path), head="token_cls", num_labels=2)
  out = str(tmp_path / "out")
  export.write(model, out, "stablehlo", check_shapes=((1, 4),))
  ids, mask = _inputs(model, 2, 9)
  np.save(tmp_path / "ids.npy", ids)
  np.save(tmp_path / "mask.npy", mask)
  code = ("import sys, jax, numpy as np\n"
          "e = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))\n"
          "out = e.call(np.load(sys.argv[2]), np.load(sys.argv[3]))\n"
          "np.save(sys.argv[4], np.asarray(out['logits']))\n"
          "assert not any(m.startswith('lib') for m in sys.modules)\n")
  subprocess.run([sys.executable, "-c", code, os.path.join(out, "model.stablehlo"),
                  str(tmp_path / "ids.npy"), str(tmp_path / "mask.npy"),
                  str(tmp_path / "got.npy")], check=True, cwd=str(tmp_path),
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  import jax   # pylint: disable=g-import-not-at-top
  apply = jax.jit(lambda x: model.module.apply({"params": model.params}, input_ids=x)[0])
  got = np.load(tmp_path / "got.npy")                                       # (B, T, 2)
  for row, (r_ids, m) in enumerate(zip(ids, mask)):
    n = int(m.sum())
    np.testing.assert_allclose(got[row, :n], np.asarray(apply(r_ids[None, :n])["logits"][0]),
                               atol=1e-5)


def test_refusals(tmp_path):
  model = _tiny(str(tmp_path))
  out = tmp_path / "out"
  out.mkdir()
  (out / "mine.txt").write_text("keep")
  with pytest.raises(atomic.OutputExistsError, match="not empty"):
    export.write(model, str(out), "stablehlo")
  assert (out / "mine.txt").read_text() == "keep"
  with pytest.raises(ValueError, match="int8 quantisation needs format 'onnx'"):
    export.write(model, str(tmp_path / "o2"), "stablehlo", int8=True)
  with pytest.raises(ValueError, match="format 'tflite'"):
    export.write(model, str(tmp_path / "o3"), "tflite")
  assert not os.path.exists(tmp_path / "o2") and not os.path.exists(tmp_path / "o3")


@pytest.mark.slow
def test_onnx_and_int8_match_the_module(tmp_path):
  """jax2onnx with symbolic batch and length: onnxruntime within 1e-5 of the module at shapes not
  seen at export; the int8 file is smaller and its logits close (a tolerance for quantisation)."""
  model = _tiny(str(tmp_path))
  out = str(tmp_path / "out")
  meta = export.write(model, out, "onnx", int8=True, check_shapes=((2, 8),))
  assert meta["bytes"]["int8"] < meta["bytes"]["onnx"]
  fp, q8 = export.load(out), export.load(out, int8=True)
  for b, t in ((1, 4), (4, 30)):
    ids, mask = _inputs(model, b, t, seed=t)
    logits, emb = _reference(model, ids, mask)
    got = fp(ids, mask)
    np.testing.assert_allclose(got["logits"], logits, atol=1e-5)
    np.testing.assert_allclose(got["embedding"], emb, atol=1e-5)
    assert np.abs(q8(ids, mask)["logits"] - logits).max() < 0.05


def test_model_dir_under_a_relative_path(tmp_path, monkeypatch):
  """orbax takes absolute paths only; a model dir given relative to the working directory (as a
  user types --out=students/s1) saves and loads with the same parameters."""
  import jax   # pylint: disable=g-import-not-at-top
  from lib import model_io, models, tree   # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  args = models.ModelArgs(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=16)
  params, _ = models.init_params(models.build(args, "seq_cls", 2), jax.random.key(3))
  model_io.save_model_dir(os.path.join("models", "m"), args, params, "seq_cls", 2)
  loaded = model_io.load_model(os.path.join("models", "m"), "seq_cls", 2)
  want, got = tree.flatten(params), tree.flatten(loaded.params)
  assert sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
