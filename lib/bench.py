"""Train-step benchmark core: our jitted step (token classification, MLM or causal LM) vs Hugging
Face PyTorch on the same device, timed interleaved; FLOPs and the device's peak for MFU."""

import dataclasses
import time
from typing import Callable, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from lib import adversarial, flops, models, optim, peft, sharding, train
from lib.tasks import clm, mlm, ner

COLUMNS = ("model", "dtype", "batch", "seq_len", "ours_ex_s", "hf_ex_s", "ratio", "compile_s",
           "model_gflop", "xla_gflop", "ours_gflop_s", "peak_gflop_s", "peak_frac",
           "hf_gflop_s", "hf_peak_gflop_s", "hf_peak_frac")
HF_IGNORE = -100   # CrossEntropyLoss ignore_index in transformers; ours is any label < 0


@dataclasses.dataclass
class ModelSpec:
  """One benchmarked model: our args/params and a factory for the matching HF torch model.

  `head` is 'token_cls' (NER loss), 'mlm' (BERT, the loss on `prediction_slots` positions per
  row as pretraining runs it) or 'lm' (GPT-2 next-token loss); the HF model must be the same
  (BertForTokenClassification, BertForMaskedLM, GPT2LMHeadModel).
  """
  name: str
  args: models.ModelArgs
  params: Optional[dict]          # None = random init (seed 0)
  hf_factory: Callable            # () -> the transformers torch model
  num_labels: int = 9
  head: str = "token_cls"

  def loss_fn(self, module, seq_len: int):
    if self.head == "mlm":
      return mlm.make_loss_fn(module, mlm.prediction_slots(seq_len, MLM_RATE, False))
    return (clm if self.head == "lm" else ner).make_loss_fn(module)

  def head_fraction(self, seq_len: int) -> Optional[float]:
    """Share of positions the tied output layer runs on (lib/flops), None without one."""
    if self.head == "mlm":
      return mlm.prediction_slots(seq_len, MLM_RATE, False) / seq_len
    return 1.0 if self.head == "lm" else None


MLM_RATE = 0.15


def token_cls_spec(name: str) -> ModelSpec:
  """A 9-label token classifier on both sides: 'minilm' (the installed checkpoint, new head) or a
  preset of configs/common.py (random init)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from lib import hf  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  if name == "minilm":
    args, params = hf.import_checkpoint("minilm", "token_cls", 9, allow_new_heads=True)
    return ModelSpec(name, args, params, lambda: transformers.BertForTokenClassification
                     .from_pretrained(hf.minilm_dir(), num_labels=9))
  args = models.args_from_config(common.model_config(name))
  return ModelSpec(name, args, None, lambda: transformers.BertForTokenClassification(
      hf.hf_config(args, "token_cls", 9)))
# Dense bf16 peak FLOP/s of accelerators by device_kind (datasheets; first match wins). Other
# devices (CPUs) get a measured jnp.dot peak.
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                  ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("TPU v6", 918e12),
                  ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12))


def device_peak(dtype: str = "bfloat16", n: int = 2048) -> tuple:
  """(peak FLOP/s, where it comes from) of jax's first device: the datasheet's dense bf16 peak
  for known accelerators (bf16 rows), else a jitted (n, n) matmul measured now."""
  kind = jax.devices()[0].device_kind
  if dtype == "bfloat16":
    for key, peak in DATASHEET_BF16:
      if key in kind:
        return peak, f"datasheet dense bf16 ({kind})"
  return flops.matmul_peak(n, dtype), f"measured {n}^2 {dtype} jnp.dot ({kind})"


# ----------------------------------------------------------------------------- measurement

def time_interleaved(fns: dict, steps: int, block: int = 1) -> dict:
  """Runs each fn (one train step, blocking) `steps` times, alternating blocks of `block` calls
  between fns so that machine noise hits all of them alike. Returns {name: [seconds per call]}."""
  times = {k: [] for k in fns}
  for _ in range(-(-steps // block)):
    for name, fn in fns.items():
      for _ in range(min(block, steps - len(times[name]))):
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
  return times


# ----------------------------------------------------------------------------- batches

def synthetic_batch(batch: int, seq_len: int, vocab: int, num_labels: int, pad_frac: float = 0.0,
                    seed: int = 0) -> dict:
  """A token-classification batch (our format: labels -1 = not scored, input_mask 1 = real).

  Row i has round(seq_len * (1 - pad_frac)) real tokens ([CLS] ... [SEP] unscored); the rest is
  padding (id 0, mask 0, label -1).
  """
  rng = np.random.default_rng(seed)
  n_real = max(2, int(round(seq_len * (1.0 - pad_frac))))
  ids = rng.integers(1000, vocab, (batch, seq_len), dtype=np.int32)
  labels = rng.integers(0, num_labels, (batch, seq_len), dtype=np.int32)
  mask = np.zeros((batch, seq_len), np.int32)
  mask[:, :n_real] = 1
  ids[:, 0], ids[:, n_real - 1] = 101, 102
  labels[:, 0] = labels[:, n_real - 1] = -1
  ids[mask == 0], labels[mask == 0] = 0, -1
  return dict(input_ids=ids, input_mask=mask, token_type_ids=np.zeros_like(ids), labels=labels)


def synthetic_lm_batch(head: str, batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  """A full (unpadded) batch of random tokens for 'mlm' (15% of positions labelled with their
  token, as pretraining's masking: the input id there is [MASK]) or 'lm' (labels = the next
  token, -1 at the last position)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, vocab, (batch, seq_len), dtype=np.int32)
  mask = np.ones_like(ids)
  if head == "lm":
    labels = np.concatenate([ids[:, 1:], np.full((batch, 1), -1, np.int32)], 1)
    return dict(input_ids=ids, input_mask=mask, labels=labels)
  labels = np.full_like(ids, -1)
  picked = rng.random((batch, seq_len)) < MLM_RATE
  labels[picked] = ids[picked]
  ids = np.where(picked, 103, ids).astype(np.int32)
  return dict(input_ids=ids, input_mask=mask, token_type_ids=np.zeros_like(ids), labels=labels)


def spec_batch(spec: ModelSpec, batch: int, seq_len: int, pad_frac: float = 0.0) -> dict:
  """The synthetic batch of `spec`'s head."""
  if spec.head == "token_cls":
    return synthetic_batch(batch, seq_len, spec.args.vocab_size, spec.num_labels, pad_frac)
  return synthetic_lm_batch(spec.head, batch, seq_len, spec.args.vocab_size)


# ----------------------------------------------------------------------------- the two steps

def _ours_setup(spec: ModelSpec, dtype: str, lr: float, seed: int, peft_rules):
  """(args, module, param specs, params, labels, tx, schedule) of our step as `build_ours` and
  `breakdown_row` run it: `spec`'s model in `dtype`, PEFT factors added, the lib.optim chain."""
  base = dataclasses.replace(spec.args, dtype=dtype)
  args = peft.configure(base, peft.parse_spec(peft_rules))
  module = models.build(args, spec.head, spec.num_labels)
  shapes, specs = models.abstract_params(module)
  params = spec.params
  if params is None:
    params = models.init_params(models.build(base, spec.head, spec.num_labels),
                                jax.random.key(seed))[0]
  if args != base:
    params = peft.add_params(params, module, jax.random.key(seed + 1))
  labels = peft.label_params(shapes, peft_rules, log=False)
  ocfg = optim.default_config()
  ocfg.lr = lr
  tx, schedule = optim.make_optimizer(ocfg, labels, num_steps=100_000)
  return args, module, specs, params, labels, tx, schedule


def build_ours(spec: ModelSpec, batch_np: dict, dtype: str = "float32", lr: float = 2e-5,
               seed: int = 0, peft_rules=peft.FULL_FINETUNE, cost: Optional[dict] = None,
               adversarial_cfg=None):
  """Our training step as `lib.train` runs it (`spec`'s head and loss, `lib.optim` AdamW chain,
  1 device), training what `peft_rules` say (LoRA factors added as the run skeleton adds them),
  with the loss wrapped by `adversarial_cfg` (a `config.adversarial` block) when given.

  Returns (run, compile_s, xla_flops, args): `run()` takes one blocking step. `cost`, if given,
  receives XLA's cost analysis of the compiled step ('flops', 'bytes accessed', ...).
  """
  args, module, specs, params, labels, tx, schedule = _ours_setup(spec, dtype, lr, seed,
                                                                  peft_rules)
  mesh = sharding.make_mesh(sharding.default_mesh_config(), jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  state = train.train_state_from_params(params, tx, mesh, rules, specs, labels)
  seq_len = batch_np["input_ids"].shape[1]
  loss_fn = spec.loss_fn(module, seq_len)
  if adversarial_cfg is not None:
    loss_fn = adversarial.wrap(loss_fn, adversarial_cfg, args.hidden_size, labels)
  step = train.make_train_step(loss_fn, tx, labels=labels, schedule=schedule, seed=seed)
  bsh = sharding.batch_sharding(mesh, rules)
  batch = sharding.shard_batch(batch_np, bsh)
  t0 = time.perf_counter()
  compiled = train.jit_train_step(step, state, bsh).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  if cost is not None:
    analysis = compiled.cost_analysis()
    cost.update((analysis[0] if isinstance(analysis, (list, tuple)) else analysis) or {})
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))
    return metrics
  return run, compile_s, flops.xla_flops(compiled), args


def _torch_param_groups(model, weight_decay: float):
  """As `lib.optim`: no weight decay on biases, LayerNorm weights and embedding tables."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    skip = name.endswith("bias") or "LayerNorm" in name or "embeddings" in name
    (no_decay if skip else decay).append(p)
  return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _hf_inputs(spec: ModelSpec, batch_np: dict) -> dict:
  """Our batch in HF's terms (ignored labels -100; GPT-2 shifts its labels itself)."""
  if spec.head == "lm":
    labels = np.where(batch_np["input_mask"] > 0, batch_np["input_ids"], HF_IGNORE)
    return dict(input_ids=batch_np["input_ids"], attention_mask=batch_np["input_mask"],
                labels=labels)
  labels = np.where(batch_np["labels"] < 0, HF_IGNORE, batch_np["labels"])
  return dict(input_ids=batch_np["input_ids"], attention_mask=batch_np["input_mask"],
              token_type_ids=batch_np["token_type_ids"], labels=labels)


def build_hf(spec: ModelSpec, batch_np: dict, dtype: str = "float32", lr: float = 2e-5,
             device: str = "cpu", compile_model: bool = False):
  """The Hugging Face PyTorch step: `spec.hf_factory()` in train mode (dropout on) on torch
  `device`, loss.backward(), clip_grad_norm_(1.0), torch.optim.AdamW; bf16 via torch.autocast;
  `compile_model`: the model through torch.compile (default inductor) first.

  Returns `run()`, which takes one step (synchronised: it reads the loss).
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = spec.hf_factory().to(device)
  model.train()
  opt = torch.optim.AdamW(_torch_param_groups(model, 0.01), lr=lr, betas=(0.9, 0.999), eps=1e-8)
  inputs = {k: torch.from_numpy(np.asarray(v, np.int64)).to(device)
            for k, v in _hf_inputs(spec, batch_np).items()}
  forward = torch.compile(model) if compile_model else model
  if dtype == "float32":
    autocast = contextlib.nullcontext
  else:
    autocast = lambda: torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))

  def run():
    with autocast():
      loss = forward(**inputs).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()
  return run


# ----------------------------------------------------------------------------- one table row

def benchmark_row(spec: ModelSpec, batch: int, seq_len: int, *, steps: int, warmup: int,
                  block: int = 1, dtype: str = "float32", hf_dtype: Optional[str] = None,
                  pad_frac: float = 0.0, peak_n: int = 2048) -> dict:
  """Times our step and the HF step on the same batch, interleaved; returns one table row.

  Args:
    spec: the model on both sides.
    batch, seq_len: batch shape (B, T).
    steps: timed steps per side (medians are reported).
    warmup: untimed steps per side after compilation.
    block: consecutive steps per side before switching to the other.
    dtype: our compute dtype (params stay float32); also HF's unless `hf_dtype` is given.
    hf_dtype: 'float32' (plain) or 'bfloat16' (torch.autocast) for the HF side.
    pad_frac: fraction of each row that is padding.
    peak_n: size of the square matmul whose FLOP/s is the peak (in `dtype`).
  """
  data = spec_batch(spec, batch, seq_len, pad_frac)
  ours, compile_s, xla_fl, args = build_ours(spec, data, dtype)
  hf = build_hf(spec, data, hf_dtype or dtype)
  for _ in range(warmup):
    ours(), hf()
  times = time_interleaved({"ours": ours, "hf": hf}, steps, block)
  peak = flops.matmul_peak(peak_n, dtype)
  hf_peak = torch_matmul_peak(peak_n, hf_dtype or dtype)
  med = {k: float(np.median(v)) for k, v in times.items()}
  fl = step_flops(spec, args, batch, seq_len)
  dt = dtype if hf_dtype in (None, dtype) else f"{dtype}/hf:{hf_dtype}"
  return dict(model=spec.name, dtype=dt, batch=batch, seq_len=seq_len,
              ours_ex_s=batch / med["ours"], hf_ex_s=batch / med["hf"],
              ratio=med["hf"] / med["ours"], compile_s=compile_s, model_gflop=fl / 1e9,
              xla_gflop=xla_fl / 1e9, ours_gflop_s=fl / med["ours"] / 1e9,
              peak_gflop_s=peak / 1e9, peak_frac=fl / med["ours"] / peak,
              hf_gflop_s=fl / med["hf"] / 1e9, hf_peak_gflop_s=hf_peak / 1e9,
              hf_peak_frac=fl / med["hf"] / hf_peak,
              ours_step_s=times["ours"], hf_step_s=times["hf"])


def torch_matmul_peak(n: int = 2048, dtype: str = "float32", reps: int = 5) -> float:
  """FLOP/s of PyTorch's (n, n) @ (n, n) on the CPU in `dtype` (bf16 as autocast runs its
  matmuls), best of `reps`: the HF side's own ceiling, beside flops.matmul_peak for ours."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(0)
  a, b = (torch.randn(n, n, generator=g).to(getattr(torch, dtype)) for _ in range(2))
  with torch.no_grad():
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
      t0 = time.perf_counter()
      torch.matmul(a, b)
      best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def step_flops(spec: ModelSpec, args, batch: int, seq_len: int) -> float:
  """Model FLOPs of one training step of `spec` (lib/flops: every parameter trained)."""
  shapes = models.abstract_params(models.build(args, spec.head, spec.num_labels))[0]
  return batch * seq_len * flops.model_flops_per_token(args, shapes, seq_len,
                                                       head_fraction=spec.head_fraction(seq_len))


ACCEL_COLUMNS = ("model", "head", "batch", "seq_len", "side", "step_ms", "tokens_s",
                 "vs_ours", "mfu", "compile_s")


def accelerator_rows(spec: ModelSpec, batch: int, seq_len: int, *, steps: int, warmup: int,
                     hf_sides=("eager", "compile"), device: str = "cuda") -> list:
  """Our bf16 step vs HF PyTorch bf16 autocast (eager and/or torch.compile) on one accelerator,
  interleaved; one row per side with its MFU against `device_peak` (the datasheet's dense bf16
  peak where the device is known). A side that fails to build gets a row with its error."""
  data = spec_batch(spec, batch, seq_len)
  ours, compile_s, _, args = build_ours(spec, data, "bfloat16")
  fns, built = {"ours": ours}, {"ours": compile_s}
  errors_ = {}
  for side in hf_sides:
    t0 = time.perf_counter()
    try:
      fn = build_hf(spec, data, "bfloat16", device=device, compile_model=side == "compile")
      fn()                                     # torch.compile compiles on the first call
      fns[f"hf_{side}"], built[f"hf_{side}"] = fn, time.perf_counter() - t0
    except Exception as e:  # pylint: disable=broad-except  # a row says why; the others still run
      errors_[f"hf_{side}"] = f"{type(e).__name__}: {e}"[:300]
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = time_interleaved(fns, steps)
  peak, peak_src = device_peak("bfloat16")
  fl = step_flops(spec, args, batch, seq_len)
  med = {k: float(np.median(v)) for k, v in times.items()}
  rows = [dict(model=spec.name, head=spec.head, batch=batch, seq_len=seq_len, side=k,
               step_ms=1e3 * m, tokens_s=batch * seq_len / m, vs_ours=m / med["ours"],
               mfu=fl / m / peak, compile_s=built[k], peak_flops=peak, peak_source=peak_src,
               step_s=times[k]) for k, m in med.items()]
  rows += [dict(model=spec.name, head=spec.head, batch=batch, seq_len=seq_len, side=k,
                error=e) for k, e in errors_.items()]
  return rows


def format_table(rows: list, columns: Sequence[str] = COLUMNS) -> str:
  """Markdown table of `columns` for benchmark rows."""
  def cell(v):
    if isinstance(v, float):
      return f"{v:.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c, "-")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- step breakdown

BREAKDOWN_COLUMNS = ("model", "dtype", "batch", "seq_len", "tokens", "step_ms", "forward_ms",
                     "backward_ms", "update_ms", "rest_ms", "fixed_ms", "ms_per_1k_tokens",
                     "marginal_gflop_s", "peak_gflop_s", "marginal_peak_frac")


def breakdown_row(spec: ModelSpec, batch: int, seq_len: int, *, steps: int, warmup: int,
                  dtype: str = "float32", peak_n: int = 2048) -> dict:
  """Where our full fine-tuning step's time goes, each part jitted on its own and timed
  interleaved (medians, ms): the whole step as `build_ours` runs it (`step_ms`); the training
  loss alone (`forward_ms`, dropout on); its gradients minus that (`backward_ms`); the optimizer
  update alone on those gradients (`update_ms`: the lib.optim chain and apply_updates, state
  donated); what the step adds to forward + backward (`rest_ms`: the update and metrics as XLA
  fuses them into the step, so usually far below `update_ms`). The gradients are also timed at
  twice the batch: the extra `batch` examples cost `ms_per_1k_tokens` per 1,000 tokens
  (`marginal_gflop_s` of model FLOPs, as a fraction of a jitted `peak_n`^2 matmul in `dtype`)
  and `fixed_ms` = 2 x grads(B) - grads(2B) is the part of a forward + backward that does not
  grow with the batch (embedding-table gradients, per-step dispatch, small ops). Where twice
  the batch times no slower (a model too small for the margin to beat the noise), those four
  columns are NaN and a warning is logged.
  """
  import optax  # pylint: disable=g-import-not-at-top
  data = spec_batch(spec, batch, seq_len)
  step = build_ours(spec, data, dtype)[0]
  args, module, _, params, labels, tx, _ = _ours_setup(spec, dtype, 2e-5, 0, peft.FULL_FINETUNE)
  trainable, frozen = peft.split_trainable(params, labels)
  loss_fn = spec.loss_fn(module, seq_len)
  rng = jax.random.key(0)
  loss = lambda t, b: loss_fn(peft.merge_trainable(t, frozen), b, rng, True)[0]
  forward, grad = jax.jit(loss), jax.jit(jax.grad(loss))
  batches = {1: jax.device_put(data), 2: jax.device_put(spec_batch(spec, 2 * batch, seq_len))}
  grads = grad(trainable, batches[1])

  def apply(g, opt_state, t):
    updates, opt_state = tx.update(g, opt_state, t)
    return optax.apply_updates(t, updates), opt_state
  update = jax.jit(apply, donate_argnums=(1, 2))
  held = {"t": jax.tree.map(jnp.copy, trainable), "s": tx.init(trainable)}

  def run_update():
    held["t"], held["s"] = update(grads, held["s"], held["t"])
    jax.block_until_ready(held["t"])
  fns = {"step": step,
         "forward": lambda: jax.block_until_ready(forward(trainable, batches[1])),
         "grads": lambda: jax.block_until_ready(grad(trainable, batches[1])),
         "grads_2x": lambda: jax.block_until_ready(grad(trainable, batches[2])),
         "update": run_update}
  for _ in range(max(warmup, 1)):     # the first call of each compiles
    for fn in fns.values():
      fn()
  ms = {k: 1e3 * float(np.median(v)) for k, v in time_interleaved(fns, steps).items()}
  tokens = batch * seq_len
  extra = ms["grads_2x"] - ms["grads"]
  if extra <= 0:       # twice the batch timed no slower: the margin is below the timing noise
    logging.warning("breakdown %s %dx%d: grads at 2x the batch took %.3f ms <= %.3f ms at 1x; "
                    "the marginal columns are NaN", spec.name, batch, seq_len, ms["grads_2x"],
                    ms["grads"])
    extra = float("nan")
  fl = step_flops(spec, args, batch, seq_len)
  peak = flops.matmul_peak(peak_n, dtype)
  return dict(model=spec.name, dtype=dtype, batch=batch, seq_len=seq_len, tokens=tokens,
              step_ms=ms["step"], forward_ms=ms["forward"],
              backward_ms=ms["grads"] - ms["forward"], update_ms=ms["update"],
              rest_ms=ms["step"] - ms["grads"], fixed_ms=ms["grads"] - extra,
              ms_per_1k_tokens=extra / tokens * 1e3, marginal_gflop_s=fl / extra / 1e6,
              peak_gflop_s=peak / 1e9, marginal_peak_frac=fl / extra * 1e3 / peak)


# ----------------------------------------------------------------------------- PEFT step costs

_HEAD = ("classifier/.*", "train")
_LORA = "lora(rank=8, alpha=16, dropout={})"
_ATTENTION = ".*/attention/(query|key|value|out)/kernel"
# name -> the PEFT rules of a step (configs/common.peft_variants' LoRA on other targets).
PEFT_SETTINGS = {
    "full": peft.FULL_FINETUNE,
    "lora_attention": (_HEAD, (_ATTENTION, _LORA.format(0.1)), (".*", "freeze")),
    "lora_all": (_HEAD, ("encoder/.*/kernel", _LORA.format(0.1)), (".*", "freeze")),
    "lora_all_nodropout": (_HEAD, ("encoder/.*/kernel", _LORA.format(0.0)), (".*", "freeze")),
    "head_only": (_HEAD, (".*", "freeze")),
}
PEFT_COLUMNS = ("model", "setting", "dtype", "batch", "seq_len", "step_s", "vs_full",
                "xla_gflop", "flop_vs_full", "gb_accessed", "bytes_vs_full")


def peft_rows(spec: ModelSpec, batch: int, seq_len: int, settings: Sequence[str], *, steps: int,
              warmup: int, dtype: str = "float32") -> list:
  """Our step under each PEFT setting (PEFT_SETTINGS), timed interleaved in one process, with
  XLA's FLOPs and bytes accessed of each compiled step; ratios against 'full' (added if absent).

  Raises:
    ValueError: an unknown setting.
  """
  unknown = sorted(set(settings) - set(PEFT_SETTINGS))
  if unknown:
    raise ValueError(f"unknown PEFT settings {unknown}; valid: {sorted(PEFT_SETTINGS)}")
  names = ["full"] + [n for n in settings if n != "full"]
  data = spec_batch(spec, batch, seq_len)
  runs, costs = {}, {}
  for name in names:
    costs[name] = {}
    runs[name] = build_ours(spec, data, dtype, peft_rules=PEFT_SETTINGS[name], cost=costs[name])[0]
  for _ in range(warmup):
    for run in runs.values():
      run()
  med = {k: float(np.median(v)) for k, v in time_interleaved(runs, steps).items()}
  fl = {k: float(c.get("flops", 0.0)) for k, c in costs.items()}
  by = {k: float(c.get("bytes accessed", 0.0)) for k, c in costs.items()}
  return [dict(model=spec.name, setting=n, dtype=dtype, batch=batch, seq_len=seq_len,
               step_s=med[n], vs_full=med[n] / med["full"], xla_gflop=fl[n] / 1e9,
               flop_vs_full=fl[n] / max(fl["full"], 1.0), gb_accessed=by[n] / 1e9,
               bytes_vs_full=by[n] / max(by["full"], 1.0)) for n in names]


# ----------------------------------------------------------------------------- adversarial steps

ADVERSARIAL_COLUMNS = ("model", "setting", "dtype", "batch", "seq_len", "step_s", "vs_plain",
                       "xla_gflop", "flop_vs_plain")


def adversarial_settings(names: Sequence[str], variants: dict) -> dict:
  """{name: its `config.adversarial` block} for variant names of `variants` (configs/common.
  adversarial_variants: name -> fn(config)); an unknown name is a UserError."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from lib import errors  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(names) - set(variants))
  if unknown:
    raise errors.UserError(f"--adversarial: unknown {unknown}; valid: {sorted(variants)}")
  settings = {}
  for name in names:
    holder = ml_collections.ConfigDict({"adversarial": adversarial.default_config()})
    variants[name](holder)
    settings[name] = holder.adversarial
  return settings


def adversarial_rows(spec: ModelSpec, batch: int, seq_len: int, settings: dict, *, steps: int,
                     warmup: int, dtype: str = "float32") -> list:
  """Our full fine-tuning step plain and under each adversarial setting ({name: a
  `config.adversarial` block}), timed interleaved in one process, with XLA's FLOPs of each
  compiled step; ratios against the plain step (the training-time overhead of each method)."""
  data = spec_batch(spec, batch, seq_len)
  runs, costs = {}, {}
  for name, acfg in [("plain", None)] + list(settings.items()):
    costs[name] = {}
    runs[name] = build_ours(spec, data, dtype, cost=costs[name], adversarial_cfg=acfg)[0]
  for _ in range(warmup):
    for run in runs.values():
      run()
  med = {k: float(np.median(v)) for k, v in time_interleaved(runs, steps).items()}
  fl = {k: float(c.get("flops", 0.0)) for k, c in costs.items()}
  return [dict(model=spec.name, setting=n, dtype=dtype, batch=batch, seq_len=seq_len,
               step_s=med[n], vs_plain=med[n] / med["plain"], xla_gflop=fl[n] / 1e9,
               flop_vs_plain=fl[n] / max(fl["plain"], 1.0)) for n in runs]
