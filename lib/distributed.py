"""Multi-host start-up: jax.distributed from arguments, WORKBENCH_* variables or the cluster."""

import json
import os
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

# Read when the corresponding argument is None (scripts pass their flags as arguments).
ENV_COORDINATOR = "WORKBENCH_COORDINATOR"  # "host:port" of process 0
ENV_NUM_PROCESSES = "WORKBENCH_NUM_PROCESSES"
ENV_PROCESS_ID = "WORKBENCH_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "WORKBENCH_LOCAL_DEVICE_IDS"  # comma-separated, e.g. "0,1"

_initialized = False


def _env_int(name: str) -> Optional[int]:
  """Reads an integer environment variable; None when unset or empty."""
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def _env_device_ids() -> Optional[list]:
  value = os.environ.get(ENV_LOCAL_DEVICE_IDS, "").strip()
  if not value:
    return None
  try:
    return [int(v) for v in value.split(",")]
  except ValueError:
    raise ValueError(f"environment variable {ENV_LOCAL_DEVICE_IDS}={value!r}: expected "
                     "comma-separated integers such as '0,1'") from None


def detected_cluster() -> Optional[str]:
  """Names the multi-process cluster environment jax can auto-configure from, or None.

  Only environments that announce more than one process count, so a single-process job on
  SLURM or a single TPU VM stays a plain single-process run. GCE TPU pods that expose their
  topology only through the metadata server are not detected: pass arguments or WORKBENCH_* there.
  """
  env = os.environ
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "ompi"
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  multi_host_tpu = len([h for h in hosts.split(",") if h.strip()]) > 1
  if multi_host_tpu or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Union[int, Sequence[int]]] = None) -> bool:
  """Starts the jax distributed runtime when this is a multi-process job; a no-op otherwise.

  Must run before anything touches a jax device. Sources, first match wins: explicit arguments,
  then WORKBENCH_COORDINATOR / WORKBENCH_NUM_PROCESSES / WORKBENCH_PROCESS_ID /
  WORKBENCH_LOCAL_DEVICE_IDS, then jax's own auto-detection when `detected_cluster()` finds
  SLURM, Open MPI or a multi-host TPU environment. After start-up, non-main processes log at
  WARNING and above only, so INFO logs come from process 0.

  Args:
    coordinator_address: "host:port" of process 0.
    num_processes: total number of processes; 1 (or unset with no cluster) means single-process.
    process_id: this process's index in [0, num_processes).
    local_device_ids: devices this process may use (default: all local devices).

  Returns:
    True if `jax.distributed.initialize` was called (now or by an earlier call), False for a
    single-process run.

  Raises:
    ValueError: a partial or inconsistent configuration (e.g. a coordinator without a process id).
  """
  global _initialized
  if _initialized:
    return True
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  local_device_ids = local_device_ids if local_device_ids is not None else _env_device_ids()
  explicit = [coordinator_address, num_processes, process_id]
  if num_processes == 1 or (all(v is None for v in explicit) and detected_cluster() is None):
    logging.info("single-process run: jax.distributed not initialised")
    return False
  if any(v is not None for v in explicit):
    _check_explicit(coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
  else:
    logging.info("initialising jax.distributed from the %s environment", detected_cluster())
    jax.distributed.initialize(local_device_ids=local_device_ids)
  _initialized = True
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # INFO logs from process 0 only; warnings from everyone.
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def _check_explicit(coordinator_address, num_processes, process_id) -> None:
  """Explicit configuration must be complete: jax would otherwise fall back to auto-detection."""
  given = {f"{ENV_COORDINATOR} / coordinator_address": coordinator_address,
           f"{ENV_NUM_PROCESSES} / num_processes": num_processes,
           f"{ENV_PROCESS_ID} / process_id": process_id}
  missing = [name for name, value in given.items() if value is None]
  if missing:
    raise ValueError("distributed.initialize: incomplete configuration, missing "
                     + ", ".join(missing))
  if not 0 <= process_id < num_processes:
    raise ValueError(f"distributed.initialize: process_id={process_id} not in [0, {num_processes})")


def is_main_process() -> bool:
  """True on process 0: the one that logs, writes metadata and reports."""
  return jax.process_index() == 0


def allgather_text(text: str) -> list:
  """Every process's `text`, in process order (a collective; [text] for a single process)."""
  if jax.process_count() == 1:
    return [text]
  data = np.frombuffer(text.encode("utf-8"), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int32)).reshape(-1)
  padded = np.zeros(max(int(lengths.max()), 1), np.uint8)
  padded[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [bytes(gathered[i, :lengths[i]]).decode("utf-8") for i in range(len(lengths))]


def allgather_json(obj: Any) -> list:
  """Every process's JSON-serialisable `obj`, in process order (a collective)."""
  return [json.loads(t) for t in allgather_text(json.dumps(obj))]


def agree_int(value: int, how: str = "max") -> int:
  """The max (or min) of an integer over all processes (a collective; `value` for one process)."""
  if jax.process_count() == 1:
    return int(value)
  values = multihost_utils.process_allgather(np.array([int(value)], np.int64)).reshape(-1)
  return int(values.max() if how == "max" else values.min())


def define_flags() -> None:
  """Defines --coordinator, --num_processes and --process_id for a research script."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("coordinator", None, "multi-host: host:port of process 0")
  flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
  flags.DEFINE_integer("process_id", None, "multi-host: this process's index")


def initialize_from_flags() -> bool:
  """`initialize` from the flags of `define_flags` (then the environment, then auto-detection)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  return initialize(f.coordinator, f.num_processes, f.process_id)
