"""Knowledge distillation: the student made from chosen teacher layers or a random init of another
size (hidden states compared through learned projections trained beside it), the distillation
losses (soft-target KL, hidden states, MiniLM attention and value relations), the frozen teacher
inside the train step or its cached logits, and the teacher/student comparison of metrics.json; and
task-agnostic (general) distillation on plain text, the task `distill_general` registered here."""

import dataclasses
import hashlib
import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from lib import (atomic, data, errors, experiment, model_io, models, optim, peft, sharding, tasks,
                 train, tree)
from lib.tasks import common, lm, supervised

HIDDEN_LOSSES = ("cosine", "mse")
PROJECTIONS = ("auto", "linear", "none")
STUDENT_SIZES = ("hidden_size", "num_layers", "num_heads", "mlp_dim")
# The learned student -> teacher width projections live beside the student's parameters in the
# train state under this key (trained, checkpointed, resumed with them); the model never reads
# them and loading the workdir as a model (export, init_from, serving) restores only the student.
PROJECTION = "distill_projection"
EPS = 1e-12   # inside logs of probabilities that may be exactly 0 (masked keys)


def default_config() -> ml_collections.ConfigDict:
  """The `distill` block of a distillation config; every weight and the temperature documented.

  Total loss = hard * task loss (the task's own, on the labels) + soft * T^2 KL(teacher || student
  at temperature T) + hidden * hidden-state loss + attention * MiniLM attention KL + value *
  MiniLM value-relation KL. A weight of 0 skips its term (and the teacher outputs it needs).

  A student of another width (`student`) compares hidden states through learned projections
  (`projection`); attention distributions and value relations are (B, heads, T, T) maps over
  tokens, compared head by head: they need the teacher's head count, not its width or head size.
  """
  return ml_collections.ConfigDict(dict(
      teacher="",               # model source: a fine-tuning workdir, our model dir, a HF dir
      layers=(),                # teacher layers the student starts from (its layer i = teacher
                                # layer layers[i]); () = every other, ending with the last. For a
                                # random student (below): the teacher layer each student layer is
                                # compared with; () = uniform, ending with the last (TinyBERT)
      # A random-init student of another size instead of teacher layers: a configs/common.py
      # preset and/or nonzero sizes replacing the preset's (or, without one, the teacher's).
      student=ml_collections.ConfigDict(dict(preset="", hidden_size=0, num_layers=0, num_heads=0,
                                             mlp_dim=0, embeddings="random")),
                                # embeddings: random | pca = the teacher's embedding tables on
                                # their top principal directions (and the projections start as
                                # the way back: `pca_basis`)
      projection="auto",        # hidden terms across widths: auto = a learned linear map student
                                # -> teacher width per compared layer when the widths differ
                                # (TinyBERT); linear = also at equal width (identity init); none
      temperature=2.0,          # soft targets: softmax(logits / T); the KL is scaled by T^2
      weights=ml_collections.ConfigDict(dict(hard=1.0, soft=1.0, hidden=0.0, attention=0.0,
                                             value=0.0)),
      hidden_loss="cosine",     # cosine (1 - cos, DistilBERT) | mse, over real tokens
      hidden_layers="mapped",   # mapped: embeddings and every student layer vs its teacher layer;
                                # last: the last hidden states only
      minilm_layers="last",     # attention/value transfer: last (MiniLM) | mapped layers
      teacher_dtype="float32",  # compute dtype of the frozen teacher (bfloat16 halves its cost)
      cache_logits=False,       # teacher logits computed once, cached beside the data (soft
                                # loss only: hidden/attention/value need the teacher in the step)
      cache_dir="",             # '' = <data cache dir>/teacher_logits
      speed_batch_size=32,      # inference examples/s of teacher and student on the test set
  ))


def every_other(num_layers: int) -> tuple:
  """Teacher layers of a half-depth student: every other one, ending with the last ((1, 3, 5)
  of 6), so the student's top layer is the one the teacher's head was trained on."""
  return tuple(range(num_layers - 1, -1, -2))[::-1]


def check_layers(layers, num_layers: int, where: str = "config.distill.layers") -> tuple:
  """The student's teacher layers as a tuple of ints; bad ones raise ConfigError."""
  layers = tuple(layers) or every_other(num_layers)
  bad = [l for l in layers if not isinstance(l, int) or not 0 <= l < num_layers]
  if bad or len(set(layers)) != len(layers):
    raise errors.ConfigError(f"{where}={layers}: expected distinct teacher layer indices in "
                             f"[0, {num_layers}) (the teacher has {num_layers} layers)")
  return layers


def uniform_layers(student_layers: int, teacher_layers: int) -> tuple:
  """Teacher layer of each layer of a student of another depth: layer i -> (i + 1) * L_t / L_s - 1
  (TinyBERT's uniform map, ending with the last; every other layer at half depth)."""
  return tuple((i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers))


def student_layer_map(layers, student_args, teacher_layers: int) -> tuple:
  """The teacher layer of each student layer: `layers` (checked), or by default every other
  teacher layer (a student from teacher layers, `student_args` None) or the uniform map."""
  if student_args is None:
    return check_layers(layers, teacher_layers)
  layers = check_layers(tuple(layers) or uniform_layers(student_args.num_layers, teacher_layers),
                        teacher_layers)
  if len(layers) != student_args.num_layers:
    raise errors.ConfigError(f"config.distill.layers={layers}: one teacher layer per student layer "
                             f"expected ({student_args.num_layers})")
  return layers


def random_student_args(student_cfg, teacher_args: models.ModelArgs,
                        preset_args: Optional[models.ModelArgs] = None):
  """ModelArgs of a random-init student, or None for a student made from teacher layers.

  Args:
    student_cfg: config.distill.student; nonzero sizes replace those of the base.
    teacher_args: the teacher's (the base without a preset; vocabulary, positions and token
      types are always the teacher's: the student reads the same batches).
    preset_args: a configs/common.py preset (config.distill.student.preset or model.preset).

  Raises:
    errors.ConfigError: a negative size, a width not divisible by the heads, another arch.
  """
  sizes = {k: student_cfg.get(k, 0) for k in STUDENT_SIZES}
  bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 0}
  if bad:
    raise errors.ConfigError(f"config.distill.student: {bad}: expected integers >= 0 (0 = the "
                             "preset's or teacher's)")
  sizes = {k: v for k, v in sizes.items() if v}
  if preset_args is None and not sizes:
    return None
  base = preset_args or teacher_args
  if base.arch != teacher_args.arch:
    raise errors.ConfigError(f"config.distill.student.preset: a {base.arch!r} student cannot "
                             f"read the batches of a {teacher_args.arch!r} teacher")
  args = dataclasses.replace(models.ModelArgs(), **{
      k: getattr(base, k) for k in ("arch", "activation", "layer_norm_eps", "dropout_rate",
                                    "attention_dropout_rate", "initializer_range") + STUDENT_SIZES})
  args = dataclasses.replace(args, vocab_size=teacher_args.vocab_size,
                             max_len=teacher_args.max_len, pad_token_id=teacher_args.pad_token_id,
                             type_vocab_size=teacher_args.type_vocab_size, **sizes)
  if args.hidden_size % args.num_heads:
    raise errors.ConfigError(f"config.distill.student: hidden_size {args.hidden_size} is not a "
                             f"multiple of num_heads {args.num_heads}")
  return args


# ----------------------------------------------------------------------------- student init

EMBEDDINGS = ("random", "pca")


def _embedding_tables(params, arch: str) -> dict:
  """{path: table} of the backbone's embedding tables (leaves named 'embedding' outside the
  layers: word, position, token type)."""
  enc = params[model_io.BACKBONE[arch]]
  flat = {p: v for k, sub in enc.items() if not k.startswith("layer_")
          for p, v in tree.flatten({k: sub}).items()}
  return {p: v for p, v in flat.items() if p.endswith("embedding")}


def pca_basis(teacher: "Teacher", width: int) -> np.ndarray:
  """(teacher width, `width`): the top principal directions of the teacher's word embeddings (SVD
  of the centred table; signs fixed so that each direction's largest entry is positive)."""
  words = [v for p, v in _embedding_tables(teacher.params, teacher.args.arch).items()
           if "word" in p or "wte" in p]
  if len(words) != 1:
    raise errors.ConfigError("config.distill.student.embeddings='pca': no single word embedding "
                             f"table in the teacher {teacher.source}")
  table = np.asarray(words[0], np.float64)
  _, _, vt = np.linalg.svd(table - table.mean(0), full_matrices=False)
  basis = vt[:width].T                                                # (D_t, width)
  sign = np.sign(basis[np.abs(basis).argmax(0), np.arange(basis.shape[1])])
  return (basis * sign).astype(np.float32)


def with_teacher_embeddings(params: dict, teacher: "Teacher", basis: np.ndarray) -> dict:
  """`params` of a random student whose embedding tables are the teacher's times `basis`."""
  flat = tree.flatten(params)
  backbone = model_io.BACKBONE[teacher.args.arch]
  for path, table in _embedding_tables(teacher.params, teacher.args.arch).items():
    flat[f"{backbone}/{path}"] = np.asarray(table, np.float32) @ basis
  return tree.unflatten(flat)


def student_basis(student_cfg, student_args, teacher: "Teacher") -> Optional[np.ndarray]:
  """`pca_basis` of a random student narrower than the teacher with config.distill.student.
  embeddings 'pca'; None for 'random' (or a student from teacher layers)."""
  how = student_cfg.get("embeddings", "random")
  if how not in EMBEDDINGS:
    raise errors.ConfigError(f"config.distill.student.embeddings={how!r}: valid: {EMBEDDINGS}")
  if how == "random" or student_args is None:
    return None
  if student_args.hidden_size > teacher.args.hidden_size:
    raise errors.ConfigError(f"config.distill.student.embeddings='pca': the student width "
                             f"{student_args.hidden_size} exceeds the teacher's "
                             f"{teacher.args.hidden_size}")
  return pca_basis(teacher, student_args.hidden_size)


def student_from_layers(args: models.ModelArgs, params: dict, layers) -> tuple:
  """(ModelArgs, params) of a student whose layer i is a copy of the teacher's layer layers[i];
  the embeddings, pooler and head are the teacher's (DistilBERT's initialisation)."""
  layers = check_layers(layers, args.num_layers)
  backbone = model_io.BACKBONE[args.arch]
  enc = params[backbone]
  rest = {k: v for k, v in enc.items() if not k.startswith("layer_")}
  rest.update({f"layer_{i}": enc[f"layer_{l}"] for i, l in enumerate(layers)})
  return dataclasses.replace(args, num_layers=len(layers)), dict(params, **{backbone: rest})


def hidden_map(layers) -> tuple:
  """Student hidden-state index -> teacher hidden-state index (0 = embeddings, i + 1 = the
  output of layer i)."""
  return (0,) + tuple(l + 1 for l in layers)


@dataclasses.dataclass
class Teacher:
  """The frozen teacher: module, parameters (host or placed on the mesh) and where it came from."""
  module: object
  params: dict
  args: models.ModelArgs
  head: Optional[str]
  label_names: list
  source: str
  tokenizer: str          # its tokenizer's location (the student records the same)
  step: Optional[int] = None
  saved_args: Optional[models.ModelArgs] = None   # as the source records them (its dropout;
                                                  # `args` has the inference overrides)


def load_teacher(source: str, data_dir: str, dtype: str = "float32") -> Teacher:
  """The teacher from any model source (a run workdir means its reported checkpoint)."""
  if not source:
    raise errors.ConfigError("config.distill.teacher is empty: give a model source (a fine-tuning "
                             "workdir, our model dir or a HF dir)")
  m = model_io.load_for_inference(source, data_dir=data_dir, dtype=dtype)
  _, where = model_io.load_tokenizer(source, m.args.arch, data_dir)
  return Teacher(m.module, m.params, m.args, m.head, m.label_names, source, where, m.step,
                 model_io.describe(source))


def write_student_init(out_dir: str, teacher: Teacher, layers, student_args=None,
                       seed: int = 0, basis: Optional[np.ndarray] = None) -> str:
  """The student's initial model dir (our format, the teacher's head and tokenizer): made from
  `layers` of the teacher, or a random init (seed `seed`) of `student_args` (its embeddings the
  teacher's times `basis` when given). An existing one is reused if it was made the same way
  from the same teacher checkpoint, else refused."""
  layers = student_layer_map(layers, student_args, teacher.args.num_layers)
  made_from = dict(teacher=model_io.pinned(teacher.source, teacher.step), layers=list(layers))
  if student_args is not None:
    made_from.update(random_init={k: getattr(student_args, k) for k in STUDENT_SIZES}, seed=seed)
    if basis is not None:
      made_from["embeddings"] = "pca"
  if os.path.exists(os.path.join(out_dir, model_io.MODEL_JSON)):
    old = model_io.read_model_json(out_dir).get("distilled_from")
    if old != made_from:
      raise errors.ConfigError(f"{out_dir}: the student init there was made from {old}, not "
                               f"{made_from}: use a new --workdir")
    return out_dir
  if student_args is None:
    # The source's own args: the student trains with the teacher's dropout, not the inference 0.
    args, params = student_from_layers(teacher.saved_args or teacher.args, teacher.params, layers)
  else:
    args = student_args
    module = models.build(args, teacher.head, len(teacher.label_names))
    params = jax.tree.map(np.asarray, models.init_params(module, jax.random.key(seed))[0])
    if basis is not None:
      params = with_teacher_embeddings(params, teacher, basis)
  return model_io.save_model_dir(out_dir, args, params, teacher.head, len(teacher.label_names),
                                 teacher.label_names, tokenizer=teacher.tokenizer,
                                 distilled_from=made_from)


def same_task(teacher: Teacher, head, label_names) -> bool:
  """Whether the teacher's head predicts the task's labels in the same order (soft targets)."""
  return teacher.head == head and list(teacher.label_names) == list(label_names)


def place_params(module, params, mesh, rules):
  """Host parameters of `module` placed on the mesh by the same logical rules as the student."""
  abstract, logical = models.abstract_params(module)
  shard = sharding.param_shardings(abstract, logical, mesh, rules)
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(
      x.shape, s, lambda idx, x=x: np.asarray(x)[idx]), params, shard)


# ----------------------------------------------------------------------------- losses

def _masked_mean(x, mask):
  """Mean of x over the positions where mask is 1 (x and mask broadcast to the same shape)."""
  mask = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
  return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _kl(p_log, q_log, axis=-1):
  """KL(p || q) along `axis` from log-probabilities; terms where p is 0 count 0."""
  p = jnp.exp(p_log)
  return jnp.where(p > 0, p * (p_log - q_log), 0.0).sum(axis)


def logits_mask(logits, batch):
  """Positions the soft loss averages over: real tokens (B, T) of token logits (B, T, C), real
  rows (B,) of sequence logits (B, C) (example_ids -1 = a padding row)."""
  if logits.ndim == 3:
    return batch["input_mask"]
  if "example_ids" in batch:
    return (batch["example_ids"] >= 0).astype(jnp.int32)
  return jnp.ones(logits.shape[:1], jnp.int32)


def soft_kl(student_logits, teacher_logits, temperature: float, mask):
  """T^2 * mean over `mask` of KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al.:
  the T^2 keeps the soft gradients' scale independent of T)."""
  t = float(temperature)
  s_log = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, -1)
  t_log = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, -1)
  return t * t * _masked_mean(_kl(t_log, s_log), mask)


def hidden_loss(student, teacher, input_mask, kind: str = "cosine"):
  """1 - cos (or the mean squared error per feature) between hidden states (B, T, D), averaged
  over the real tokens of `input_mask` (B, T)."""
  s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
  if kind == "cosine":
    cos = (s * t).sum(-1) / jnp.maximum(
        jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), EPS)
    per_token = 1.0 - cos
  elif kind == "mse":
    per_token = ((s - t) ** 2).mean(-1)
  else:
    raise errors.ConfigError(f"config.distill.hidden_loss={kind!r}: valid: {HIDDEN_LOSSES}")
  return _masked_mean(per_token, input_mask)


def relation_kl(student_probs, teacher_probs, input_mask):
  """KL(teacher || student) of (B, H, T, T) distributions over keys, averaged over heads and real
  queries (MiniLM's attention transfer; padded keys have probability 0 in both)."""
  t_log = jnp.log(teacher_probs.astype(jnp.float32) + EPS)
  s_log = jnp.log(student_probs.astype(jnp.float32) + EPS)
  kl = jnp.where(teacher_probs > 0, teacher_probs * (t_log - s_log), 0.0).sum(-1)  # (B, H, T)
  return _masked_mean(kl, input_mask[:, None, :])


def value_relation(values, input_mask):
  """MiniLM value relation softmax(V V^T / sqrt(d)) per head: values (B, T, H, Dh) -> (B, H, T,
  T), padded keys masked out."""
  v = values.astype(jnp.float32)
  scores = jnp.einsum("bqhd,bkhd->bhqk", v, v) / jnp.sqrt(v.shape[-1])
  bias = jnp.where(input_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores + bias, -1)


# ----------------------------------------------------------------------------- model calls

def _apply(module, variables, kw, attentions: bool, values_at=()):
  """module.apply with attentions and the value vectors (B, T, H, Dh) of layers `values_at`
  (captured from the `value` Dense outputs: no model change) in intermediates['values']."""
  if attentions:
    kw = dict(kw, output_attentions=True)
  if not values_at:
    return module.apply(variables, **kw)
  backbone = model_io.BACKBONE[module.args.arch]
  want = {(backbone, f"layer_{i}", "attention", "value") for i in values_at}
  pick = lambda m, method: method == "__call__" and tuple(m.path) in want
  (out, inter), state = module.apply(variables, capture_intermediates=pick, **kw)
  caps = state["intermediates"][backbone]
  values = tuple(caps[f"layer_{i}"]["attention"]["value"]["__call__"][0] for i in values_at)
  return out, dict(inter, values=values)


def forward(module, params, batch, *, attentions: bool = False, values_at=()):
  """(outputs, intermediates) of `module` on a batch, deterministic (the frozen teacher)."""
  inputs = {k: batch[k] for k in common.MODEL_INPUTS if k in batch}
  return _apply(module, {"params": params}, dict(inputs, deterministic=True), attentions,
                values_at)


class _Recorded:
  """The student as the task's loss sees it: `apply` also returns what the distillation losses
  need and keeps (outputs, intermediates), so the hard and the distillation losses share one
  forward pass (read back in the same trace)."""

  def __init__(self, module, attentions: bool, values_at):
    self.module, self.args = module, module.args
    self.attentions, self.values_at, self.last = attentions, tuple(values_at), None

  def apply(self, variables, **kw):
    self.last = _apply(self.module, variables, kw, self.attentions, self.values_at)
    return self.last


def _pairs(dcfg, student_layers: int, teacher_layers: int, layers):
  """((student hidden index, teacher hidden index), ...) and the same for MiniLM layers."""
  hmap = hidden_map(layers)
  hidden = tuple(enumerate(hmap)) if dcfg.hidden_layers == "mapped" else (
      (len(hmap) - 1, hmap[-1]),)
  if dcfg.hidden_layers not in ("mapped", "last"):
    raise errors.ConfigError(f"config.distill.hidden_layers={dcfg.hidden_layers!r}: valid: "
                             "'mapped', 'last'")
  if dcfg.minilm_layers not in ("mapped", "last"):
    raise errors.ConfigError(f"config.distill.minilm_layers={dcfg.minilm_layers!r}: valid: "
                             "'mapped', 'last'")
  minilm = ((student_layers - 1, teacher_layers - 1),) if dcfg.minilm_layers == "last" else (
      tuple(enumerate(layers)))
  return hidden, minilm


def init_projection(dcfg, student_args, teacher_args, layers, seed: int = 0,
                    basis: Optional[np.ndarray] = None) -> Optional[dict]:
  """Host parameters of the learned hidden-state projections, or None when none is needed.

  One kernel (student width, teacher width) per compared hidden state, no bias (TinyBERT's W_h;
  a bias could map every token to the teacher's mean direction, which cosine rewards):
  {'hidden_<student hidden index>': {'kernel': ...}}. Identity at equal widths (`linear`); with
  `basis` (the student's PCA embeddings) its transpose, the way back to the teacher's space; else
  normal with std 1/sqrt(student width) (a projected state keeps its scale).
  """
  if dcfg.projection not in PROJECTIONS:
    raise errors.ConfigError(f"config.distill.projection={dcfg.projection!r}: valid: "
                             f"{PROJECTIONS}")
  ds, dt = student_args.hidden_size, teacher_args.hidden_size
  if not dcfg.weights.hidden or dcfg.projection == "none" or (
      dcfg.projection == "auto" and ds == dt):
    return None
  pairs, _ = _pairs(dcfg, student_args.num_layers, teacher_args.num_layers, layers)
  key = jax.random.fold_in(jax.random.key(seed), 2)
  out = {}
  for i, _ in pairs:
    if ds == dt:
      kernel = np.eye(ds, dtype=np.float32)
    elif basis is not None:
      kernel = np.array(basis.T, np.float32)
    else:
      kernel = np.asarray(jax.random.normal(jax.random.fold_in(key, i), (ds, dt))) / np.sqrt(ds)
    out[f"hidden_{i}"] = {"kernel": kernel}
  return out


def add_projection(r, projection: dict) -> None:
  """Puts `projection` (host arrays) into run `r`'s train state as trainable parameters beside
  the student's (params[PROJECTION], replicated) and rebuilds what depends on the parameter tree:
  labels, optimizer, state (a fresh step 0: `fit` restores a resumed run's checkpoint into it)
  and sizes."""
  labels = dict(r.labels, **{PROJECTION: jax.tree.map(lambda _: "train", projection)})
  tx, schedule = optim.make_optimizer(r.cfg.optim, labels, r.num_steps)
  tx = peft.wrap_optimizer(tx, r.spec, r.num_steps)
  logical = dict(models.abstract_params(r.module)[1],
                 **{PROJECTION: jax.tree.map(lambda x: P(*[None] * x.ndim), projection)})
  replicated = jax.sharding.NamedSharding(r.mesh, P())
  params = dict(r.state.params, **{PROJECTION: jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, replicated, lambda idx, x=x: x[idx]),
      projection)})

  def init(p):   # as lib/train's states: Adam moments of the trainable leaves only
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                            opt_state=tx.init(peft.split_trainable(p, labels)[0]))
  shard = train.state_shardings(jax.eval_shape(init, params), r.mesh, r.rules, logical)
  r.state = jax.jit(init, out_shardings=shard, donate_argnums=0)(params)
  r.labels, r.tx, r.schedule = labels, tx, schedule
  r.sizes = experiment.state_sizes(r.state, labels)
  logging.info("learned hidden-state projections %s: %d parameters",
               {k: v["kernel"].shape for k, v in projection.items()},
               models.param_count(projection))


def student_params(params) -> dict:
  """The student's parameters of a train state's (the projections dropped)."""
  return {k: v for k, v in params.items() if k != PROJECTION}


def make_loss(task, module, cfg, teacher_module, layers):
  """loss_fn(params, batch, rng, train, teacher_params) -> (loss, metrics): the weighted sum of
  the task's own loss and the distillation terms (see `default_config`). The teacher runs
  deterministic under stop_gradient: it gets no gradient (and, outside the train state, no
  optimizer state). A batch with 'teacher_logits' (the cache) skips the teacher's forward pass.
  Student hidden states go through params[PROJECTION] (`init_projection`) when it is there."""
  d, w = cfg.distill, cfg.distill.weights
  hidden_pairs, minilm = _pairs(d, module.args.num_layers, teacher_module.args.num_layers, layers)
  s_vals, t_vals = (tuple(p[i] for p in minilm) for i in (0, 1)) if w.value else ((), ())
  rec = _Recorded(module, bool(w.attention), s_vals)
  task_loss = task.make_loss(rec, cfg)
  needs_teacher_pass = bool(w.hidden or w.attention or w.value)

  def loss_fn(params, batch, rng, train_, teacher_params):
    hard, metrics = task_loss(params, batch, rng, train_)
    s_out, s_inter = rec.last
    if "teacher_logits" in batch and not needs_teacher_pass:
      t_out, t_inter = {"logits": batch["teacher_logits"]}, {}
    elif not (w.soft or needs_teacher_pass):   # hard loss only: the teacher is not run
      t_out, t_inter = {}, {}
    else:
      t_out, t_inter = jax.lax.stop_gradient(forward(
          teacher_module, jax.lax.stop_gradient(teacher_params), batch,
          attentions=bool(w.attention), values_at=t_vals))
    mask = batch["input_mask"]
    terms = {"hard": hard}
    if w.soft:
      terms["soft"] = soft_kl(s_out["logits"], t_out["logits"], d.temperature,
                              logits_mask(s_out["logits"], batch))
    if w.hidden:
      proj = params.get(PROJECTION)
      project = lambda i, h: h if proj is None else (
          h.astype(jnp.float32) @ proj[f"hidden_{i}"]["kernel"].astype(jnp.float32))
      terms["hidden"] = sum(hidden_loss(project(i, s_inter["hidden_states"][i]),
                                        t_inter["hidden_states"][j], mask, d.hidden_loss)
                            for i, j in hidden_pairs) / len(hidden_pairs)
    if w.attention:
      terms["attention"] = sum(relation_kl(s_inter["attentions"][i], t_inter["attentions"][j],
                                           mask) for i, j in minilm) / len(minilm)
    if w.value:
      terms["value"] = sum(relation_kl(value_relation(sv, mask), value_relation(tv, mask), mask)
                           for sv, tv in zip(s_inter["values"], t_inter["values"])) / len(minilm)
    total = sum(w[k] * v for k, v in terms.items())
    return total, dict(metrics, loss=total, **{f"distill_{k}": v for k, v in terms.items()})
  return loss_fn


def check_compatible(dcfg, student_args, teacher: Teacher, head, label_names) -> None:
  """Raises ConfigError when a weighted term cannot compare this student with this teacher."""
  w = dcfg.weights
  unknown = sorted(set(w.keys()) - {"hard", "soft", "hidden", "attention", "value"})
  if unknown:
    raise errors.ConfigError(f"config.distill.weights: unknown terms {unknown}; valid: hard, "
                             "soft, hidden, attention, value")
  if head is None and (w.hard or w.soft or not (w.hidden or w.attention or w.value)):
    raise errors.ConfigError(
        f"config.distill.weights: general distillation (no head) has no labels or logits: set "
        f"hard=0 and soft=0 (now {w.hard}, {w.soft}) and weight hidden, attention or value")
  if w.soft and not same_task(teacher, head, label_names):
    raise errors.ConfigError(
        f"config.distill.weights.soft={w.soft}: the teacher {teacher.source} has head "
        f"{teacher.head} with labels {teacher.label_names}; the task needs {head} with "
        f"{label_names}: set weights.soft=0 or give a teacher fine-tuned on this task")
  if (w.hidden and student_args.hidden_size != teacher.args.hidden_size
      and dcfg.projection == "none"):
    raise errors.ConfigError(
        f"config.distill.weights.hidden={w.hidden}: student width {student_args.hidden_size} != "
        f"teacher width {teacher.args.hidden_size} and config.distill.projection='none': set it "
        "to 'auto' (a learned projection) or weights.hidden=0")
  if (w.attention or w.value) and student_args.num_heads != teacher.args.num_heads:
    # Both compare (B, heads, T, T) maps head by head; widths (head sizes) may differ.
    raise errors.ConfigError(
        f"config.distill.weights.attention={w.attention}/value={w.value}: attention and value "
        f"relations are compared head by head: student heads {student_args.num_heads} != teacher "
        f"heads {teacher.args.num_heads} (the widths may differ, the head counts may not): set "
        "config.distill.student.num_heads to the teacher's or those weights to 0")
  if dcfg.cache_logits and (w.hidden or w.attention or w.value):
    raise errors.ConfigError("config.distill.cache_logits=True caches logits only: the hidden, "
                             "attention and value terms need the teacher in the step (weights 0)")


# ----------------------------------------------------------------------------- teacher logit cache

def _row_key(ids, types, mask) -> bytes:
  """Identity of one input row: its real tokens and token types (padding length ignored)."""
  keep = mask.astype(bool)
  return hashlib.blake2b(ids[keep].tobytes() + b"|" + types[keep].tobytes(),
                         digest_size=16).digest()


def _rows(batch):
  """(row index, key) of the real rows of a numpy batch."""
  ids = batch.get("example_ids", np.zeros(len(batch["input_ids"]), np.int64))
  types = batch.get("token_type_ids", np.zeros_like(batch["input_ids"]))
  return [(b, _row_key(batch["input_ids"][b], types[b], batch["input_mask"][b]))
          for b in range(len(ids)) if ids[b] >= 0]


def cache_key(teacher: Teacher, data_identity: dict) -> str:
  """Hash of the teacher (source, step, architecture, every parameter's bytes) and the data
  (the training split's config and content fingerprint): either changing gives a new cache."""
  h = hashlib.sha256(json.dumps(dict(
      source=model_io.pinned(teacher.source, teacher.step), args=dataclasses.asdict(teacher.args),
      data=data_identity), sort_keys=True, default=str).encode())
  for leaf in jax.tree.leaves(teacher.params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:32]


class LogitCache:
  """Teacher logits of every training row, by row identity: (real tokens, C) per token row or
  (1, C) per sequence row, stored in `<dir>/<key>.npz` (the key names teacher and data)."""

  def __init__(self, table: dict, token_level: bool, path: str):
    self.table, self.token_level, self.path = table, token_level, path

  @classmethod
  def load_or_build(cls, directory: str, key: str, predict, train_iter) -> "LogitCache":
    """The cache of `key`, or (absent: first use, or teacher or data changed) one pass of
    `predict(batch) -> logits` over one epoch of `train_iter`, written atomically."""
    path = os.path.join(directory, f"{key}.npz")
    if os.path.exists(path):
      with np.load(path) as z:
        keys, offs, flat = z["keys"], z["offsets"], z["logits"]
        token_level = bool(z["token_level"])
      logging.info("teacher logits: %d rows from %s", len(keys), path)
      return cls({k.tobytes(): flat[offs[i]:offs[i + 1]] for i, k in enumerate(keys)},
                 token_level, path)
    table, token_level, t0 = {}, False, time.perf_counter()
    for _ in range(len(train_iter)):
      batch = next(train_iter)
      logits = np.asarray(predict(batch), np.float32)
      token_level = logits.ndim == 3
      for b, k in _rows(batch):
        real = batch["input_mask"][b].astype(bool)
        table[k] = logits[b][real] if token_level else logits[b:b + 1]
    keys = list(table)
    offs = np.cumsum([0] + [len(table[k]) for k in keys])
    os.makedirs(directory, exist_ok=True)
    atomic.write_npz(path, keys=np.array(keys, dtype="S16"), offsets=offs,
                     logits=np.concatenate([table[k] for k in keys]),
                     token_level=np.array(token_level))
    logging.info("teacher logits: %d rows computed in %.1f s -> %s", len(keys),
                 time.perf_counter() - t0, path)
    return cls(table, token_level, path)

  def lookup(self, batch) -> np.ndarray:
    """Teacher logits for a numpy batch: (B, C) or (B, T, C); dummy rows are zeros.

    Raises:
      RuntimeError: a real row that the cache does not hold (the data is not what was cached).
    """
    c = next(iter(self.table.values())).shape[-1]
    shape = batch["input_ids"].shape + (c,) if self.token_level else (len(batch["input_ids"]), c)
    out = np.zeros(shape, np.float32)
    rows = _rows(batch)
    missing = [b for b, k in rows if k not in self.table]
    if missing:
      raise RuntimeError(f"{self.path}: {len(missing)} training rows of this batch are not in the "
                         "teacher-logit cache (the data changed while the key did not)")
    for b, k in rows:
      if self.token_level:
        out[b][batch["input_mask"][b].astype(bool)] = self.table[k]
      else:
        out[b] = self.table[k][0]
    return out


class WithTeacherLogits:
  """A training iterator whose batches carry 'teacher_logits' from a LogitCache (position,
  length and state are the wrapped iterator's)."""

  def __init__(self, it, cache: LogitCache):
    self.it, self.cache = it, cache

  def __len__(self):
    return len(self.it)

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.it)
    return dict(batch, teacher_logits=self.cache.lookup(batch))

  def __getattr__(self, name):
    return getattr(self.it, name)


# ----------------------------------------------------------------------------- the comparison

def timed_pass(module, params, batches, batch_sharding):
  """A function timing one jitted forward pass over `batches` -> examples (real rows) per second;
  a first pass here compiles every bucket shape."""
  fwd = jax.jit(lambda p, b: forward(module, p, b)[0]["logits"])
  placed = [sharding.shard_batch({k: b[k] for k in common.MODEL_INPUTS if k in b},
                                 batch_sharding) for b in batches]
  rows = sum(int((b["example_ids"] >= 0).sum()) if "example_ids" in b else len(b["input_ids"])
             for b in batches)
  def one_pass():
    t0 = time.perf_counter()
    for b in placed:
      fwd(params, b).block_until_ready()
    return rows / (time.perf_counter() - t0)
  one_pass()
  return one_pass


def compare_speed(models_, batches, batch_sharding, rounds: int = 3) -> dict:
  """name -> the best examples/s of `rounds` timed passes per model of {name: (module, params)},
  the models alternating so that a change in the machine's load hits them alike."""
  passes = {n: timed_pass(m, p, batches, batch_sharding) for n, (m, p) in models_.items()}
  best = {n: 0.0 for n in passes}
  for _ in range(rounds):
    for n, fn in passes.items():
      best[n] = max(best[n], fn())
  return best


def speed_batches(run, batch_size: int):
  """A list of this process's test batches at `batch_size` (the speed measurement's input)."""
  d = dict(supervised.data_kwargs(run.cfg.data, "test", jax.process_count()),
           eval_batch_size=batch_size // jax.process_count())
  return list(data.from_config(d, run.tokenizer, "test", train=False,
                               shard_index=jax.process_index(), shard_count=jax.process_count()))


class Evaluator:
  """The task's evaluator of the student whose `final` adds the `distill` block: teacher and
  student parameters, dev/test metric and inference examples/s measured here on the test set
  (batch `speed_batch_size`, best of 3 alternating passes after a compiling one),
  student_over_teacher (test metric ratio) and speedup."""

  def __init__(self, run, teacher: Teacher, teacher_params):
    self.base, self.run = run.task.make_evaluator(run), run
    self.teacher, self.teacher_params = teacher, teacher_params

  def __getattr__(self, name):
    return getattr(self.base, name)

  def dev(self, state):
    return self.base.dev(state)

  def final(self, state, history=()):
    out = self.base.final(state, history)
    return dict(out, distill=self.block(state.params, out))

  def block(self, params, student_out) -> dict:
    r, t, metric = self.run, self.teacher, self.run.task.METRIC
    student_params_ = student_params(params)
    t_eval = r.task.make_evaluator(dataclasses.replace(r, module=t.module))
    t_out = t_eval.final(train.TrainState(step=np.int32(-1), params=self.teacher_params,
                                          opt_state=()))
    batches = speed_batches(r, r.cfg.distill.speed_batch_size)
    speed = compare_speed({"teacher": (t.module, self.teacher_params),
                           "student": (r.module, student_params_)}, batches, r.bsh)
    entry = lambda name, params, out, layers: dict(
        source=t.source if name == "teacher" else r.workdir, layers=layers,
        params=models.param_count(params), dev=out["dev"][metric], test=out["test"][metric],
        examples_per_s=speed[name])
    return dict(
        metric=metric, speed_batch_size=r.cfg.distill.speed_batch_size,
        teacher=entry("teacher", self.teacher_params, t_out, t.args.num_layers),
        student=entry("student", student_params_, student_out, r.args.num_layers),
        student_over_teacher=student_out["test"][metric] / max(t_out["test"][metric], 1e-12),
        speedup=speed["student"] / speed["teacher"])

  def summary(self, out: dict) -> str:
    b = out["distill"]
    return (f"{self.base.summary(out)} | teacher test {b['teacher']['test']:.4f} | student/teacher "
            f"{b['student_over_teacher']:.3f} | speedup {b['speedup']:.2f}x")


# ----------------------------------------------------------------------------- the run

def _data_identity(run) -> dict:
  d = supervised.data_kwargs(run.cfg.data, "train")
  skip = ("data_dir", "cache_dir", "batch_size", "eval_batch_size", "max_eval_examples")
  return dict({k: v for k, v in d.items() if k not in skip}, content=run.data.fingerprint)


def attach_cache(run, teacher: Teacher, teacher_params) -> LogitCache:
  """Wraps run.data.train so its batches carry the teacher's cached logits (built if absent)."""
  if jax.process_count() > 1:
    raise errors.ConfigError("config.distill.cache_logits=True runs on one process only")
  cfg = run.cfg
  directory = cfg.distill.cache_dir or os.path.join(
      cfg.data.cache_dir or data.DEFAULT_CACHE_DIR, "teacher_logits")
  fresh = data.from_config(supervised.data_kwargs(cfg.data, "train"), run.tokenizer, "train",
                           train=True)
  fwd = jax.jit(lambda p, b: forward(teacher.module, p, b)[0]["logits"])
  predict = lambda b: fwd(teacher_params, sharding.shard_batch(
      {k: b[k] for k in common.MODEL_INPUTS if k in b}, run.bsh))
  cache = LogitCache.load_or_build(directory, cache_key(teacher, _data_identity(run)), predict,
                                   fresh)
  run.data.train = WithTeacherLogits(run.data.train, cache)
  return cache


def run(cfg, workdir: str, task, *, preset_args=None) -> Optional[dict]:
  """Distils cfg.distill.teacher into a student on cfg's task: the fine-tuning run and outputs,
  with the distillation loss and the `distill` block in metrics.json. The student is made from
  teacher layers, or is a random init of `preset_args` (a preset) with config.distill.student's
  sizes; hidden terms across widths train a projection beside it (not part of the student).
  Returns the metrics.json content, or None when preempted."""
  d = cfg.distill
  if cfg.get("adversarial") and cfg.adversarial.method != "none":
    raise errors.ConfigError(f"config.adversarial.method={cfg.adversarial.method!r}: adversarial "
                             "training is not combined with distillation here; set it to 'none'")
  teacher = load_teacher(d.teacher, cfg.data.dir, d.teacher_dtype)
  s_args = random_student_args(d.get("student", {}), teacher.saved_args or teacher.args,
                               preset_args)
  layers = student_layer_map(d.layers, s_args, teacher.args.num_layers)
  if s_args is not None:    # refused before anything is written
    check_compatible(d, s_args, teacher, task.HEAD, teacher.label_names)
  basis = student_basis(d.get("student", {}), s_args, teacher)
  # Absolute: orbax writes the init's parameters and refuses a relative path.
  source = write_student_init(os.path.abspath(os.path.join(workdir, "student_init")), teacher,
                              layers, s_args, cfg.seed, basis)
  r = experiment.setup(cfg, workdir, task, source=source)
  check_compatible(d, r.args, teacher, task.HEAD, r.data.label_names)
  projection = init_projection(d, r.args, teacher.args, layers, cfg.seed, basis)
  if projection is not None:
    add_projection(r, projection)
  t_params = place_params(teacher.module, teacher.params, r.mesh, r.rules)
  if d.cache_logits:
    attach_cache(r, teacher, t_params)
  loss = make_loss(task, r.module, cfg, teacher.module, layers)
  if task.HEAD is None:
    evaluator = GeneralEvaluator(r, loss, t_params)
  else:
    evaluator = Evaluator(r, teacher, t_params)
  fitted = experiment.fit(r, evaluator, hooks=[_adapter_hook(r)],
                          loss_fn=lambda p, b, rng, tr: loss(p, b, rng, tr, t_params))
  if fitted is None:
    return None
  return experiment.finish(r, evaluator, fitted)


def _adapter_hook(r) -> train.Hook:
  """experiment.adapter_hook of the student alone (the projections are not saved with it)."""
  if PROJECTION not in r.labels:
    return experiment.adapter_hook(r)
  inner = experiment.adapter_hook(dataclasses.replace(r, labels=student_params(r.labels)))
  return dataclasses.replace(inner, fn=lambda state, step, m: inner.fn(
      state.replace(params=student_params(state.params)), step, m))


# ----------------------------------------------------------------------------- general distillation

class GeneralTask:
  """Task-agnostic distillation as a task of the run skeleton: packed plain text of the LM corpora
  (config `objective` 'none': unmasked rows, no labels) and no head, so the student learns only
  from the distillation terms (MiniLM: last-layer attention and value relations, optionally the
  hidden states). Its evaluator needs the teacher: `run` builds a `GeneralEvaluator`."""

  HEAD = None
  METRIC, MODE, RESTORE_BEST = "loss", "min", False

  @staticmethod
  def make_data(cfg, tokenizer, workdir=None):
    return lm.make_data(cfg, tokenizer, workdir)

  @staticmethod
  def make_loss(module, cfg):
    del cfg

    def loss_fn(params, batch, rng, train_):
      common.apply_model(module, params, batch, rng, train_)   # recorded for the terms
      return jnp.zeros((), jnp.float32), {}
    return loss_fn

  @staticmethod
  def make_evaluator(run):
    raise errors.ConfigError(f"task {run.cfg.task!r} runs through research/distill.py (its "
                             "evaluator compares the student with the teacher)")


tasks.register("distill_general", GeneralTask)


class GeneralEvaluator(lm.Evaluator):
  """The distillation terms of student vs teacher on each corpus's held-out rows (and over all);
  `loss` (their weighted sum) picks nothing (the final state is reported) but is the curve."""

  def __init__(self, run, loss_fn, teacher_params):
    terms = [k for k, v in run.cfg.distill.weights.items() if v]
    super().__init__(lambda p, b: loss_fn(p, b, None, False, teacher_params)[1], run.cfg,
                     run.data, run.bsh, second=f"distill_{terms[0]}")

  def _finish(self, result: dict) -> dict:
    return dict(result)

  def summary(self, out: dict) -> str:
    h = out["held_out"]
    terms = ", ".join(f"{k[len('distill_'):]} {v:.4f}" for k, v in sorted(h.items())
                      if k.startswith("distill_") and k != "distill_hard")
    return f"held-out distillation loss {h['loss']:.4f} ({terms})"
