"""Convert checkpoints: Hugging Face <-> ours (model.json + orbax params).

  # HF BERT / GPT-2 directory (or the installed MiniLM) -> our model directory
  ./run.sh convert --to=ours --src=minilm --dst=/tmp/minilm_ours
  # our model directory or a fine-tuning/pretraining workdir -> HF directory (PyTorch loadable)
  ./run.sh convert --to=hf --src=workdirs/ner --dst=/tmp/ner_hf
  # another checkpoint of the workdir than the one its metrics.json reports
  ./run.sh convert --to=hf --src=workdirs/ner@latest --dst=/tmp/ner_hf_latest

The head comes from the source (HF config `architectures`, or our model.json); a HF directory
written here loads with transformers' matching class (e.g. BertForTokenClassification) with no
missing or unexpected keys. --check reloads the written checkpoint and compares every tensor.
A run workdir stands for the checkpoint its metrics.json reports (the best on dev; see
lib/model_io.py); the step used is logged and recorded (config.json `workbench_source`, model.json
`source_step`). --dst is never the source, never a run's outputs, and an existing non-empty one
is replaced only with --overwrite.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from lib import hf, model_io, models, tree  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_enum("to", None, ["ours", "hf"], "target format")
flags.DEFINE_string("src", None, "--to=ours: a HF dir, 'minilm' or a run workdir; --to=hf: our "
                    "model dir or a run workdir. A run workdir means the checkpoint its "
                    "metrics.json reports (best on dev); <workdir>@latest, <workdir>@<step> or "
                    "<workdir>@best choose one")
flags.DEFINE_string("dst", None, "output directory (written atomically); never the source or a "
                    "directory holding checkpoints or run results; an existing non-empty one only "
                    "with --overwrite")
flags.DEFINE_bool("overwrite", False, "replace an existing non-empty --dst (never a run's outputs)")
flags.DEFINE_string("data_dir", common.DATA_DIR, "shared data (GPT-2 BPE tables)")
flags.DEFINE_bool("check", True, "reload the output and compare every tensor with the source")
flags.mark_flags_as_required(["to", "src", "dst"])


def _max_diff(a: dict, b: dict) -> float:
  fa, fb = tree.flatten(a), tree.flatten(b)
  if set(fa) != set(fb):
    raise SystemExit(f"round trip changed the parameter paths: {sorted(set(fa) ^ set(fb))[:10]}")
  return max(float(abs(fa[k].astype("float64") - fb[k]).max()) for k in fa)


def main(argv):
  del argv
  if FLAGS.to == "ours":
    model = model_io.to_ours(FLAGS.src, FLAGS.dst, overwrite=FLAGS.overwrite)
    back = model_io.load_model(FLAGS.dst, model.head, model.num_labels) if FLAGS.check else None
  else:
    model = model_io.ours_to_hf(FLAGS.src, FLAGS.dst, FLAGS.data_dir, overwrite=FLAGS.overwrite)
    back = None
    if FLAGS.check:
      _, params = hf.import_checkpoint(FLAGS.dst, model.head, model.num_labels)
      back = model_io.LoadedModel(model.args, model.head, model.num_labels, params, FLAGS.dst)
  step = "" if model.step is None else f" (checkpoint step {model.step})"
  print(f"{FLAGS.src}{step} -> {FLAGS.dst}: {model.args.arch}, head={model.head}, "
        f"{models.param_count(model.params):,} parameters")
  if back is not None:
    print(f"check: reloaded {FLAGS.dst}, max |difference| over all tensors = "
          f"{_max_diff(model.params, back.params):.3g}")


if __name__ == "__main__":
  from lib import cli  # pylint: disable=g-import-not-at-top  # defines --debug before parsing
  cli.run(main)
