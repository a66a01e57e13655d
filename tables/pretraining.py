"""Does pretraining help? bert-mini from random init vs after MLM pretraining on our corpora, then
fine-tuned on SST-2 and CoNLL-2003; and MiniLM after continued MLM on the CoNLL-2003 text.

  ./run.sh reproduce --table=tables/pretraining          # the pretraining cells run first
  ./run.sh reproduce --table=tables/pretraining --emit=commands   # emits what can start now

Pretraining rows run once (seed 0); their fine-tuning rows start from that workdir whatever their
own seed ({workdir:<row>}). The bert-mini rows recorded here ran on a GPU machine lent to an
earlier session (one H100, jax 0.11.2 from its image; same code and data), about a minute each;
on 2 CPU cores a 1,600-step pretraining takes ~25 min.
"""

from lib import tables

GPU = ("README Results at commit d417692: one H100 lent to an earlier session, jax 0.11.2, same "
       "code and data (before the table runner)")
CPU = "README Results at commit d417692: 2 CPU cores (before the table runner)"
TEST, DEV = "test.f1|test.accuracy", "dev.f1|dev.accuracy"
LOSS, ACC = "held_out.loss", "held_out.accuracy"
RANDOM = ("--config.model.init_from=", "--config.model.preset=bert-mini",
          "--config.model.dropout_rate=0.1")


def _from(row_id):
  return (f"--config.model.init_from={{workdir:{row_id}}}", "--config.model.dropout_rate=0.1")


def _rec(source, **by_path):
  return tables.Recorded({p: {0: v} for p, v in by_path.items()}, source)


def _ft(id_, label, task, args, before, seeds=(0,), source=GPU, **kw):
  """A fine-tuning row; `before` = (dev, test) of seed 0, or ({seed: dev}, {seed: test}),
  recorded before the runner."""
  dev, test = (b if isinstance(b, dict) else {0: b} for b in before)
  return tables.Row(id_, label, f"configs/{task}.py", args, seeds=seeds,
                    recorded=tables.Recorded({DEV: dev, TEST: test}, source), **kw)


def _mlm(id_, label, args, loss, acc, config="configs/mlm.py", source=GPU):
  return tables.Row(id_, label, config, args, script="research/pretrain_mlm.py",
                    recorded=_rec(source, **{LOSS: loss, ACC: acc}))


TABLE = tables.Table(
    name="pretraining",
    title="Pretraining helps? bert-mini (4 layers, hidden 256) and MiniLM, fine-tuned",
    columns=(tables.Column(TEST, "test F1 / accuracy"), tables.Column(DEV, "dev F1 / accuracy"),
             tables.Column(LOSS, "held-out MLM loss", digits=3),
             tables.Column(ACC, "masked acc %", digits=1, scale=100)),
    rows=(
        _mlm("mlm1600", "MLM 1,600 steps (6.6M tokens)", (), 6.284, 0.166),
        _mlm("mlm8000", "MLM 8,000 steps (33M tokens)", ("--config.train.num_steps=8000",),
             4.398, 0.348),
        _ft("ner_random", "NER, random init", "ner", RANDOM, (0.6095, 0.5431), seeds=(0, 1, 2),
            claim=True),
        _ft("ner_mlm8000", "NER, MLM 8,000 steps", "ner", _from("mlm8000"), (0.7710, 0.7124),
            seeds=(0, 1, 2), claim=True, vs="ner_random"),
        _ft("sst2_random", "SST-2, random init", "sst2", RANDOM, (0.8165, 0.8232),
            seeds=(0, 1, 2), claim=True),
        _ft("sst2_mlm8000", "SST-2, MLM 8,000 steps", "sst2", _from("mlm8000"), (0.8154, 0.8182),
            seeds=(0, 1, 2), claim=True, vs="sst2_random"),
        _ft("ner_mlm1600", "NER, MLM 1,600 steps", "ner", _from("mlm1600"), (0.6819, 0.6177),
            vs="ner_random"),
        _ft("sst2_mlm1600", "SST-2, MLM 1,600 steps", "sst2", _from("mlm1600"),
            (0.7924, 0.8023), vs="sst2_random"),
        _mlm("minilm_mlm", "MiniLM, continued MLM on CoNLL-2003 text (300 steps, 1.2M tokens)",
             (), 4.90, 0.255, config="configs/mlm.py:minilm", source=CPU),
        _ft("minilm_ner", "NER from MiniLM (`configs/ner.py`)", "ner", (),
            ({0: 0.9016, 1: 0.9043, 2: 0.9064}, {0: 0.8579, 1: 0.8620, 2: 0.8623}),
            seeds=(0, 1, 2), source=CPU, claim=True),
        _ft("minilm_mlm_ner", "NER from MiniLM + continued MLM", "ner",
            ("--config.model.init_from={workdir:minilm_mlm}",), (0.9017, 0.8613),
            seeds=(0, 1, 2), source=CPU, claim=True, vs="minilm_ner"),
    ),
    setting="pretraining corpus: the training text of Brown, Shakespeare, CoNLL-2003 and SST-2 "
            "(2.46M word-pieces), far below BERT's 3.3B words; fine-tuning with the unchanged "
            "configs/sst2.py and configs/ner.py (dropout 0.1 for bert-mini).",
)
