"""Our LoRA/AdaLoRA against Hugging Face PEFT on a small budget: SST-2's first 1,000 training
sentences, 1 epoch (32 steps), full dev and test, 3 seeds; a cheap check of the implementations
before the full-data reference rows of tables/peft_sst2.py and tables/peft_ner.py.

  ./run.sh reproduce --table=tables/peft_check
  ./run.sh reproduce --table=tables/peft_check --rows=lora,hf_lora    # the LoRA pair only

The reference (research/reference_peft.py) gets our batches, schedule and seed; what still
differs is the initialisation (torch's RNG for the classifier and LoRA A) and the dropout masks,
which is what the seeds' spread measures.
"""

from lib import tables

REFERENCE = ("research/reference_peft.py: Hugging Face peft 0.21.2 on the HF PyTorch MiniLM "
             "(torch 2.13.0), a plain loop fed our batches, schedule, epoch and seed")
SEEDS = (0, 1, 2)

TABLE = tables.Table(
    name="peft_check",
    title="Ours vs Hugging Face PEFT: SST-2, 1,000 training sentences, 1 epoch, MiniLM",
    columns=(tables.Column("test.accuracy", "test acc"), tables.Column("dev.accuracy", "dev acc"),
             tables.Column("train.trainable_params", "trainable params", digits=0),
             tables.Column("train.median_step_s", "median step s", digits=2)),
    rows=(
        tables.Row("lora", "ours, LoRA r=8 (`quick+lora`)", "configs/sst2.py:quick+lora",
                   seeds=SEEDS, claim=True),
        tables.Row("hf_lora", "HF PEFT LoRA r=8 (Δ = reference - ours)",
                   "configs/sst2.py:quick+lora", script="research/reference_peft.py",
                   seeds=SEEDS, claim=True, vs="lora", note=REFERENCE),
        tables.Row("adalora", "ours, AdaLoRA 12→8 (`quick+adalora`)",
                   "configs/sst2.py:quick+adalora", seeds=SEEDS, claim=True),
        tables.Row("hf_adalora", "HF PEFT AdaLoRA 12→8 (Δ = reference - ours)",
                   "configs/sst2.py:quick+adalora", script="research/reference_peft.py",
                   seeds=SEEDS, claim=True, vs="adalora", note=REFERENCE),
    ),
    setting="a small budget (32 steps at lr 2e-3): the absolute accuracies are far below the "
            "full runs; only ours vs the reference is compared.",
)
