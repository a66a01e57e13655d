"""Checkpoints (orbax): when to save, what to keep, verified resume with fallback, any-mesh restore.

A checkpoint is one orbax composite step directory `<dir>/<step>/` holding
  state/       the train-state pytree (orbax StandardSave: OCDBT + zarr, sharding-agnostic)
  integrity/   JSON: per-leaf dtype, shape and a 64-bit value fingerprint (computed on device)
  data_state/  JSON: the data-iterator state of every process (optional)
  metrics/     JSON: flat {name: float} (optional; used for best-by-metric retention)
Orbax writes into `<step>.orbax-checkpoint-tmp/` and renames it after writing `commit_success.txt`,
so a killed save never looks finished. A finished directory can still be damaged later (copy cut
short, disk full, bit rot): `restore` checks markers, metadata and fingerprints, moves a bad step
aside to `<step>.corrupt-<time>` (never deletes it) with a warning naming the step, and falls back
to the previous complete checkpoint; `restore_best` likewise falls back to the next best step by
the metric, then to the final state. orbax's own failure reports are held back meanwhile (one
warning per bad step instead of a traceback per array read).
"""

import dataclasses
import gc
import inspect
import json
import logging as std_logging
import math
import os
import sys
import time
import traceback
import types
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from lib import distributed, preemption
from lib.tree import flatten as _flatten, path_str  # the one tree-path utility

STATE, INTEGRITY, DATA, METRICS = "state", "integrity", "data_state", "metrics"
# File name inside each JSON item directory, as orbax's JsonCheckpointHandler writes it.
_JSON_FILES = {INTEGRITY: "metadata", DATA: "metadata", METRICS: "metrics"}
_COMMIT = "commit_success.txt"  # orbax writes it last, just before the rename that finalises a step
_STEP_METADATA = "_CHECKPOINT_METADATA"
_FORMAT = 1

PathLike = Union[str, os.PathLike, epath.Path]


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's INFO chatter (dozens of lines per save); its warnings and errors still show.
  Our own checkpoint log lines say what was saved and restored."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


std_logging.getLogger("absl").addFilter(_QuietOrbax())


class _HeldBack(std_logging.Filter):
  """Holds back orbax/tensorstore/asyncio failure reports while one checkpoint step is read.

  A damaged step makes every pending array read report its own failure, as log records and as
  'Exception ignored in <coroutine>' / 'Event loop is closed' tracebacks (`sys.unraisablehook`):
  thousands of lines around the one warning that names the step. Inside `with _HeldBack() as
  held:` those reports are kept; on leaving, they are discarded and counted in `held.count` if
  `held.drop` was set (the read failed, and our warning says why), else replayed as they came.
  """

  _PATHS = ("/orbax/", "/tensorstore/", "/asyncio/")
  _NAMES = ("orbax", "asyncio", "tensorstore")
  _LOGGERS = ("absl",) + _NAMES  # orbax logs through absl

  def __init__(self):
    super().__init__()
    self.drop, self.count = False, 0
    self._records, self._unraisables, self._ids = [], [], set()
    self._targets, self._previous_hook = [], None

  def _is_noise(self, name: str, paths: Sequence[str]) -> bool:
    return name.split(".")[0] in self._NAMES or any(p in f for f in paths for p in self._PATHS)

  def filter(self, record) -> bool:
    paths = [record.pathname]
    if record.exc_info and record.exc_info[2] is not None:  # e.g. concurrent.futures callbacks
      paths += [f.filename for f in traceback.extract_tb(record.exc_info[2])]
    if not self._is_noise(record.name, paths):
      return True
    if id(record) not in self._ids:  # a record passes a filter on every handler it reaches
      self._ids.add(id(record))
      self._records.append(record)
    return False

  def _hook(self, unraisable) -> None:
    paths = [f.filename for f in traceback.extract_tb(unraisable.exc_traceback)]
    if inspect.iscoroutine(unraisable.object):
      paths.append(unraisable.object.cr_code.co_filename)
    if self._is_noise("", paths):
      self._unraisables.append(unraisable)
    else:
      self._previous_hook(unraisable)

  def __enter__(self) -> "_HeldBack":
    handlers = std_logging.getLogger().handlers
    self._targets = [std_logging.getLogger(n) for n in self._LOGGERS] + list(handlers)
    for target in self._targets:
      target.addFilter(self)
    self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._hook
    return self

  @staticmethod
  def _abandoned() -> list:
    """orbax coroutines still suspended (`type(o) is`, not isinstance: isinstance reads
    `__class__`, which wakes deprecation warnings on lazy module attributes)."""
    return [o for o in gc.get_objects() if type(o) is types.CoroutineType and
            o.cr_frame is not None and "/orbax/" in o.cr_code.co_filename]

  def _settle(self, timeout_s: float = 5.0) -> None:
    """Waits (bounded) until the reads orbax abandoned are finished and collected, then closes
    the ones still suspended, so that they report now (held) rather than at some later collection.

    After one array read fails, orbax closes its event loop with the other reads still running
    in threads; they report when they end and are collected, often seconds later or at exit.
    """
    deadline = time.monotonic() + timeout_s
    while True:
      gc.collect()
      live = self._abandoned()
      if not live or time.monotonic() > deadline:
        break
      del live
      time.sleep(0.05)
    for coroutine in live:
      if coroutine.cr_running:
        continue
      try:
        coroutine.close()
      except BaseException as e:  # pylint: disable=broad-except  # the very report being held
        self._unraisables.append(e)
    del live
    gc.collect()

  def __exit__(self, *exc) -> None:
    if self.drop:
      self._settle()  # so that the abandoned reads report while held
    for target in self._targets:
      target.removeFilter(self)
    sys.unraisablehook = self._previous_hook
    if self.drop:
      self.count = len(self._records) + len(self._unraisables)
      _LateReports.install()  # a read still running in a thread may report after we leave
    else:
      for record in self._records:
        std_logging.getLogger(record.name).handle(record)
      for unraisable in self._unraisables:
        sys.unraisablehook(unraisable)
    self._records, self._unraisables, self._ids = [], [], set()


class _LateReports(std_logging.Filter):
  """Installed process-wide once a damaged step was read: drops the reports of orbax reads that
  finish after `_HeldBack` left (a slow machine), which are
  - 'Exception ignored in <orbax coroutine>' (`sys.unraisablehook`), and
  - 'Task exception was never retrieved' (the `asyncio` logger, when the abandoned task of an
    orbax coroutine is collected).
  Every other report goes where it went before."""

  previous = None

  @classmethod
  def install(cls) -> None:
    if cls.previous is None:
      cls.previous, sys.unraisablehook = sys.unraisablehook, cls.hook
      std_logging.getLogger("asyncio").addFilter(cls())

  @classmethod
  def hook(cls, unraisable) -> None:
    obj = unraisable.object
    if not (type(obj) is types.CoroutineType and "/orbax/" in obj.cr_code.co_filename):
      cls.previous(unraisable)

  def filter(self, record) -> bool:
    if record.exc_info and record.exc_info[2] is not None:
      if any("/orbax/" in f.filename for f in traceback.extract_tb(record.exc_info[2])):
        return False
    return "/orbax/" not in record.getMessage()


class CorruptCheckpointError(RuntimeError):
  """A checkpoint directory exists but cannot be trusted (half-written, truncated, altered)."""


# -------------------------------------------------------------------------------------------- paths
def _read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


# ------------------------------------------------------------------------------- value fingerprints
_M1, _M2, _M3 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)


def _bits_u32(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32 (64-bit dtypes gain a trailing axis of 2 words)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([x.real, x.imag], axis=-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize * 8
  if width == 64:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}")).astype(jnp.uint32)


def _leaf_fingerprint(x) -> jax.Array:
  """Two uint32 sums of mixed bits, one position-weighted.

  Exact integer arithmetic, so any sharding or reduction order gives the same answer; positions come
  from iotas rather than a reshape, which would move shards between devices.
  """
  bits = _bits_u32(jnp.asarray(x))
  pos = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
    pos = pos + iota * np.uint32(stride % 2**32)
    stride *= bits.shape[axis]
  h = bits * _M1
  h = (h ^ (h >> 15)) * _M2
  h = h ^ (h >> 13)
  weighted = h * (pos * _M3 + np.uint32(1))
  return jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32)])


_tree_fingerprints = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprints(tree) -> dict:
  """{path: {'dtype', 'shape', 'fp': [u32, u32]}} per leaf, computed on device (a collective)."""
  flat = _flatten(tree)
  groups: dict = {}  # one jit per device set: one call cannot mix arrays committed to other devices
  for path, leaf in flat.items():
    devices = None
    if isinstance(leaf, jax.Array):
      devices = frozenset(d.id for d in leaf.sharding.device_set)
    groups.setdefault(devices, {})[path] = leaf
  flat_fps = {}
  for group in groups.values():
    flat_fps.update(jax.device_get(_tree_fingerprints(group)))
  out = {}
  for path, leaf in flat.items():
    # Python scalars: the dtype jit gives them.
    dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.asarray(leaf).dtype
    out[path] = {"dtype": str(dtype), "shape": list(np.shape(leaf)),
                 "fp": [int(v) for v in flat_fps[path]]}
  return out


def _integrity_mismatches(tree, record: dict) -> tuple[list, int]:
  """Paths of `tree` whose fingerprint differs from the one `record` holds for the same path.

  Returns (mismatched paths, number of leaves not comparable: absent from the record, or restored
  with another dtype/shape than saved, e.g. a deliberate bf16 -> f32 restore).
  """
  saved_leaves = record.get("leaves", {})
  bad, unchecked = [], 0
  for path, info in fingerprints(tree).items():
    saved = saved_leaves.get(path)
    if saved is None or saved["dtype"] != info["dtype"] or saved["shape"] != info["shape"]:
      unchecked += 1
    elif saved["fp"] != info["fp"]:
      bad.append(path)
  return bad, unchecked


# ---------------------------------------------------------------------------- step-directory checks
def invalid_reason(step_dir: PathLike) -> Optional[str]:
  """Why `step_dir` is not a complete checkpoint of ours, or None if markers and metadata are sound.

  Cheap file-level checks only (no array data is read): the commit marker orbax writes last, the
  step metadata with its commit timestamp, every recorded item with its own commit marker, and
  parseable JSON for the tree metadata and our JSON items. Values are checked at restore time,
  against the fingerprints.
  """
  step_dir = epath.Path(step_dir)
  if not (step_dir / _COMMIT).exists():
    return f"no {_COMMIT} (the save never finished)"
  try:
    meta = _read_json(step_dir / _STEP_METADATA)
  except (OSError, ValueError) as e:
    return f"unreadable {_STEP_METADATA}: {type(e).__name__}: {e}"
  if not isinstance(meta, dict) or not meta.get("commit_timestamp_nsecs"):
    return f"{_STEP_METADATA} has no commit timestamp"
  items = sorted(meta.get("item_handlers") or {})
  if STATE not in items or INTEGRITY not in items:
    return f"items {items}: expected at least {STATE!r} and {INTEGRITY!r}"
  for item in items:
    if not (step_dir / item / _COMMIT).exists():
      return f"item {item!r} is missing or has no {_COMMIT}"
  files = [step_dir / STATE / "_METADATA"]
  files += [step_dir / item / name for item, name in _JSON_FILES.items() if item in items]
  for path in files:
    try:
      _read_json(path)
    except (OSError, ValueError) as e:
      return f"unreadable {path.relative_to(step_dir)}: {type(e).__name__}: {e}"
  return None


def _step_dirs(directory: epath.Path) -> dict:
  """{step: path} of finished-looking step directories (plain integer names)."""
  if not directory.exists():
    return {}
  return {int(p.name): p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()}


def _quarantine(step_dir: epath.Path) -> epath.Path:
  """Renames a bad step out of orbax's sight (name no longer parses as a step); keeps the bytes."""
  stem = f"{step_dir.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
  target, n = step_dir.parent / stem, 0
  while target.exists():
    n += 1
    target = step_dir.parent / f"{stem}-{n}"
  step_dir.rename(target)
  return target


def _saved_metrics(step_dir: epath.Path) -> Optional[dict]:
  """The metrics item of a step directory: {} when it has none, None when it is unreadable."""
  path = step_dir / METRICS / _JSON_FILES[METRICS]
  if not path.exists():
    return {}
  try:
    metrics = _read_json(path)
  except (OSError, ValueError):
    return None
  return metrics if isinstance(metrics, dict) else None


def _orbax_error(e: Exception) -> str:
  """'TypeName: first line' of an orbax/tensorstore exception, without its page of TensorStore
  spec."""
  lines = str(e).splitlines()
  first = lines[0].split(" See full TensorStore details")[0] if lines else ""
  return f"{type(e).__name__}: {first[:300]}"


def _sync(name: str) -> None:
  """Barrier across processes (no-op for one): after process 0 changed the directory listing."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.array([int(bool(flag))], np.int32))))


# ---------------------------------------------------------------------------------------- retention
def _metric_value(metrics: Optional[dict], name: Optional[str]) -> Optional[float]:
  """The finite value of metric `name`, or None (absent, not a number, NaN/inf: never 'best')."""
  if name is None or not isinstance(metrics, dict) or name not in metrics:
    return None
  try:
    value = float(metrics[name])
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def _best_position(metrics_in_step_order: Sequence[Optional[dict]], name: Optional[str],
                   mode: str) -> Optional[int]:
  """Index of the best checkpoint; on ties the earliest wins (a later one must strictly improve)."""
  best, best_value = None, None
  for i, metrics in enumerate(metrics_in_step_order):
    value = _metric_value(metrics, name)
    if value is None:
      continue
    if best_value is None or (value > best_value if mode == "max" else value < best_value):
      best, best_value = i, value
  return best


@dataclasses.dataclass
class _KeepLatestAndBest:
  """orbax PreservationPolicy: the `keep` highest steps plus the single best-by-metric step."""

  keep: int
  metric: Optional[str]
  mode: str

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any = None) -> Sequence[bool]:
    order = sorted(range(len(checkpoints)), key=lambda i: checkpoints[i].step)
    preserve = [False] * len(checkpoints)
    for i in order[-self.keep:]:
      preserve[i] = True
    best = _best_position([checkpoints[i].metrics for i in order], self.metric, self.mode)
    if best is not None:
      preserve[order[best]] = True
    return preserve


# ---------------------------------------------------------------------------------- item conversion
def _clean_metrics(metrics: Optional[dict], step: int) -> Optional[dict]:
  """{name: float} from numeric scalars / 0-d arrays.

  Other entries (reports, arrays) are left out of the checkpoint with a warning rather than failing
  a save hours into a run.
  """
  if metrics is None:
    return None
  out, skipped = {}, []
  for name, value in metrics.items():
    try:
      out[str(name)] = float(np.asarray(value)) if np.ndim(value) == 0 else None
    except (TypeError, ValueError):
      out[str(name)] = None
    if out[str(name)] is None:
      del out[str(name)]
      skipped.append(str(name))
  if skipped:
    logging.warning("checkpoint step %d: %d non-scalar metrics not stored with it: %s", step,
                    len(skipped), skipped)
  return out


def _pack_data_state(data_state: dict) -> dict:
  """JSON item holding every process's iterator state (each host reads its own shard of data)."""
  try:
    text = json.dumps(data_state, sort_keys=True)
  except (TypeError, ValueError) as e:
    raise ValueError(f"checkpoint data_state: not JSON-serialisable ({e}); encode bytes e.g. as "
                     "base64 text") from e
  texts = [text] if jax.process_count() == 1 else distributed.allgather_text(text)
  return {"format": _FORMAT, "per_process": [json.loads(t) for t in texts]}


def _unpack_data_state(packed: Optional[dict], step: int) -> Optional[dict]:
  """This process's iterator state; None (warned) if the process count changed and states differ."""
  if packed is None:
    return None
  per_process = packed["per_process"]
  if len(per_process) == jax.process_count():
    return per_process[jax.process_index()]
  if all(s == per_process[0] for s in per_process):
    return per_process[0]
  logging.warning("checkpoint step %d: data-iterator state was saved by %d processes, this run has "
                  "%d and the states differ; not restoring it (the data order restarts)", step,
                  len(per_process), jax.process_count())
  return None


# ------------------------------------------------------------------------------- target tree checks
def _saved_shapes(state_dir: epath.Path) -> dict:
  """{path: shape} of the arrays saved in a pytree directory, from orbax's tree metadata."""
  tree = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {path_str(p): tuple(leaf.shape) for p, leaf in leaves}


def _check_target(saved: dict, abstract, where: str, *, allow_unused: bool) -> None:
  """Raises ValueError naming the paths where target and checkpoint disagree (a caller bug)."""
  wanted = {p: tuple(np.shape(leaf)) for p, leaf in _flatten(abstract).items()}
  missing = sorted(set(wanted) - set(saved))
  unused = sorted(set(saved) - set(wanted))
  shapes = [f"{p}: checkpoint {saved[p]}, target {wanted[p]}" for p in sorted(wanted) if p in saved
            and saved[p] != wanted[p]]
  problems = []
  if missing:
    problems.append(f"{len(missing)} target leaves not in the checkpoint, e.g. {missing[:5]}")
  if unused and not allow_unused:
    problems.append(f"{len(unused)} checkpoint leaves not in the target, e.g. {unused[:5]}")
  if shapes:
    problems.append(f"{len(shapes)} shape mismatches, e.g. {'; '.join(shapes[:5])}")
  if problems:
    raise ValueError(f"{where}: checkpoint does not match the target tree: " + " | ".join(problems))
  if unused:
    logging.warning("%s: %d checkpoint leaves not restored (not in the target), e.g. %s", where,
                    len(unused), unused[:5])


def _with_shardings(abstract):
  """Target leaves must say where data goes; single-process runs default to device 0 (logged)."""
  unplaced = [p for p, leaf in _flatten(abstract).items()
              if getattr(leaf, "sharding", None) is None]
  if not unplaced:
    return abstract
  if jax.process_count() > 1:
    raise ValueError(f"restore target: {len(unplaced)} leaves have no sharding (e.g. "
                     f"{unplaced[:3]}); pass jax.ShapeDtypeStruct leaves with .sharding set")
  logging.info("restore target: %d leaves without sharding placed on %s, e.g. %s", len(unplaced),
               jax.devices()[0], unplaced[:3])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def place(leaf):
    if getattr(leaf, "sharding", None) is not None:
      return leaf
    dtype = getattr(leaf, "dtype", None) or jnp.asarray(leaf).dtype
    return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=device)
  return jax.tree.map(place, abstract)


# ------------------------------------------------------------------------------------- checkpointer
def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Explicit handlers, so a fresh process can read metadata and restore before any save."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  state_handler = ocp.handlers.StandardCheckpointHandler()
  registry.add(STATE, ocp.args.StandardSave, state_handler)
  registry.add(STATE, ocp.args.StandardRestore, state_handler)
  for item in (INTEGRITY, DATA):
    json_handler = ocp.handlers.JsonCheckpointHandler()  # writes on the primary host (process 0)
    registry.add(item, ocp.args.JsonSave, json_handler)
    registry.add(item, ocp.args.JsonRestore, json_handler)
  return registry  # METRICS: CheckpointManager registers its own JSON handler under that name.


def _as_path(directory: PathLike) -> epath.Path:
  text = os.fspath(directory)
  return epath.Path(text if "://" in text else os.path.abspath(text))


class Checkpointer:
  """Owns one run's checkpoint directory: when to save, what to keep, what is safe to restore.

  All processes construct it and call `save`/`restore` together (orbax saves are collective);
  JSON items and directory housekeeping are written by process 0.
  """

  def __init__(self, directory: PathLike, *, keep: int = 2, best_metric: Optional[str] = None,
               best_mode: str = "max", save_every: int = 0, async_save: bool = True):
    """Opens (creating if needed) a checkpoint directory; moves aside damaged steps found in it.

    Args:
      directory: where step directories live (local path, or a URL orbax understands).
      keep: number of most recent checkpoints kept (>= 1).
      best_metric: metric whose best checkpoint is also kept (never deleted while best).
      best_mode: 'max' or 'min' for `best_metric`.
      save_every: a non-forced `save` writes when step % save_every == 0 (0: forced saves only).
      async_save: write in a background thread after the device->host copy.
    """
    if keep < 1:
      raise ValueError(f"Checkpointer(keep={keep}): expected >= 1")
    if best_mode not in ("max", "min"):
      raise ValueError(f"Checkpointer(best_mode={best_mode!r}): expected 'max' or 'min'")
    if save_every < 0:
      raise ValueError(f"Checkpointer(save_every={save_every}): expected >= 0")
    self.directory = _as_path(directory)
    self.keep, self.best_metric, self.best_mode = keep, best_metric, best_mode
    self.save_every = save_every
    self._metrics_cache: dict = {}
    self._preemption: Optional[preemption.PreemptionHandler] = None
    self._opened_aside: list = []  # (step, reason, moved to, saved metrics) found damaged on open
    if jax.process_index() == 0:
      self._scan_directory()
    _sync("checkpoint:scan")
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_KeepLatestAndBest(keep, best_metric, best_mode),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=_handler_registry())

  def _scan_directory(self) -> None:
    """Warns about half-written saves (orbax deletes them); moves aside damaged finished steps."""
    if not self.directory.exists():
      return
    for path in self.directory.iterdir():
      if ".orbax-checkpoint-tmp" in path.name:
        logging.warning("checkpoint %s: half-written save of step %s (interrupted); ignored and "
                        "removed", path, path.name.split(".")[0])
    for step, path in sorted(_step_dirs(self.directory).items()):
      reason = invalid_reason(path)
      if reason is not None:
        metrics = _saved_metrics(path)
        moved = _quarantine(path)
        self._opened_aside.append((step, reason, moved.name, metrics))
        logging.warning("checkpoint step %d in %s is incomplete or corrupted (%s); moved to %s and "
                        "not used", step, self.directory, reason, moved.name)

  # -- queries
  def all_steps(self) -> list:
    """Steps with a checkpoint (including one still being written asynchronously), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def _metrics(self, step: int) -> Optional[dict]:
    if step not in self._metrics_cache:
      self._metrics_cache[step] = self._manager.metrics(step)
    return self._metrics_cache[step]

  def best_step(self) -> Optional[int]:
    """Step with the best `best_metric` (ties: the earliest); None if off or never measured."""
    steps = self.all_steps()
    best = _best_position([self._metrics(s) for s in steps], self.best_metric, self.best_mode)
    return None if best is None else steps[best]

  def should_save(self, step: int) -> bool:
    """Whether a non-forced `save` at `step` writes (the `save_every` schedule)."""
    return self.save_every > 0 and step % self.save_every == 0

  # -- saving
  def save(self, step: int, state, *, data_state: Union[dict, Callable[[], dict], None] = None,
           metrics: Optional[dict] = None, force: bool = False) -> bool:
    """Saves `state` (+ data-iterator state, metrics) as checkpoint `step` if due (all processes).

    Args:
      step: number of completed training steps the state reflects.
      state: pytree of jax arrays (e.g. a TrainState); sharded arrays are written shard by shard.
      data_state: JSON-serialisable iterator state to resume the data stream exactly, or a
        zero-argument callable returning it (only called when a save happens).
      metrics: flat {name: scalar}; with `best_metric` among them the step competes for best.
      force: save regardless of `save_every` (final step, preemption).

    Returns:
      True if a save was started; async saves commit later (`wait()`/`close()` before exiting).

    Raises:
      ValueError: `step` is below the latest checkpoint (a fork of the run's history), or
        `data_state` is not JSON-serialisable.
    """
    step = int(step)
    if not force and not self.should_save(step):
      return False
    latest = self.latest_step()
    if latest is not None and step <= latest:
      if step == latest:
        logging.info("checkpoint step %d already saved; not saving it again", step)
        return False
      raise ValueError(f"checkpoint save at step {step} but {self.directory} already has step "
                       f"{latest}: use a fresh directory to branch a run")
    metrics = _clean_metrics(metrics, step)
    record = {"format": _FORMAT, "leaves": fingerprints(state)}
    items = {STATE: ocp.args.StandardSave(state), INTEGRITY: ocp.args.JsonSave(record)}
    data_state = data_state() if callable(data_state) else data_state
    if data_state is not None:
      items[DATA] = ocp.args.JsonSave(_pack_data_state(data_state))
    if metrics is not None:
      items[METRICS] = ocp.args.JsonSave(metrics)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    if saved:
      self._metrics_cache[step] = metrics
      logging.info("checkpoint step %d -> %s %s", step, self.directory, metrics or "")
    return bool(saved)

  def wait(self) -> None:
    """Blocks until the last asynchronous save is committed (renamed into place)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, releases orbax resources, restores previous signal handlers."""
    self.wait()
    self._manager.close()
    self.uninstall_preemption_handler()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- preemption
  def install_preemption_handler(self) -> preemption.PreemptionHandler:
    """Installs SIGTERM/SIGINT handling (see `lib.preemption.PreemptionHandler`); `close()` uninstalls it."""
    if self._preemption is None:
      self._preemption = preemption.install_preemption_handler()
    return self._preemption

  def uninstall_preemption_handler(self) -> None:
    """Restores the signal handlers that `install_preemption_handler` replaced (if it did)."""
    if self._preemption is not None:
      self._preemption.uninstall()
      self._preemption = None

  def preempted(self, step: Optional[int] = None) -> bool:
    """True when the loop should save (force=True), close and exit; False without a handler.

    Multi-process runs must pass `step` on every process at every step (see PreemptionHandler).
    """
    return self._preemption is not None and self._preemption.preempted(step)

  # -- restoring
  def restore(self, abstract_state, step: Optional[int] = None):
    """Restores onto the shardings of `abstract_state`, whatever mesh or device count saved it.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct (with .sharding) like the saved state.
      step: a specific step (damage raises), or None for the latest complete checkpoint: a bad
        one is moved aside with a warning naming its step, and the previous one is tried.

    Returns:
      (state, data_state, metrics), or None when there is no (complete) checkpoint.

    Raises:
      ValueError: `abstract_state` does not match the checkpoint (paths and shapes named).
      CorruptCheckpointError: the requested `step` is damaged.
    """
    self.wait()
    abstract_state = _with_shardings(abstract_state)
    if step is not None:
      if step not in self.all_steps():
        raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                                f"(have {self.all_steps()})")
      result, reason = self._try_restore(step, abstract_state)
      if reason is not None:
        raise CorruptCheckpointError(f"{self.directory / str(step)}: {reason}")
      return result
    for candidate in reversed(self.all_steps()):
      result, reason = self._try_restore(candidate, abstract_state)
      if reason is None:
        return result
      self._set_aside(candidate, reason, "falling back to the previous complete checkpoint")
    return None

  def restore_best(self, final_state, final_step: int, abstract_state=None):
    """The state of the best checkpoint by `best_metric`, falling back past damaged ones.

    A best step that fails its checks or its read is moved aside (as `restore` does with the
    latest) with one warning naming it, and the next best by the metric is tried. The in-memory
    `final_state` is used, without reading, where the final step ranks, and when nothing remains.
    Better-ranked steps this Checkpointer set aside when it opened the directory are in the note.

    Args:
      final_state: the state at the end of training (e.g. the fit loop's result).
      final_step: its step.
      abstract_state: restore target; by default `final_state`'s shapes, dtypes and shardings.

    Returns:
      (state, step, note): `note` is None, or one line naming the steps set aside, why, and the
      step used instead; also the final state and step when no step has the metric.

    Raises:
      ValueError: the target does not match the checkpoints (a caller bug, not damage).
    """
    self.wait()
    ranked, damaged = self._ranked_steps(), []
    state, used = final_state, int(final_step)
    if ranked and ranked[0] != used:
      abstract_state = _with_shardings(abstract_state if abstract_state is not None else
                                       jax.tree.map(_abstract_leaf, final_state))
    for step in ranked:
      if step == used:  # the final state ranks here: it is in memory
        break
      logging.info("restoring the best checkpoint by %s: step %d", self.best_metric, step)
      result, reason = self._try_restore(step, abstract_state)
      if reason is None:
        state, used = result[0], step
        break
      moved = self._set_aside(step, reason, f"trying the next best by {self.best_metric}")
      damaged.append((step, reason, moved))
    damaged = self._aside_on_open(used) + damaged
    note = self._fallback_note(damaged, used, final=state is final_state)
    if note:
      logging.info("%s", note)
    return state, used, note

  def _rank_key(self, value: float, step: int) -> tuple:
    """Sort key putting the best `best_metric` first, ties to the earlier step (as `best_step`)."""
    return (-value if self.best_mode == "max" else value, step)

  def _ranked_steps(self) -> list:
    """Steps with a finite `best_metric`, best first."""
    scored = [(_metric_value(self._metrics(s), self.best_metric), s) for s in self.all_steps()]
    return [s for _, s in sorted((self._rank_key(v, s), s) for v, s in scored if v is not None)]

  def _aside_on_open(self, used: int) -> list:
    """(step, reason, moved) of the steps set aside on opening that could have ranked before
    `used`: their saved metric beats it, or their metrics could not be read."""
    value_used = None
    if used in self.all_steps():
      value_used = _metric_value(self._metrics(used), self.best_metric)
    out = []
    for step, reason, moved, metrics in self._opened_aside:
      value = _metric_value(metrics, self.best_metric)
      if metrics is None or (value is not None and (
          value_used is None or self._rank_key(value, step) < self._rank_key(value_used, used))):
        out.append((step, reason, moved))
    return out

  def _fallback_note(self, damaged: list, used: int, final: bool) -> Optional[str]:
    """The one-line account of a best-checkpoint fallback (None when the best was used)."""
    if not damaged:
      return None
    many = len(damaged) > 1
    steps = ", ".join(str(s) for s, _, _ in damaged)
    why = "; ".join(f"{s}: {r[:200]}" if many else r[:200] for s, r, _ in damaged)
    moved = ", ".join(m for _, _, m in damaged)
    note = (f"best step{'s' * many} {steps} by {self.best_metric} could not be restored ({why}) "
            f"and {'were' if many else 'was'} set aside as {moved}; using step {used}")
    if not final:
      return note + f" (next best by {self.best_metric})"
    if used in self._ranked_steps():
      return note + f" (the final state, next best by {self.best_metric})"
    return note + f" (the final state: no other checkpoint with {self.best_metric} remained)"

  def _set_aside(self, step: int, reason: str, then: str) -> str:
    """Moves a bad step out of the way (process 0), so the run can save that step again; warns.

    Returns the name it was moved to; `then` says what happens next, for the warning.
    """
    moved = "<step>.corrupt-*"
    if jax.process_index() == 0:
      moved = _quarantine(self.directory / str(step)).name
    logging.warning("checkpoint step %d in %s is corrupted (%s); moved to %s; %s", step,
                    self.directory, reason, moved, then)
    _sync(f"checkpoint:set_aside:{step}")
    self._manager.reload()
    self._metrics_cache.pop(step, None)
    return moved

  def _try_restore(self, step: int, abstract_state):
    """(result, None) of a verified restore, or (None, reason) with orbax's reports held back."""
    with _HeldBack() as held:
      try:
        return self._restore_step(step, abstract_state), None
      except CorruptCheckpointError as e:
        held.drop, reason = True, str(e)
    if held.count:
      reason += f" [{held.count} orbax/tensorstore failure reports about it not shown]"
    return None, reason

  def _restore_step(self, step: int, abstract_state):
    """One verified restore; CorruptCheckpointError (agreed by all processes) if untrustworthy."""
    step_dir = self.directory / str(step)
    reason = invalid_reason(step_dir)
    if reason is None:
      try:
        saved = _saved_shapes(step_dir / STATE)
      except Exception as e:  # pylint: disable=broad-except  # unreadable metadata = damaged step
        reason = f"unreadable tree metadata: {_orbax_error(e)}"
    if _any_process(reason is not None):
      raise CorruptCheckpointError(reason or "another process could not read it")
    _check_target(saved, abstract_state, f"{step_dir}/{STATE}", allow_unused=False)
    result, reason = self._read_and_verify(step, step_dir, abstract_state)
    if _any_process(reason is not None):
      raise CorruptCheckpointError(reason or "another process could not read it")
    return result

  def _read_and_verify(self, step: int, step_dir: epath.Path, abstract_state):
    """Reads all items and compares value fingerprints: (result, None) or (None, reason)."""
    items = {STATE: ocp.args.StandardRestore(abstract_state), INTEGRITY: ocp.args.JsonRestore()}
    for name in (DATA, METRICS):
      if (step_dir / name).exists():
        items[name] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  # target mismatches were ruled out above
      return None, f"orbax restore failed: {_orbax_error(e)}"
    if not isinstance(restored[INTEGRITY], dict) or not isinstance(
        restored[INTEGRITY].get("leaves"), dict):
      return None, f"{INTEGRITY} item is not a fingerprint record"
    bad, unchecked = _integrity_mismatches(restored[STATE], restored[INTEGRITY])
    if bad:
      return None, (f"values differ from the save-time fingerprints in {len(bad)} leaves, "
                    f"e.g. {bad[:3]}")
    if unchecked:
      logging.info("checkpoint step %d: %d leaves restored with another dtype/shape than saved, "
                   "not fingerprint-checked", step, unchecked)
    data_state = _unpack_data_state(restored[DATA] if DATA in items else None, step)
    metrics = restored[METRICS] if METRICS in items else None
    logging.info("restored checkpoint step %d from %s", step, self.directory)
    return (restored[STATE], data_state, metrics), None


def _abstract_leaf(x) -> jax.ShapeDtypeStruct:
  """A restore target leaf shaped, typed and placed like the array `x`."""
  dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
  return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=getattr(x, "sharding", None))


# ------------------------------------------------------------------------------ params-only restore
def _resolve_step_dir(path: epath.Path) -> epath.Path:
  """A step directory given itself or a run directory (its latest complete step; read-only)."""
  if (path / STATE).exists() or (path / _STEP_METADATA).exists():
    return path
  for step, step_dir in sorted(_step_dirs(path).items(), reverse=True):
    reason = invalid_reason(step_dir)
    if reason is None:
      return step_dir
    logging.warning("init checkpoint %s: step %d is incomplete or corrupted (%s); trying an "
                    "earlier step", path, step, reason)
  raise FileNotFoundError(f"{path}: no complete checkpoint (expected a step directory, or a run "
                          "directory containing <step>/state)")


def restore_params(directory_or_step_path: PathLike, abstract_params, *, subtree: str = "params"):
  """Restores only `subtree` (e.g. 'params') of another run's saved state: initialising from it.

  Args:
    directory_or_step_path: a run's checkpoint directory (its latest complete step is used) or a
      step directory `<dir>/<step>` written by `Checkpointer`.
    abstract_params: pytree of jax.ShapeDtypeStruct (with .sharding) of the leaves to load; each
      must exist in the checkpoint with the same shape (the dtype may differ: it is cast).
    subtree: '/'-separated path of the params inside the saved state ('' for the whole state).

  Returns:
    The restored pytree, structured like `abstract_params`.

  Raises:
    ValueError: leaves missing from the checkpoint or shaped differently (paths named).
    CorruptCheckpointError: the step fails its completeness checks or value fingerprints.
  """
  step_dir = _resolve_step_dir(_as_path(directory_or_step_path))
  reason = invalid_reason(step_dir)
  if reason is not None:
    raise CorruptCheckpointError(f"{step_dir}: {reason}")
  keys = [k for k in subtree.split("/") if k]
  target = _with_shardings(abstract_params)
  for key in reversed(keys):
    target = {key: target}
  prefix = "/".join(keys) + "/" if keys else ""
  try:
    saved = _saved_shapes(step_dir / STATE)
  except Exception as e:  # pylint: disable=broad-except  # unreadable metadata = damaged step
    raise CorruptCheckpointError(f"{step_dir}: unreadable tree metadata: {_first_line(e)}") from e
  saved = {p: s for p, s in saved.items() if p.startswith(prefix)}
  if not saved:
    raise ValueError(f"{step_dir / STATE}: no saved subtree {subtree!r}")
  _check_target(saved, target, f"{step_dir / STATE}", allow_unused=True)
  args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
      restored = reader.restore(step_dir / STATE, args=args)
  except Exception as e:  # pylint: disable=broad-except  # the target was checked above
    raise CorruptCheckpointError(f"{step_dir}: orbax restore failed: {_first_line(e)}") from e
  record = _read_json(step_dir / INTEGRITY / _JSON_FILES[INTEGRITY])
  bad, _ = _integrity_mismatches(restored, record)
  if bad:
    raise CorruptCheckpointError(f"{step_dir}: values differ from the save-time fingerprints in "
                                 f"{len(bad)} leaves, e.g. {bad[:3]}")
  logging.info("initialised %d leaves of %r from %s", len(_flatten(restored)), subtree, step_dir)
  for key in keys:
    restored = restored[key]
  return restored


Checkpointer.restore_params = staticmethod(restore_params)


def _first_line(e: Exception) -> str:
  """'TypeName: first line of the message' (orbax/tensorstore messages run to pages)."""
  lines = str(e).splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def saved_steps(directory: PathLike) -> list:
  """Steps of a run's checkpoint directory (plain integer names, damaged ones included), ascending.

  Read-only, unlike `Checkpointer` (which sets damaged steps aside and removes half-written ones):
  for reading another run's checkpoints.
  """
  return sorted(_step_dirs(_as_path(directory)))


def best_saved_step(directory: PathLike, metric: str, mode: str = "max") -> Optional[int]:
  """`Checkpointer(directory, best_metric=metric, best_mode=mode).best_step()`, read-only: the
  complete step with the best saved `metric` (ties: the earliest); None if none has it."""
  directory = _as_path(directory)
  steps = [s for s in saved_steps(directory) if invalid_reason(directory / str(s)) is None]
  saved = []
  for step in steps:
    path = directory / str(step) / METRICS / _JSON_FILES[METRICS]
    try:
      saved.append(_read_json(path) if path.exists() else None)
    except (OSError, ValueError):
      saved.append(None)
  best = _best_position(saved, metric, mode)
  return None if best is None else steps[best]
