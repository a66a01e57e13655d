"""The `quick` table: a random-init bert-tiny on 64 CoNLL-2003 sentences, two learning rates x two
seeds, a few seconds of training per cell. CI runs it end to end (tests/test_tables.py); it checks
the machinery (run, skip, aggregate), not a research claim.

  ./run.sh reproduce --table=tables/quick
"""

from lib import tables

# Tiny on purpose: 64 training sentences of at most 32 word-pieces, 32 dev/test sentences, one
# epoch (6 steps: long sentences take two windows); the time goes to start-up and compilation.
_TINY = ("--config.model.init_from=", "--config.model.preset=bert-tiny",
         "--config.data.max_train_examples=64", "--config.data.max_eval_examples=32",
         "--config.data.max_len=32", "--config.data.stride=8", "--config.data.batch_size=16",
         "--config.train.epochs=1", "--config.train.log_every=2")

TABLE = tables.Table(
    name="quick",
    title="quick: bert-tiny (random init), 64 CoNLL-2003 sentences, 1 epoch",
    # Token accuracy first: after 6 steps the entity F1 is mostly 0 (nothing to compare).
    columns=(tables.Column("dev.token_accuracy", "dev token accuracy"),
             tables.Column("dev.f1", "dev F1"), tables.Column("test.f1", "test F1"),
             tables.Column("train.steps", "steps", digits=0)),
    rows=(
        tables.Row("lr3e-3", "lr 3e-3", "configs/ner.py:quick", _TINY + ("--config.optim.lr=3e-3",),
                   seeds=(0, 1), claim=True),
        tables.Row("lr1e-4", "lr 1e-4", "configs/ner.py:quick", _TINY + ("--config.optim.lr=1e-4",),
                   seeds=(0, 1), vs="lr3e-3"),
    ),
    setting="a smoke test of the table machinery: the numbers mean nothing about NER.",
)
