"""Hugging Face PyTorch reference runs: the config's LoRA/AdaLoRA rules as `peft` configs on the
HF PyTorch MiniLM (or, when no rule adds adapters, the plain model with the 'train' rules'
parameters trainable: full fine-tuning), and a plain PyTorch training loop fed our batches
(lib.data), our learning-rate schedule (lib.optim) and scored by our tasks' collect/evaluate.
research/reference_peft.py runs it.
"""

import copy
import os
import re
import time

import numpy as np

# Sleeping OpenMP workers: spinning ones made HF steps 2-10x slower on a shared CPU
# (research/benchmark.py); read when torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import peft  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position

from lib import errors, hf, optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from lib.peft import spec as peft_spec  # pylint: disable=g-import-not-at-top,wrong-import-position

HEADS = {"ner": "token_cls", "classification": "seq_cls"}


def peft_config(cfg, num_steps: int, hf_config=None) -> tuple:
  """(HF LoraConfig/AdaLoraConfig, HF keys of the parameters 'train' rules keep trainable) of
  the config's peft rules over the modules of the model of `hf_config` (a HF config dict;
  default MiniLM's); (None, keys) when no rule adds adapters (full fine-tuning: every key)."""
  rules = peft_spec.spec_from_config(cfg.peft).rules
  args = hf.args_from_hf_config(hf_config or hf.read_hf_config(hf.minilm_dir()))
  targets, train_keys, methods = [], [], set()
  for ent in hf.name_map(args, HEADS[cfg.task]):
    method = next(m for rx, m in rules if re.fullmatch(rx, ent.paths[0]))
    if method.kind in ("lora", "adalora") and ent.paths[0].endswith("/kernel"):
      targets.append(ent.hf_key.rsplit(".", 1)[0])
      methods.add(method)
    elif method.kind == "train":
      train_keys.append(ent.hf_key)
  if not methods:        # full fine-tuning, or a subset trained in place (no adapters)
    return None, train_keys
  if len(methods) != 1:
    raise errors.ConfigError(f"config.peft.rules: the reference runs one lora or adalora "
                             f"method, the rules give {sorted(methods)}")
  m = methods.pop()
  common = dict(target_modules=targets, lora_alpha=m.alpha, lora_dropout=m.dropout)
  if m.kind == "lora":
    return peft.LoraConfig(r=m.rank, **common), train_keys
  return peft.AdaLoraConfig(
      init_r=m.init_rank, target_r=m.target_rank, tinit=int(round(m.t_init * num_steps)),
      tfinal=max(1, int(round(m.t_final * num_steps))), deltaT=m.delta_t, beta1=m.beta1,
      beta2=m.beta2, orth_reg_weight=m.orth_reg, total_step=num_steps, **common), train_keys


def wrap(base, cfg, num_steps: int):
  """The PEFT model: adapters on the targets, and the 'train' rules' parameters (the task head,
  SST-2's pooler bias) trainable in place, as ours trains them."""
  config, train_keys = peft_config(cfg, num_steps, base.config.to_dict())
  if config is None:     # no adapters: the plain HF model, the 'train' rules' parameters trained
    keep = set(train_keys)
    for name, p in base.named_parameters():
      p.requires_grad_(name in keep)
    return base
  model = peft.get_peft_model(base, config)
  named = dict(model.named_parameters())
  for key in train_keys:
    module, leaf = key.rsplit(".", 1)
    found = [n for n in (f"base_model.model.{key}", f"base_model.model.{module}.base_layer.{leaf}")
             if n in named]
    if not found:
      raise RuntimeError(f"{key}: not found in the PEFT model")
    named[found[0]].requires_grad_(True)
  return model


def torch_batch(batch, labels=True):
  """Our numpy batch -> HF keyword arguments (labels -1 and padding rows -> -100)."""
  out = dict(input_ids=torch.as_tensor(batch["input_ids"]).long(),
             attention_mask=torch.as_tensor(batch["input_mask"]).long())
  for k in ("token_type_ids", "position_ids"):
    if k in batch:
      out[k] = torch.as_tensor(batch[k]).long()
  if labels:
    y = batch["labels"] if "labels" in batch else batch["label"]
    y = torch.as_tensor(y).long()
    if y.ndim == 1:
      y = torch.where(torch.as_tensor(batch["example_ids"]) >= 0, y, -1)
    out["labels"] = torch.where(y >= 0, y, -100)
  return out


def predict(model, it) -> tuple:
  """(batches, argmax predictions) of `model` over an evaluation iterator, as our evaluator
  hands them to the task's collect (example ids as positions in the split)."""
  model.eval()
  pos = {e: i for i, e in enumerate(it.info["example_ids"])}
  batches, preds = [], []
  with torch.no_grad():
    for batch in it:
      logits = model(**torch_batch(batch, labels=False)).logits
      batches.append(dict(batch, example_ids=np.array([pos.get(int(e), -1)
                                                       for e in batch["example_ids"]])))
      preds.append(logits.argmax(-1).numpy().astype(np.int32))
  model.train()
  return batches, preds


def _optimizer(cfg, trainable):
  """AdamW as lib.optim's: no weight decay on biases and LayerNorm weights, nor on the embedding
  tables unless optim.decay_embeddings."""
  no_decay = lambda n: (n.endswith("bias") or "LayerNorm" in n
                        or ("_embeddings." in n and not cfg.optim.decay_embeddings))
  groups = [{"params": [p for n, p in trainable if not no_decay(n)],
             "weight_decay": cfg.optim.weight_decay},
            {"params": [p for n, p in trainable if no_decay(n)], "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2),
                           eps=cfg.optim.eps)


def fit(cfg, model, train_iter, steps: int, every: int, dev_fn, log_every: int = 50) -> tuple:
  """Trains `steps` steps (lr from lib.optim's schedule, clipping, AdaLoRA's budget updates),
  evaluates dev every `every` steps and at the end, restores the best dev state; prints the
  loss, steps/s and the time left every `log_every` steps (0: only at the evaluations).

  Returns:
    (best step, per-step seconds, per-step training losses).
  """
  trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  opt, schedule = _optimizer(cfg, trainable), optim.make_schedule(cfg.optim, steps)
  adalora = isinstance(getattr(model, "peft_config", {}).get("default"), peft.AdaLoraConfig)
  best, best_state, best_step, step_s, losses = -float("inf"), None, 0, [], []
  start = time.time()
  for step in range(1, steps + 1):
    t = time.time()
    for g in opt.param_groups:
      g["lr"] = float(schedule(step - 1))      # optax counts updates from 0
    loss = model(**torch_batch(next(train_iter))).loss   # + AdaLoRA's orthogonality term
    loss.backward()
    if cfg.optim.clip_norm:
      torch.nn.utils.clip_grad_norm_([p for _, p in trainable], cfg.optim.clip_norm)
    opt.step()
    if adalora:
      model.base_model.update_and_allocate(step - 1)
    opt.zero_grad(set_to_none=True)
    step_s.append(time.time() - t)
    losses.append(loss.detach())   # read after the loop: no host sync per step
    if log_every and step % log_every == 0:
      rate = step / (time.time() - start)
      print(f"step {step}/{steps} loss {loss.item():.4f} {rate:.2f} steps/s "
            f"eta {(steps - step) / rate:.0f} s", flush=True)
    if step % every == 0 or step == steps:
      dev = dev_fn()
      print(f"step {step}/{steps} loss {loss.item():.4f} dev {dev:.4f}", flush=True)
      if dev > best:
        best, best_step = dev, step
        best_state = copy.deepcopy({n: p.detach().clone() for n, p in trainable})
  with torch.no_grad():
    for n, p in trainable:
      p.copy_(best_state[n])
  return best_step, step_s, [float(l) for l in losses]
