"""CoNLL-2003 NER: MiniLM (the installed checkpoint) + token classifier, sentence-level context.

  ./run.sh finetune       # the main job: configs/ner.py:packed+bf16 -> workdirs/ner
  ./run.sh finetune --config=configs/ner.py --workdir=workdirs/ner_f32   # float32, unpacked
  .venv/bin/python research/finetune.py --config=configs/ner.py:quick --workdir=/tmp/ner_quick

Variants (`--config=configs/ner.py:<variant>`):
  (none)  the full run: AdamW lr 1e-4, wd 0.01, 10% warmup then linear decay, batch 32, 3 epochs,
          clip 1.0, seed 0, max 128 word-pieces per window (longer sentences are windowed, never cut).
  quick   the first 1,000 training sentences, 2 epochs, full dev and test evaluation (smoke test / demo).
  bf16    bfloat16 compute (params and optimizer state stay float32).
  packed  training batches of 5 rows x 128 word-pieces with the windows laid end to end (segment
          and position ids keep them apart; lib/data pack_rows): ~1% padding instead of ~29%, one
          compiled step instead of one per length bucket; ~640 real tokens a step as the default's
          32 sentences, so about as many steps. Evaluation unchanged. Combine: `packed+bf16`.
  fgm, pgd, freelb
          adversarial training on the word embeddings (configs/common.py:adversarial_variants,
          lib/adversarial.py): FGM eps 0.2; PGD-3 eps 0.2 step 0.06; FreeLB-3 step 0.1 init 0.1.
          Combine with '+', e.g. `quick+fgm` or `lora+freelb`.
  lora, adalora, bitfit, adapter, prefix, prompt
          parameter-efficient fine-tuning (configs/common.py:peft_variants, lib/peft): only the
          method's parameters and the classifier are trained (LoRA r=8 / AdaLoRA 12->8 on the
          attention projections). Combine with '+', e.g. `quick+lora`.

Measured (README Results, tables/finetune): `packed+bf16` test F1 0.8645 +- 0.0018 over 3 seeds,
331 s on 2 Zen 4 cores with the tuned allocator. The float32 default (before the table runner, 2
CPU cores, seed 0, then `./run.sh finetune`'s configuration): test entity F1 0.8579
(P 0.8528, R 0.8630), dev F1 0.9016 (best of the three epochs: epoch 2), 1,314 steps, 531 s wall.
Seeds 1 and 2: test F1 0.8620 and 0.8623 (mean of three seeds 0.8607). Hugging Face PyTorch on
the same machine kind: test F1 0.8624, 1,330 s.
"""

from configs import common


def get_config(variant: str = ""):
  c = common.finetune_base()
  c.task = "ner"
  c.data.dataset = "conll2003"
  c.data.max_len = 128
  c.data.stride = 32              # word-pieces of context kept when a long sentence is windowed
  c.data.label_all_subwords = False
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.01
  c.train.epochs = 3
  c.train.patience = 0
  return common.apply_variant(c, variant, {
      "quick": _quick,
      "bf16": common.bf16,
      "packed": _packed,
      **common.adversarial_variants(),
      **common.peft_variants([["classifier/.*", "train"]]),
  })


def _quick(c):
  c.data.max_train_examples = 1000
  c.train.epochs = 2
  c.train.log_every = 5


def _packed(c):
  c.data.pack_rows = 5      # 5 x 128 = 640 tokens: the default batches' ~639 real tokens a step
