"""Train-step benchmark core: our jitted token-classification step vs Hugging Face PyTorch, timed interleaved."""

import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from lib import flops, models, optim, peft, sharding, train
from lib.tasks import ner

COLUMNS = ("model", "dtype", "batch", "seq_len", "ours_ex_s", "hf_ex_s", "ratio", "compile_s",
           "model_gflop", "xla_gflop", "ours_gflop_s", "peak_gflop_s", "peak_frac")
HF_IGNORE = -100   # CrossEntropyLoss ignore_index in transformers; ours is any label < 0


@dataclasses.dataclass
class ModelSpec:
  """One benchmarked model: our args/params and a factory for the matching HF torch model."""
  name: str
  args: models.ModelArgs
  params: Optional[dict]          # None = random init (seed 0)
  hf_factory: Callable            # () -> transformers.BertForTokenClassification
  num_labels: int = 9


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


# ----------------------------------------------------------------------------- the two steps

def build_ours(spec: ModelSpec, batch_np: dict, dtype: str = "float32", lr: float = 2e-5,
               seed: int = 0, peft_rules=peft.FULL_FINETUNE, cost: Optional[dict] = None):
  """Our fine-tuning step as `lib.train` runs it (NER loss, `lib.optim` AdamW chain, 1 device),
  training what `peft_rules` say (LoRA factors added as the run skeleton adds them).

  Returns (run, compile_s, xla_flops, args): `run()` takes one blocking step. `cost`, if given,
  receives XLA's cost analysis of the compiled step ('flops', 'bytes accessed', ...).
  """
  base = dataclasses.replace(spec.args, dtype=dtype)
  args = peft.configure(base, peft.parse_spec(peft_rules))
  module = models.build(args, "token_cls", spec.num_labels)
  shapes, specs = models.abstract_params(module)
  params = spec.params
  if params is None:
    params = models.init_params(models.build(base, "token_cls", spec.num_labels),
                                jax.random.key(seed))[0]
  if args != base:
    params = peft.add_params(params, module, jax.random.key(seed + 1))
  labels = peft.label_params(shapes, peft_rules, log=False)
  ocfg = optim.default_config()
  ocfg.lr = lr
  tx, schedule = optim.make_optimizer(ocfg, labels, num_steps=100_000)
  mesh = sharding.make_mesh(sharding.default_mesh_config(), jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  state = train.train_state_from_params(params, tx, mesh, rules, specs, labels)
  step = train.make_train_step(ner.make_loss_fn(module), tx, labels=labels, schedule=schedule,
                               seed=seed)
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


def build_hf(spec: ModelSpec, batch_np: dict, dtype: str = "float32", lr: float = 2e-5):
  """The Hugging Face PyTorch step: BertForTokenClassification in train mode (dropout on),
  loss.backward(), clip_grad_norm_(1.0), torch.optim.AdamW; bf16 via torch.autocast.

  Returns `run()`, which takes one step.
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = spec.hf_factory()
  model.train()
  opt = torch.optim.AdamW(_torch_param_groups(model, 0.01), lr=lr, betas=(0.9, 0.999), eps=1e-8)
  labels = np.where(batch_np["labels"] < 0, HF_IGNORE, batch_np["labels"])
  inputs = dict(input_ids=batch_np["input_ids"], attention_mask=batch_np["input_mask"],
                token_type_ids=batch_np["token_type_ids"], labels=labels)
  inputs = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in inputs.items()}
  if dtype == "float32":
    autocast = contextlib.nullcontext
  else:
    autocast = lambda: torch.autocast("cpu", dtype=getattr(torch, dtype))

  def run():
    with autocast():
      loss = model(**inputs).loss
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
  data = synthetic_batch(batch, seq_len, spec.args.vocab_size, spec.num_labels, pad_frac)
  ours, compile_s, xla_fl, args = build_ours(spec, data, dtype)
  hf = build_hf(spec, data, hf_dtype or dtype)
  for _ in range(warmup):
    ours(), hf()
  times = time_interleaved({"ours": ours, "hf": hf}, steps, block)
  peak = flops.matmul_peak(peak_n, dtype)
  med = {k: float(np.median(v)) for k, v in times.items()}
  shapes = models.abstract_params(models.build(args, "token_cls", spec.num_labels))[0]
  fl = batch * seq_len * flops.model_flops_per_token(args, shapes, seq_len)
  dt = dtype if hf_dtype in (None, dtype) else f"{dtype}/hf:{hf_dtype}"
  return dict(model=spec.name, dtype=dt, batch=batch, seq_len=seq_len,
              ours_ex_s=batch / med["ours"], hf_ex_s=batch / med["hf"],
              ratio=med["hf"] / med["ours"], compile_s=compile_s, model_gflop=fl / 1e9,
              xla_gflop=xla_fl / 1e9, ours_gflop_s=fl / med["ours"] / 1e9,
              peak_gflop_s=peak / 1e9, peak_frac=fl / med["ours"] / peak,
              ours_step_s=times["ours"], hf_step_s=times["hf"])


def format_table(rows: list, columns: Sequence[str] = COLUMNS) -> str:
  """Markdown table of `columns` for benchmark rows."""
  def cell(v):
    if isinstance(v, float):
      return f"{v:.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


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
  data = synthetic_batch(batch, seq_len, spec.args.vocab_size, spec.num_labels)
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
