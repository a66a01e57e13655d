"""Pretraining runs (BERT masked LM, GPT-2 causal LM): the run skeleton with held-out evaluation.

Outputs in the workdir: model.json (with the tokenizer's location; tokenizer/ when a vocabulary is
trained), checkpoints/, TensorBoard events and metrics.jsonl, metrics.json (held-out results,
throughput, packing efficiency, MFU), curves.png, and for CLM samples.txt (the text sampled at
each evaluation).
"""

from typing import Optional

from lib import errors, experiment, tasks

OBJECTIVES = ("mlm", "clm")      # the lib/tasks tasks that pretrain (config `objective`)


def run(cfg, workdir: str, *, model_args=None, explain_sharding: bool = False) -> Optional[dict]:
  """Pretrains (MLM or CLM), evaluates the held-out splits, writes the outputs; resumes a workdir.

  Args:
    cfg: a configs/mlm.py or configs/clm.py config.
    workdir: outputs and checkpoints; an existing run there is resumed.
    model_args: random init of this architecture (vocab_size follows the tokenizer); None:
      continue from cfg.model.init_from (its head is initialised if it has none).
    explain_sharding: print the per-parameter sharding table and return without training.

  Returns:
    the metrics.json content, or None (sharding explained, or preempted: rerun to resume).
  """
  if cfg.objective not in OBJECTIVES:
    raise errors.ConfigError(f"config.objective={cfg.objective!r}; valid: {list(OBJECTIVES)}")
  return experiment.run(cfg, workdir, tasks.get(cfg.objective), preset_args=model_args,
                        explain_sharding=explain_sharding)
