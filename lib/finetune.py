"""Fine-tuning runs (token and sequence classification): the run skeleton with the task's evaluator.

Outputs in the workdir: model.json (what the run was trained with; a rerun must match it);
checkpoints/ (latest for resume, best on the dev metric); TensorBoard events and metrics.jsonl;
metrics.json (dev, test, train blocks); report.txt; test_predictions.conll (NER: `word gold
predicted`) or test_predictions.tsv (classification); curves.png; adapter/ when some parameters
were frozen (PEFT): the reported checkpoint's trainable leaves alone (peft.save_adapter).
"""

from typing import Optional

from lib import experiment, tasks


def run(cfg, workdir: str, *, source: Optional[str] = None, model_args=None,
        explain_sharding: bool = False) -> Optional[dict]:
  """Fine-tunes, evaluates the best dev checkpoint on test, writes the outputs; resumes a workdir.

  Args:
    cfg: a configs/ner.py or configs/sst2.py config (cfg.task names a lib/tasks task).
    workdir: outputs and checkpoints; an existing run there is resumed.
    source: model to start from (default cfg.model.init_from: HF dir, 'minilm', our model dir or
      run workdir).
    model_args: random init of this architecture instead of `source`.
    explain_sharding: print the per-parameter sharding table and return without training.

  Returns:
    the metrics.json content, or None (sharding explained, or preempted: rerun to resume).
  """
  return experiment.run(cfg, workdir, tasks.get(cfg.task), source=source, preset_args=model_args,
                        explain_sharding=explain_sharding,
                        hooks=lambda r: [experiment.adapter_hook(r)])
