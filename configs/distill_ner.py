"""CoNLL-2003 NER distillation: a MiniLM-L6 teacher fine-tuned by configs/ner.py -> a 3-layer
student made from teacher layers (1, 3, 5) (lib/distill.py); soft targets per word-piece.

  ./run.sh finetune --config=configs/ner.py --workdir=workdirs/ner            # the teacher
  ./run.sh distill --config=configs/distill_ner.py --workdir=workdirs/distill_ner
  ./run.sh distill --config=configs/distill_ner.py:hard --workdir=workdirs/ner_l3_nodistill

Variants: as configs/distill_sst2.py (hard, soft, hidden, minilm, cache, bf16_teacher, layers024,
bf16), with `quick` = the first 1,000 training sentences, 2 epochs. The training recipe is
configs/ner.py's (AdamW 1e-4, 3 epochs, batch 32, windows of 128 word-pieces).
Not measured yet on this machine (see the README's distillation section).
"""

from configs import distill_sst2, ner


def get_config(variant: str = ""):
  return distill_sst2.with_distill(ner.get_config(""), variant, teacher="workdirs/ner",
                                   overrides={"quick": _quick})


def _quick(c):
  c.data.max_train_examples = 1000
  c.train.epochs = 2
  c.train.log_every = 5
