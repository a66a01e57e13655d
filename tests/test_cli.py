"""lib/cli.py and the research scripts' user errors: one line `error: ...`, exit codes 0/1/2/75,
tracebacks only for bugs or with --debug / WORKBENCH_DEBUG=1; unknown config keys explained;
--help; a truncated safetensors file named.

The scripts run in subprocesses as a user runs them; each refusal comes before any data is
loaded or anything is compiled (seconds).
"""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from configs import ner
from lib import cli, errors, hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **extra)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  env.pop(cli.DEBUG_ENV, None) if cli.DEBUG_ENV not in extra else None
  return env


def _run(script: str, *args, timeout: int = 120, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, script, *args], cwd=REPO, env=_env(**env),
                        capture_output=True, text=True, timeout=timeout)


def _last_line(text: str) -> str:
  return [line for line in text.splitlines() if line.strip()][-1]


def _assert_user_error(out: subprocess.CompletedProcess, *needles: str):
  assert out.returncode == cli.EXIT_USER_ERROR, out.stderr[-3000:]
  last = _last_line(out.stderr)
  assert last.startswith("error: "), out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  assert sum(line.startswith("error:") for line in out.stderr.splitlines()) == 1
  for needle in needles:
    assert needle in last, last
  return last


# ----------------------------------------------------------------------------- unit

def test_close_matches():
  assert cli.close_matches("learning_rate", ["lr", "b1", "eps", "name"]) == ["lr"]
  assert cli.close_matches("epoch", ["epochs", "keep", "seed"]) == ["epochs"]
  assert cli.close_matches("zzz", ["epochs", "keep"]) == []


def test_unknown_key_message():
  cfg = ner.get_config()
  assert cli.unknown_key_message(cfg, "optim.lr") is None
  assert cli.unknown_key_message(cfg, "optim.learning_rate") == (
      "--config.optim.learning_rate: config.optim has no key 'learning_rate'; valid keys of "
      "config.optim: accum_steps, b1, b2, clip_norm, decay_embeddings, eps, lr, lr_mult, name, "
      "schedule, warmup_frac, warmup_steps, weight_decay; did you mean --config.optim.lr?")
  msg = cli.unknown_key_message(cfg, "trian.epochs")
  assert msg.startswith("--config.trian.epochs: config has no key 'trian'; valid keys of config: ")
  assert ", data, mesh, model, optim, peft, " in msg and msg.endswith("did you mean --config.train?")
  assert cli.unknown_key_message(cfg, "trian.epochs").endswith("did you mean --config.train?")
  assert cli.unknown_key_message(cfg, "optim.lr.x") == (
      "--config.optim.lr.x: config.optim.lr is a float value (0.0001), not a section with keys")
  empty = ml_collections.ConfigDict(dict(optim=dict(lr_mult={})))
  assert "config.optim.lr_mult has no key 'head'; valid keys of config.optim.lr_mult: (none)" in (
      cli.unknown_key_message(empty, "optim.lr_mult.head"))


def test_one_line():
  assert cli.one_line("a.json does not fit:\n  missing x\n\n  unexpected y\n") == (
      "a.json does not fit:; missing x; unexpected y")


def test_exit_codes_are_distinct_and_documented():
  codes = (cli.EXIT_OK, cli.EXIT_BUG, cli.EXIT_USER_ERROR, cli.EXIT_PREEMPTED)
  assert codes == (0, 1, 2, 75)
  for code in codes[1:]:
    assert f"\n  {code} " in cli.__doc__


def test_truncated_safetensors_names_the_file(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = tmp_path / "model.safetensors"
  save_file({"w": np.ones((64, 64), np.float32)}, str(path))
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(errors.CorruptFileError) as e:
    hf.load_hf_state(str(tmp_path))
  assert str(e.value).startswith(f"{path}: truncated or corrupt safetensors file")
  assert isinstance(e.value, ValueError)


# ----------------------------------------------------------------------------- exit codes

_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from absl import app, flags
from lib import cli, errors
flags.DEFINE_string("mode", "ok", "what main does")

def main(argv):
  mode = flags.FLAGS.mode
  if mode == "preempted":
    return cli.preempted()
  if mode == "user":
    raise errors.ConfigError("config.x=1: must be > 1")
  if mode == "usage":
    raise app.UsageError("--workdir is required")
  if mode == "bug":
    raise KeyError("a bug")
  print("done")

cli.run(main)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
  path = tmp_path_factory.mktemp("cli") / "script.py"
  path.write_text(textwrap.dedent(_SCRIPT.format(repo=REPO)))
  return str(path)


def test_exit_codes_of_a_script(script):
  ok = _run(script)
  assert ok.returncode == cli.EXIT_OK and ok.stdout == "done\n"
  pre = _run(script, "--mode=preempted")
  assert pre.returncode == cli.EXIT_PREEMPTED
  assert "rerun the same command to resume" in pre.stderr
  _assert_user_error(_run(script, "--mode=user"), "error: config.x=1: must be > 1")
  _assert_user_error(_run(script, "--mode=usage"), "error: --workdir is required (see --help)")
  _assert_user_error(_run(script, "--mode"), "error: Missing value for flag --mode")
  _assert_user_error(_run(script, "--mdoe=x"), "error: Unknown command line flag 'mdoe'")
  bug = _run(script, "--mode=bug")
  assert bug.returncode == cli.EXIT_BUG
  assert "Traceback" in bug.stderr and _last_line(bug.stderr) == "KeyError: 'a bug'"


def test_debug_shows_the_traceback_of_a_user_error(script):
  for out in (_run(script, "--mode=user", "--debug"), _run(script, "--mode=user",
                                                           WORKBENCH_DEBUG="1")):
    assert out.returncode == cli.EXIT_USER_ERROR
    assert "Traceback" in out.stderr and "lib.errors.ConfigError" in out.stderr
    assert _last_line(out.stderr) == "error: config.x=1: must be > 1"


_MALLINFO = """
import ctypes, json, sys
sys.path.insert(0, {repo!r})
from lib import cli
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                             "usmblks", "fsmblks", "uordblks", "fordblks",
                                             "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
def mmapped_blocks_of_a_64mib_malloc():
  n = libc.mallinfo2().hblks
  p = libc.malloc(64 << 20)
  n = libc.mallinfo2().hblks - n
  libc.free(ctypes.c_void_p(p))
  return n
before = mmapped_blocks_of_a_64mib_malloc()
line = cli.tune_malloc()
print(json.dumps([before, mmapped_blocks_of_a_64mib_malloc(), line]))
"""


def test_malloc_tuning_serves_large_blocks_from_the_heap(tmp_path):
  """glibc mmap()s a 64 MiB block by default (a fresh, zero-filled mapping every step for XLA's
  large buffers); after cli.tune_malloc it comes from the heap. A user's MALLOC_* variable wins."""
  import platform  # pylint: disable=g-import-not-at-top
  if platform.libc_ver()[0] != "glibc":
    pytest.skip("glibc only")
  path = tmp_path / "mallinfo.py"
  path.write_text(_MALLINFO.format(repo=REPO))
  env = {k: v for k, v in _env().items() if not k.startswith("MALLOC_")}
  out = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True,
                       timeout=60)
  if "mallinfo2" in out.stderr:
    pytest.skip("glibc < 2.33: no mallinfo2")
  before, after, line = json.loads(out.stdout)
  assert (before, after) == (1, 0), out.stdout
  assert "M_MMAP_MAX" in line and "M_TRIM_THRESHOLD" in line and "M_ARENA_MAX" in line
  env["MALLOC_ARENA_MAX"] = "2"
  user = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True,
                        timeout=60)
  assert json.loads(user.stdout) == [1, 1, None], user.stdout


def test_scripts_tune_malloc_unless_told_not_to(script):
  tuned = _run(script)
  assert tuned.returncode == 0 and "malloc: glibc mallopt M_TRIM_THRESHOLD" in tuned.stderr
  plain = _run(script, "--nomalloc_tuning")
  assert plain.returncode == 0 and "malloc:" not in plain.stderr


# ----------------------------------------------------------------------------- research scripts

FINETUNE = os.path.join("research", "finetune.py")
CONVERT = os.path.join("research", "convert.py")


@pytest.mark.parametrize("args,needles", [
    (["--config.optim.lr=-1"], ["config.optim.lr=-1.0: must be a number > 0"]),
    (["--config.optim.learning_rate=1"],
     ["config.optim has no key 'learning_rate'", "lr, lr_mult", "did you mean --config.optim.lr?"]),
    (["--config.model.preset=bert-huge"], ["unknown model preset 'bert-huge'", "bert-tiny"]),
    (["--config.model.init_from=/nonexistent/model"],
     ["config.model.init_from='/nonexistent/model': no such file or directory"]),
    (["--config.data.batch_size=0", "--config.train.epochs=0"],
     ["config.data.batch_size=0: must be an integer >= 1; ",
      "config.train.num_steps=0 and config.train.epochs=0"]),
    (["--config.data.max_len=600"], ["config.data.max_len=600: exceeds the model's 512"]),
    (["--config.train.epochs=1.5"], ["--config.train.epochs=1.5"]),
])
def test_finetune_user_errors_are_one_line(tmp_path, args, needles):
  out = _run(FINETUNE, "--config=configs/ner.py", f"--workdir={tmp_path / 'w'}", *args)
  _assert_user_error(out, *needles)
  assert not os.path.exists(tmp_path / "w")           # refused before anything is written


@pytest.mark.parametrize("config,needle", [
    ("configs/nope.py", "--config=configs/nope.py: no such config file"),
    ("configs/ner.py:quick+nope", "--config=configs/ner.py:quick+nope: unknown config variant "
     "'nope'; valid: ['adalora', "),
])
def test_bad_config_file_or_variant(tmp_path, config, needle):
  _assert_user_error(_run(FINETUNE, f"--config={config}", f"--workdir={tmp_path}"), needle)


def test_debug_env_shows_the_traceback_of_a_config_error(tmp_path):
  out = _run(FINETUNE, "--config=configs/ner.py", f"--workdir={tmp_path}",
             "--config.optim.lr=-1", WORKBENCH_DEBUG="1")
  assert out.returncode == cli.EXIT_USER_ERROR
  assert "Traceback" in out.stderr and "config_check.py" in out.stderr
  assert _last_line(out.stderr).startswith("error: config.optim.lr=-1.0")


def test_help_exits_0_and_lists_the_config_keys():
  out = _run(FINETUNE, "--help")
  assert out.returncode == cli.EXIT_OK, out.stderr
  assert "--workdir" in out.stdout and "--config=<file>[:variant]" in out.stdout
  out = _run(FINETUNE, "--config=configs/ner.py:quick", "--help")
  assert out.returncode == cli.EXIT_OK, out.stderr
  lines = out.stdout.splitlines()
  for line in ("  config.optim.lr = 0.0001", "  config.data.max_train_examples = 1000",
               "  config.data.cache_dir = ''", "  config.train.epochs = 2"):
    assert line in lines
  assert "lib/optim.py" in out.stdout and "Exit codes:" in out.stdout


def test_convert_names_a_truncated_safetensors_file(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  src = tmp_path / "hf"
  src.mkdir()
  (src / "config.json").write_text(json.dumps(dict(   # a tiny BERT: the model inits in no time
      model_type="bert", architectures=["BertModel"], vocab_size=64, hidden_size=16,
      num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
      max_position_embeddings=32)))
  save_file({"embeddings.word_embeddings.weight": np.ones((64, 16), np.float32)},
            str(src / "model.safetensors"))
  (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-64])
  out = _run(CONVERT, "--to=ours", f"--src={src}", f"--dst={tmp_path / 'out'}")
  _assert_user_error(out, f"{src / 'model.safetensors'}: truncated or corrupt safetensors file")


def test_convert_to_hf_of_a_hf_directory(tmp_path):
  out = _run(CONVERT, "--to=hf", "--src=minilm", f"--dst={tmp_path / 'out'}")
  _assert_user_error(out, "minilm is already a Hugging Face directory (config.json); convert "
                     "--to=hf converts our model dirs and run workdirs")
  assert not os.path.exists(tmp_path / "out")


def test_compilation_cache_default_override_and_off(monkeypatch, tmp_path):
  """cli.run turns JAX's persistent compilation cache on (default place, or the user's
  JAX_COMPILATION_CACHE_DIR; empty = off); benchmarks switch it off."""
  import jax  # pylint: disable=g-import-not-at-top
  before = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    want = os.path.expanduser(cli.COMPILATION_CACHE)
    assert cli.use_compilation_cache() == want == jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
    assert cli.use_compilation_cache() == str(tmp_path) == jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    assert cli.use_compilation_cache() is None and jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
    assert cli.use_compilation_cache(enable=False) is None
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == ""
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(blocked / "cache"))   # cannot be made
    assert cli.use_compilation_cache() is None and jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
