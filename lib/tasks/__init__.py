"""The tasks: one module per task behind one interface, and the registry the runs look them up in.

A task is a module here (or any object, e.g. one defined in a test) with:
  HEAD                  the model head (a name in lib/models/heads.py's registry)
  METRIC, MODE          the evaluation metric that picks the best checkpoint, 'max' or 'min'
  RESTORE_BEST          True: the final report is of the best checkpoint (fine-tuning); False: of
                        the final state (pretraining)
  make_data(cfg, tokenizer, workdir) -> supervised.Data (train iterator, eval iterators, label
                        names, extras for the train block of metrics.json)
  make_loss(module, cfg) -> loss_fn(params, batch, rng, train) -> (loss, metrics)
  make_evaluator(run) -> an evaluator of a `lib.experiment.Run` with
      dev(state) -> {metric: value}          run during training (METRIC among the keys)
      final(state, history) -> {block: {}}   the metrics.json blocks (e.g. dev/test, held_out)
      write(workdir)                         report and prediction files of the last `final`
      summary(out) -> str                    one line for the console
      curves(history_rows) -> {name: [(step, value)]}   for curves.png
Optional:
  ARCH                  the architecture the task needs ('bert', 'gpt2')
  head_fraction(cfg)    share of positions a tied output layer runs on (FLOPs count)
  load_tokenizer(cfg, workdir, arch) -> (tokenizer, where)   (default: the model source's)
The runs (lib/experiment.py) call only this interface: no code outside lib/tasks/ branches on a
task's name.
"""

from lib import errors
from lib.tasks import classification, clm, cloze, contrastive, mlm, ner, token_contrastive

TASKS = {"ner": ner, "classification": classification, "mlm": mlm, "clm": clm,
         "contrastive": contrastive, "cloze": cloze, "token_contrastive": token_contrastive}


def register(name: str, task) -> None:
  """Adds a task (a module or an object with the interface above) under `name`."""
  TASKS[name] = task


def get(name: str):
  """The task registered as `name`.

  Raises:
    errors.ConfigError: an unknown name, listing the registered ones.
  """
  if name not in TASKS:
    raise errors.ConfigError(f"unknown task {name!r}; valid: {sorted(TASKS)}")
  return TASKS[name]
