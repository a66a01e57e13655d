"""Atomic writes: a file or a whole directory appears complete, or not at all."""

import contextlib
import os
import shutil
import tempfile


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to a temp file beside `path`, fsyncs, then os.replace()s it: readers never see
  half a file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # Same directory as the target so os.replace is a rename on one filesystem (atomic on POSIX).
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def directory(out_dir: str, prefix: str = ".tmp-"):
  """Yields a temporary directory beside `out_dir`; on success it replaces `out_dir`.

  A crash (or exception) inside the block leaves `out_dir` as it was and removes the temporary
  directory. An existing `out_dir` is moved aside first and deleted only after the rename.
  """
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
  try:
    yield tmp
    if os.path.exists(out_dir):
      old = tmp + ".old"
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
