"""Portable exports of a model's predict function: jax.export (StableHLO) and ONNX, their loaders.

The exported function is the one the server runs (`predict_outputs`): (input_ids, input_mask),
both int32 (B, T) with symbolic B and T (T <= the model's max_len), to a dict of float32
`logits` (the head's: (B, C) or (B, T, C)) and, for BERT encoders, `embedding` (B, D) (mean-pooled
over the mask, L2-normalised). The parameters are constants inside the artifact, so a loader needs
no model code: `load(out_dir)` needs only jax (StableHLO) or onnxruntime (ONNX), json and numpy.

An export directory holds the artifact (`model.stablehlo` or `model.onnx`, and `model.int8.onnx`
after dynamic int8 quantisation), `export.json` (format, files, inputs, outputs, head, labels,
max_len, pad id, the checks made) and the tokenizer (`tokenizer/`, when it can be saved).
"""

import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

FORMATS = ("stablehlo", "onnx")
FILES = {"stablehlo": "model.stablehlo", "onnx": "model.onnx", "int8": "model.int8.onnx"}
META = "export.json"
INPUTS = ("input_ids", "input_mask")


def predict_outputs(module, params, input_ids, input_mask) -> dict:
  """The served and exported computation: float32 `logits` (with a head) and `embedding` (BERT).

  Positions are a cumulative sum rather than a broadcast arange: jax2onnx cannot broadcast an
  arange of a symbolic length to (B, T) (its dynamic-dimension sentinel does not unify with B).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  positions = jnp.cumsum(jnp.ones_like(input_ids), axis=1) - 1                # (B, T)
  out, _ = module.apply({"params": params}, input_ids=input_ids, input_mask=input_mask,
                        position_ids=positions, token_type_ids=jnp.zeros_like(input_ids),
                        deterministic=True)
  res = {}
  if "logits" in out:
    res["logits"] = out["logits"].astype(jnp.float32)
  if module.args.arch == "bert":
    h = out["last_hidden_state"].astype(jnp.float32)                          # (B, T, D)
    m = input_mask[..., None].astype(jnp.float32)
    pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)                     # (B, D)
    res["embedding"] = pooled / jnp.maximum(
        jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return res


def _closure(module, params):
  import jax  # pylint: disable=g-import-not-at-top
  params = jax.tree_util.tree_map(np.asarray, params)
  return lambda input_ids, input_mask: predict_outputs(module, params, input_ids, input_mask)


def _specs():
  import jax  # pylint: disable=g-import-not-at-top
  shape = jax.export.symbolic_shape("b, t")
  return [jax.ShapeDtypeStruct(shape, np.int32) for _ in INPUTS]


def stablehlo_bytes(module, params) -> bytes:
  """The serialized jax.export of the predict function, symbolic in batch and length."""
  import jax  # pylint: disable=g-import-not-at-top
  exported = jax.export.export(jax.jit(_closure(module, params)))(*_specs())
  return bytes(exported.serialize())


def write_onnx(module, params, path: str) -> list:
  """Writes the predict function as ONNX (jax2onnx; dims 'B', 'T'); returns the output names."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax2onnx  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  fn = _closure(module, params)
  names = sorted(jax.eval_shape(fn, *[jax.ShapeDtypeStruct((1, 2), np.int32)] * 2))
  proto = jax2onnx.to_onnx(lambda ids, mask: tuple(fn(ids, mask)[k] for k in names), _specs(),
                           model_name="workbench_predict", input_names=list(INPUTS),
                           output_names=names)
  onnx.save(proto, path)
  return names


def quantize_int8(src: str, dst: str) -> None:
  """onnxruntime dynamic quantisation: int8 weights of MatMul/Gather, activations quantised at run
  time (per tensor, uint8), no calibration data."""
  from onnxruntime.quantization import QuantType, quantize_dynamic  # pylint: disable=g-import-not-at-top
  quantize_dynamic(src, dst, weight_type=QuantType.QInt8)


def check_inputs(input_ids, input_mask, max_len: int) -> tuple:
  """The inputs as int32 (B, T) arrays of one shape with 1 <= T <= max_len.

  Raises:
    ValueError: naming the input and what was expected.
  """
  ids, mask = np.asarray(input_ids), np.asarray(input_mask)
  for name, x in zip(INPUTS, (ids, mask)):
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"{name}: expected an integer (batch, length) array, got {x.dtype} "
                       f"{x.shape}")
  if ids.shape != mask.shape:
    raise ValueError(f"input_mask: shape {mask.shape} differs from input_ids {ids.shape}")
  if not 1 <= ids.shape[1] <= max_len:
    raise ValueError(f"input_ids: length {ids.shape[1]}; the model takes 1..{max_len} tokens")
  return ids.astype(np.int32), mask.astype(np.int32)


def load(out_dir: str, int8: bool = False) -> Callable[..., dict]:
  """A predict function `fn(input_ids, input_mask) -> {name: numpy array}` of an export directory.

  Needs only jax (StableHLO) or onnxruntime (ONNX), not this workbench's model code.

  Args:
    out_dir: a directory written by `write` (research/export.py).
    int8: run the int8-quantised ONNX file.

  Raises:
    FileNotFoundError: no export.json or artifact. ValueError: int8 on a file that has none.
  """
  with open(os.path.join(out_dir, META), encoding="utf-8") as f:
    meta = json.load(f)
  key = "int8" if int8 else meta["format"]
  if key not in meta["files"]:
    raise ValueError(f"{out_dir}: no {key} artifact (files: {sorted(meta['files'])})")
  path = os.path.join(out_dir, meta["files"][key])
  if meta["format"] == "stablehlo":
    import jax  # pylint: disable=g-import-not-at-top
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    run = lambda ids, mask: {k: np.asarray(v) for k, v in exported.call(ids, mask).items()}
  else:
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    run = lambda ids, mask: dict(zip(names, sess.run(names, dict(zip(INPUTS, (ids, mask))))))

  def fn(input_ids, input_mask):
    return run(*check_inputs(input_ids, input_mask, meta["max_len"]))
  fn.meta = meta
  return fn


class ExportCheckError(RuntimeError):
  """The artifact's outputs differ from JAX's beyond the tolerance."""


def compare_with_jax(fn, module, params, shapes: Sequence[tuple], pad_id: int = 0,
                     seed: int = 0) -> dict:
  """Max |fn - JAX| per output over random ids of each (batch, length) in `shapes`.

  The JAX reference is `predict_outputs` jitted on the same inputs; rows after the first have
  padding (their mask ends at a random length), so masking is compared too.
  """
  import jax  # pylint: disable=g-import-not-at-top
  ref = jax.jit(_closure(module, params))
  rng = np.random.RandomState(seed)
  worst = {}
  for b, t in shapes:
    ids = rng.randint(1, module.args.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for row in range(1, b):
      mask[row, rng.randint(1, t + 1):] = 0
    ids[mask == 0] = pad_id
    got, want = fn(ids, mask), ref(ids, mask)
    if set(got) != set(want):
      raise ExportCheckError(f"outputs {sorted(got)} differ from JAX's {sorted(want)}")
    for k, v in want.items():
      worst[k] = max(worst.get(k, 0.0), float(np.abs(np.asarray(v) - got[k]).max()))
  return worst


def classification_accuracy(fns: dict, tokenizer, texts: Sequence[str], gold: Sequence[str],
                            label_names: Sequence[str], max_len: int, batch: int = 32) -> dict:
  """Accuracy of each predict function in `fns` on (texts, gold label names), and how often their
  argmaxes agree with the first one's. Texts are batched by length (no padding waste); a text over
  `max_len` tokens is cut to it and counted in `truncated`."""
  ids = tokenizer(list(texts), verbose=False)["input_ids"]
  truncated = sum(len(x) > max_len for x in ids)
  ids = [x[:max_len - 1] + x[-1:] if len(x) > max_len else x for x in ids]   # keep [SEP]
  order = np.argsort([len(x) for x in ids], kind="stable")
  preds = {name: np.zeros(len(ids), np.int64) for name in fns}
  for s in range(0, len(ids), batch):
    rows = order[s:s + batch]
    t = max(len(ids[i]) for i in rows)
    arr, mask = np.zeros((len(rows), t), np.int32), np.zeros((len(rows), t), np.int32)
    for j, i in enumerate(rows):
      arr[j, :len(ids[i])], mask[j, :len(ids[i])] = ids[i], 1
    for name, fn in fns.items():
      preds[name][rows] = np.argmax(fn(arr, mask)["logits"], -1)
  gold_ids = np.array([list(label_names).index(g) for g in gold])
  first = next(iter(preds.values()))
  return {"examples": len(ids), "truncated": int(truncated),
          "accuracy": {k: float((p == gold_ids).mean()) for k, p in preds.items()},
          "agreement": {k: float((p == first).mean()) for k, p in preds.items()}}


def _save_tokenizer(tokenizer, directory: str) -> Optional[str]:
  """Saves a Hugging Face tokenizer to directory/tokenizer; None when it has no save_pretrained."""
  if not hasattr(tokenizer, "save_pretrained"):
    return None
  tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
  return "tokenizer"


def write(model, out_dir: str, fmt: str, *, int8: bool = False, overwrite: bool = False,
          sources: Sequence[str] = (), check_shapes=((1, 8), (3, 24)), tol: float = 1e-4) -> dict:
  """Exports `model` (model_io.InferenceModel) to `out_dir` atomically and checks it against JAX.

  Args:
    model: the model to export (its module, params, tokenizer, head, label names).
    out_dir: the export directory; an existing non-empty one only with `overwrite`.
    fmt: 'stablehlo' or 'onnx'. int8: also write the dynamically quantised ONNX file.
    sources: directories the model came from (out_dir may not be or hold one).
    check_shapes: (batch, length) shapes compared with JAX (lengths capped at max_len).
    tol: the largest |artifact - JAX| accepted for the float artifact.

  Returns:
    export.json's content, with `check` (max abs difference per output, per artifact) and sizes.

  Raises:
    ValueError: unknown format, int8 without ONNX. ExportCheckError: a difference over `tol`.
  """
  from lib import atomic  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}; valid: {list(FORMATS)}")
  if int8 and fmt != "onnx":
    raise ValueError("int8 quantisation needs format 'onnx'")
  args = model.args
  shapes = [(b, min(t, args.max_len)) for b, t in check_shapes]
  with atomic.directory(out_dir, overwrite=overwrite, sources=sources) as tmp:
    files = {fmt: FILES[fmt]}
    if fmt == "stablehlo":
      atomic.write_bytes(os.path.join(tmp, FILES[fmt]), stablehlo_bytes(model.module, model.params))
    else:
      write_onnx(model.module, model.params, os.path.join(tmp, FILES[fmt]))
      if int8:
        quantize_int8(os.path.join(tmp, FILES[fmt]), os.path.join(tmp, FILES["int8"]))
        files["int8"] = FILES["int8"]
    meta = dict(format=fmt, files=files, inputs={k: "int32[batch, length]" for k in INPUTS},
                head=model.head, label_names=list(model.label_names), arch=args.arch,
                max_len=args.max_len, pad_id=int(getattr(model.tokenizer, "pad_token_id", 0) or 0),
                source=model.source, source_step=model.step,
                tokenizer=_save_tokenizer(model.tokenizer, tmp))
    write_meta(tmp, meta)
    meta["check"], meta["bytes"] = {}, {}
    for key, name in files.items():
      meta["bytes"][key] = os.path.getsize(os.path.join(tmp, name))
      fn = load(tmp, int8=key == "int8")
      meta["check"][key] = compare_with_jax(fn, model.module, model.params, shapes, meta["pad_id"])
    meta["check_shapes"], meta["tolerance"] = shapes, tol
    worst = max(meta["check"][fmt].values())
    if not worst <= tol:
      raise ExportCheckError(f"{fmt} artifact differs from JAX by {worst:.3g} > {tol} "
                             f"({meta['check'][fmt]}); nothing was written to {out_dir}")
    write_meta(tmp, meta)
  return meta


def write_meta(directory: str, meta: dict) -> None:
  """Writes `meta` as directory/export.json (atomically)."""
  from lib import atomic  # pylint: disable=g-import-not-at-top
  atomic.write_bytes(os.path.join(directory, META),
                     (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"))
