"""Reference runs: the HF PyTorch MiniLM with a plain training loop, fed the same batches,
schedule, epochs and seed as our run of the same config: Hugging Face `peft` LoRA/AdaLoRA for the
PEFT variants, full fine-tuning for a config without adapters (the main job's reference).

  .venv/bin/python research/reference_peft.py --config=configs/ner.py:lora --workdir=/tmp/hf_lora
  .venv/bin/python research/reference_peft.py --config=configs/ner.py --workdir=/tmp/hf_ner
  ./run.sh reproduce --table=tables/peft_ner --rows=hf_lora     # as rows of the PEFT tables
  ./run.sh reproduce --table=tables/finetune --rows=hf_ner      # the main job's reference

The config's peft rules are translated: LoRA/AdaLoRA rules -> `target_modules` (the HF modules of
the kernels they match), 'train' rules -> those parameters trainable in place (the head, SST-2's
pooler bias), everything else frozen. Batches come from our data pipeline (lib.data: the same
tokenisation, windows, buckets and order), the learning rate from lib.optim's schedule (AdamW, no
decay on biases/LayerNorms, clipping), AdaLoRA's budget phases from its t_init/t_final fractions;
dev is evaluated when ours is, the best dev state is tested, and predictions are scored by the
task's own collect/evaluate (lib/peft_reference.py). Writes metrics.json (dev, test, train) like
research/finetune.py. Not resumable: a crashed run starts over. Differences that remain: HF's
initialisation of the classifier and LoRA A (torch RNG, not ours) and torch's dropout masks.
"""

import os
import resource
import sys
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import cli, errors  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/<ner|sst2>.py:<lora|adalora>",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "where metrics.json goes")
flags.DEFINE_integer("threads", 0, "torch threads (0: torch's default)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # pylint: disable=g-import-not-at-top  # torch etc. after flag parsing (fast --help)
  from lib import peft_reference as ref   # first: sets OMP_WAIT_POLICY before torch loads
  from lib import data, hf, model_io, reporting, tasks
  from lib.tasks import supervised
  import peft
  import torch
  import transformers
  # pylint: enable=g-import-not-at-top
  cfg = FLAGS.config
  if cfg.task not in ref.HEADS:
    raise errors.ConfigError(f"config.task={cfg.task!r}: the reference runs "
                             f"{sorted(ref.HEADS)}")
  if cfg.data.get("pack_rows"):
    raise errors.ConfigError(f"config.data.pack_rows={cfg.data.pack_rows}: the reference loop "
                             "feeds Hugging Face BERT, which has no segment ids to keep packed "
                             "windows apart; run it on the unpacked config")
  if FLAGS.threads:
    torch.set_num_threads(FLAGS.threads)
  torch.manual_seed(cfg.seed)
  task, t0 = tasks.get(cfg.task), time.time()
  tok, _ = model_io.load_tokenizer("minilm", "bert", cfg.data.dir, cfg.model.tokenizer)
  d = supervised.make_data(cfg, tok)
  steps = cfg.train.num_steps or cfg.train.epochs * len(d.train)
  cls = (transformers.BertForTokenClassification if cfg.task == "ner"
         else transformers.BertForSequenceClassification)
  kw = {} if cfg.model.dropout_rate < 0 else dict(hidden_dropout_prob=cfg.model.dropout_rate)
  model = ref.wrap(cls.from_pretrained(hf.minilm_dir(), num_labels=len(d.label_names), **kw), cfg,
               steps)

  def score(split):
    gold = data.read_gold(supervised.data_kwargs(cfg.data, split), split)[1]
    it = d.evals[split]
    return task.evaluate(gold, task.collect(*ref.predict(model, it), it.info, d.label_names))
  eval_s = []

  def dev_metric():
    t = time.time()
    out = score("validation")[task.METRIC]
    eval_s.append(time.time() - t)
    return out
  best_step, step_s, _ = ref.fit(cfg, model, d.train, steps, cfg.train.eval_every or len(d.train),
                              dev_metric, log_every=cfg.train.log_every)
  n_all = sum(p.numel() for p in model.parameters())   # base + adapters
  n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
  out = dict(dev=score("validation"), test=score("test"), train=dict(
      steps=steps, best_step=best_step, wall_s=time.time() - t0,
      median_step_s=float(np.median(step_s)), mean_step_s=float(np.mean(step_s)),
      train_s=float(sum(step_s)), eval_s=float(sum(eval_s)),
      peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      trainable_params=n_train,
      trainable_percent=100.0 * n_train / n_all, params=n_all),
      reference=dict(torch=torch.__version__, peft=peft.__version__,
                     transformers=transformers.__version__, threads=torch.get_num_threads()))
  reporting.write_json_atomic(os.path.join(FLAGS.workdir, "metrics.json"),
                              dict(out, config=cfg.to_dict()))
  print(f"dev {task.METRIC} {out['dev'][task.METRIC]:.4f}  test {task.METRIC} "
        f"{out['test'][task.METRIC]:.4f} (best step {best_step}) -> {FLAGS.workdir}")


if __name__ == "__main__":
  cli.run(main)
