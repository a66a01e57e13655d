"""The research scripts' entry point: flag parsing, one-line user errors, documented exit codes.

`cli.run(main)` replaces `absl.app.run(main)`. Exit codes of every research/*.py script:

  ====  ======================================================================================
  code  meaning
  ====  ======================================================================================
  0     success (also `--help`)
  1     a bug: any exception other than a user error; its traceback is printed
  2     a user error: a bad flag, config key or value, file, model source or output; printed
        as one line `error: <message>` on stderr (`--debug` or WORKBENCH_DEBUG=1 adds the
        traceback)
  75    preempted (EX_TEMPFAIL): a checkpoint was saved; rerun the same command to resume
  ====  ======================================================================================

So `./run.sh finetune ... && next-step` runs next-step only after a finished run.
"""

import ctypes
import difflib
import os
import platform
import re
import sys
import traceback
from typing import Callable, Optional

from absl import app, flags, logging
from ml_collections import config_dict, config_flags
# is_config_flag is public (documented for external users) but not re-exported by the package.
from ml_collections.config_flags.config_flags import is_config_flag

from lib import errors

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75          # EX_TEMPFAIL (sysexits.h): try again later
DEBUG_ENV = "WORKBENCH_DEBUG"

flags.DEFINE_bool("debug", False, f"print the traceback of user errors too (or set {DEBUG_ENV}=1)")
flags.DEFINE_bool("malloc_tuning", True, "glibc: keep freed memory for reuse (mallopt: no mmap'd "
                  "blocks, no trimming below 2 GiB, one arena), so that XLA's per-step buffers "
                  "are not page-faulted in afresh every step (a MiniLM train step ~20% faster on "
                  "2 cores, peak RSS ~15% higher); --nomalloc_tuning keeps glibc's defaults, and "
                  "so does any MALLOC_* variable in the environment")

_HELP_NAMES = ("help", "helpshort", "helpfull", "?")
CONFIG_DOCS = (
    "What the keys mean: the config file's docstring and comments, and the default_config()\n"
    "docstrings of the sections' owners: lib/optim.py (optim), lib/train.py (train),\n"
    "lib/sharding.py (mesh); shared fields: configs/common.py (finetune_base) and\n"
    "configs/mlm.py (base).")


# XLA executables persist here across runs (JAX's persistent compilation cache): a rerun, another
# seed or a resumed run of the same shapes skips compiling them (a MiniLM train step: ~10 s per
# batch shape on 2 CPU cores; the NER fine-tune compiles ~8 bucket shapes and the eval shapes).
# JAX_COMPILATION_CACHE_DIR overrides the place; set it empty to switch the cache off.
COMPILATION_CACHE = os.path.join("~", ".cache", "workbench", "jax_compilation_cache")


def use_compilation_cache(enable: bool = True) -> Optional[str]:
  """Points JAX's persistent compilation cache at JAX_COMPILATION_CACHE_DIR, by default
  COMPILATION_CACHE; returns the directory, or None when the variable is set empty or
  `enable` is false (off: benchmarks that report compile times)."""
  if not enable:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = ""
  path = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.expanduser(COMPILATION_CACHE))
  if path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:   # e.g. a read-only home: run without the cache rather than fail
      print(f"warning: compilation cache off ({path}: {e.strerror})", file=sys.stderr)
      path = os.environ["JAX_COMPILATION_CACHE_DIR"] = ""
  if "jax" in sys.modules:   # imported already: its config read the variable before we set it
    sys.modules["jax"].config.update("jax_compilation_cache_dir", path or None)
  return path or None


# glibc mallopt parameters (malloc.h) -> value: what `--malloc_tuning` sets. Large blocks come from
# the heap instead of fresh mmap()s (zero-filled pages faulted in on first touch, unmapped on
# free), and freed memory stays with the process.
MALLOPT = (("M_TRIM_THRESHOLD", -1, (1 << 31) - 1), ("M_MMAP_MAX", -4, 0), ("M_ARENA_MAX", -8, 1))


def tune_malloc() -> Optional[str]:
  """Applies MALLOPT through glibc's mallopt(); returns a line saying what it did, or None where
  it did nothing (not glibc, or a MALLOC_* environment variable set by the user)."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  if any(k.startswith("MALLOC_") for k in os.environ):
    return None
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return None
  done = [name for name, param, value in MALLOPT if libc.mallopt(param, value) == 1]
  return f"malloc: glibc mallopt {', '.join(done)} (--nomalloc_tuning: glibc's defaults)"


# The MALLOC_* equivalents of MALLOPT, for benchmarks whose rows have always run under them
# (glibc reads them at start-up: `reexec_with_env`); tune_malloc defers to them.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
              "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def reexec_with_env(env: dict) -> None:
  """Re-executes this process once with `env` added, unless it is already set."""
  if any(os.environ.get(k) != v for k, v in env.items()):
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, **env))


def pin_cpu_threads(n: int, xla_flags: str = "", omp_wait_policy: str = "default") -> None:
  """Pins this process to n cores before jax starts (XLA:CPU sizes its pool from the affinity),
  one XLA host device plus `xla_flags`, and torch to n threads (OMP_WAIT_POLICY unless
  'default': read when torch loads libgomp)."""
  cpus = sorted(os.sched_getaffinity(0))
  if n < len(cpus):
    os.sched_setaffinity(0, cpus[:n])
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")]
      + ["--xla_force_host_platform_device_count=1"] + xla_flags.split())
  if omp_wait_policy != "default":
    os.environ["OMP_WAIT_POLICY"] = omp_wait_policy
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(n)


def run(main: Callable, compilation_cache: bool = True) -> None:
  """Runs `main(argv)` as absl.app.run does, with this module's error handling and exit codes,
  and JAX's persistent compilation cache on unless `compilation_cache` is false
  (`use_compilation_cache`)."""
  if _help_requested(sys.argv):
    print_help(sys.argv)
    sys.exit(EXIT_OK)
  use_compilation_cache(compilation_cache)
  app.run(_guard(main), flags_parser=_parse_flags)


def debug_requested(argv=None) -> bool:
  """--debug (parsed, or present in `argv` before parsing) or WORKBENCH_DEBUG=1."""
  if os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no"):
    return True
  if flags.FLAGS.is_parsed():
    return bool(flags.FLAGS.debug)
  return any(a in ("--debug", "-debug", "--debug=true", "--debug=1") for a in argv or sys.argv)


def one_line(message: str) -> str:
  """A message on one line: its non-empty lines, stripped, joined by '; '."""
  return "; ".join(s.strip() for s in str(message).splitlines() if s.strip())


def exit_user_error(message: str, exc: Optional[BaseException] = None) -> None:
  """Prints `error: <message>` (one line; the traceback first in debug mode) and exits 2."""
  if exc is not None and debug_requested():
    traceback.print_exception(exc)
  sys.stderr.flush()
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _guard(main: Callable) -> Callable:
  """`main` with user errors (UserError, app.UsageError) turned into one line and exit code 2."""
  def guarded(argv):
    if flags.FLAGS.malloc_tuning:
      tuned = tune_malloc()
      if tuned:
        logging.info(tuned)
    try:
      return main(argv)
    except app.UsageError as e:
      exit_user_error(f"{e} (see --help)", e)
    except errors.UserError as e:
      exit_user_error(str(e), e)
  return guarded


# ----------------------------------------------------------------------------- flag parsing

def _parse_flags(argv: list) -> list:
  """absl's flag parsing; a bad flag or config override is a user error (one line, exit 2)."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _flag_error(e)
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for an override of a key the config lacks.
    message = unknown_override_message(argv)
    if message is None:
      raise
    exit_user_error(message, e)
  _check_configs_loaded()
  return rest


def _chain(exc: BaseException) -> list:
  """`exc` and the exceptions it was raised from or during, outermost first."""
  out = []
  while exc is not None and exc not in out:
    out.append(exc)
    exc = exc.__cause__ or exc.__context__
  return out


def _flag_error(e: flags.Error) -> None:
  """Exits: one line (code 2) for a bad flag value, or a config file's own bug (code 1)."""
  user = [x for x in _chain(e) if isinstance(x, errors.UserError)]
  text = str(e)
  if user:   # e.g. an unknown variant: ml_collections wraps the config's error in a traceback
    m = re.match(r"flag (--\S+?=.*?): Error whilst parsing config file", text)
    exit_user_error((f"{m.group(1)}: " if m else "") + str(user[-1]), user[-1])
  if "Error whilst parsing config file" in text:   # the config file itself failed: a bug
    print(f"FATAL Flags parsing error: {text}", file=sys.stderr)
    sys.exit(EXIT_BUG)
  exit_user_error(f"{text} (see --help)", e)


def _config_flags() -> dict:
  """{name: flag} of the ml_collections config flags the script defines."""
  return {name: flags.FLAGS[name] for name in flags.FLAGS
          if is_config_flag(flags.FLAGS[name]) and name == flags.FLAGS[name].name}


def _check_configs_loaded() -> None:
  """ml_collections defers a config file's IOError to first use: report it now, as one line."""
  for name, fl in _config_flags().items():
    if fl.value is None:
      continue
    try:
      getattr(fl.value, "keys")
    except OSError as e:
      path = config_flags.get_config_filename(fl)
      if not os.path.isfile(path):
        exit_user_error(f"--{name}={_config_arg(sys.argv, name)}: no such config file "
                        f"{path!r}", e)
      cause = _chain(e)[-1]
      if isinstance(cause, errors.UserError):
        exit_user_error(f"--{name}: {cause}", cause)
      raise


def _config_arg(argv: list, name: str) -> Optional[str]:
  """The value given to --<name> in argv (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    m = re.match(rf"^-{{1,2}}{re.escape(name)}(=|$)", arg)
    if m and m.group(1) == "=":
      value = arg.split("=", 1)[1]
    elif m and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _overrides(argv: list, name: str) -> list:
  """The key paths of the --<name>.<path>=... overrides in argv."""
  out = []
  for arg in argv:
    m = re.match(rf"^-{{1,2}}(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if m:
      out.append(m.group(1))
    if arg == "--":
      break
  return out


def _abbreviation(key: str) -> str:
  return "".join(part[:1] for part in key.split("_") if part)


def close_matches(key: str, valid) -> list:
  """Keys of `valid` that `key` may have meant: difflib's close matches, else an abbreviation
  ('learning_rate' -> 'lr') or its expansion."""
  valid = sorted(valid)
  found = difflib.get_close_matches(key, valid, n=2, cutoff=0.6)
  return found or [k for k in valid if k == _abbreviation(key) or _abbreviation(k) == key]


def unknown_key_message(cfg, path: str, name: str = "config") -> Optional[str]:
  """Why `path` ('optim.learning_rate') is not a key of `cfg`, or None when it is one.

  The message names the first missing key, lists the valid keys of its section and a close match.
  """
  node, parts = cfg, [re.sub(r"\[.*$", "", p) for p in path.split(".")]
  for i, key in enumerate(parts):
    where = ".".join([name] + parts[:i])
    if not isinstance(node, (config_dict.ConfigDict, dict)):
      return (f"--{name}.{path}: {where} is a {type(node).__name__} value "
              f"({node!r}), not a section with keys")
    if key not in node:
      valid = sorted(node.keys())
      near = close_matches(key, valid)
      hint = f"; did you mean --{where}.{near[0]}?" if near else ""
      if not valid:   # e.g. optim.lr_mult={}: ml_collections sets such a dict as a whole
        hint = f" (it is empty: set it whole, e.g. --{where}=\"{{'{key}': ...}}\")"
      return (f"--{name}.{path}: {where} has no key {key!r}; valid keys of {where}: "
              f"{', '.join(valid) or '(none)'}{hint}")
    node = node[key]
  return None


def unknown_override_message(argv: list) -> Optional[str]:
  """The first --config.<path> override of argv that names no key of its config, explained."""
  for name, fl in _config_flags().items():
    source = _config_arg(argv, name)
    paths = _overrides(argv, name)
    if source is None or not paths:
      continue
    try:
      cfg = fl.parser.parse(source)
    except Exception:   # pylint: disable=broad-except  # the original error is re-raised instead
      return None
    for path in paths:
      message = unknown_key_message(cfg, path, name)
      if message:
        return message
  return None


# ----------------------------------------------------------------------------- help

def _help_requested(argv: list) -> bool:
  for arg in argv[1:]:
    if arg == "--":
      return False
    name, _, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name in _HELP_NAMES and value.lower() not in ("false", "0"):
      return True
  return False


def _flatten(cfg, prefix: str = "") -> list:
  """[(dotted key, value)] of a ConfigDict's leaves (an empty section is a leaf)."""
  out = []
  for key, value in cfg.items():
    if isinstance(value, config_dict.ConfigDict) and len(value):
      out.extend(_flatten(value, f"{prefix}{key}."))
    else:
      out.append((f"{prefix}{key}", value))
  return out


def config_keys_text(cfg, name: str = "config", width: int = 96) -> str:
  """Every key of `cfg` with its value, one per line, as `--<name>.<key>` overrides it."""
  lines = []
  for key, value in _flatten(cfg):
    text = repr(value.to_dict() if isinstance(value, config_dict.ConfigDict) else value)
    line = f"  {name}.{key} = {text}"
    lines.append(line if len(line) <= width else line[:width - 3] + "...")
  return "\n".join(lines)


def print_help(argv: list) -> None:
  """The script's docstring and flags (as --help), then its config keys and where they are
  documented. The config is loaded when --config is among argv."""
  full = any(a.lstrip("-").startswith("helpfull") for a in argv[1:])
  rest = [a for a in argv if not (a.startswith("-") and
                                  a.lstrip("-").partition("=")[0] in _HELP_NAMES)]
  configs = _config_flags()
  if configs:
    try:
      flags.FLAGS(rest)
    except Exception:   # pylint: disable=broad-except  # help is printed whatever the flags say
      pass
  app.usage(shorthelp=not full, writeto_stdout=True)
  for name, fl in configs.items():
    cfg = fl.value
    if isinstance(cfg, config_dict.ConfigDict):
      print(f"\nKeys of --{name}={_config_arg(argv, name)} and their values (override any "
            f"with --{name}.<key>=<value>):\n{config_keys_text(cfg, name)}")
    else:
      print(f"\n--{name} keys: add --{name}=<file>[:variant] to --help to list every key of "
            "that config with its value.")
  if configs:
    print("\n" + CONFIG_DOCS)
  print("\nExit codes: 0 ok, 1 bug (traceback), 2 user error (one line 'error: ...'; --debug "
        f"adds the\ntraceback), {EXIT_PREEMPTED} preempted (rerun the same command to resume).")
  if not full:
    print("Try --helpfull to get a list of all flags.")


def preempted() -> int:
  """Tells the user that the run stopped early and how to resume; returns EXIT_PREEMPTED (75) for
  `main` to return."""
  print(f"preempted: the state is checkpointed; rerun the same command to resume (exit code "
        f"{EXIT_PREEMPTED})", file=sys.stderr, flush=True)
  return EXIT_PREEMPTED
