"""A few Prometheus metrics (counters, gauges, histograms) written in the text exposition format."""

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(labels: dict) -> str:
  if not labels:
    return ""
  inner = ",".join(f'{k}="{str(v)}"' for k, v in sorted(labels.items()))
  return "{" + inner + "}"


class Registry:
  """Thread-safe counters and histograms keyed by (name, labels); gauges read at scrape time."""

  def __init__(self):
    self._lock = threading.Lock()
    self._help, self._counters, self._hists, self._gauges = {}, {}, {}, {}
    self._bounds = {}

  def counter(self, name: str, help_: str, **labels) -> None:
    """Adds 1 to counter `name` with `labels`."""
    with self._lock:
      self._help[name] = ("counter", help_)
      key = (name, tuple(sorted(labels.items())))
      self._counters[key] = self._counters.get(key, 0) + 1

  def observe(self, name: str, help_: str, value: float, buckets, **labels) -> None:
    """Records `value` in histogram `name` (cumulative buckets, _sum and _count)."""
    with self._lock:
      self._help[name] = ("histogram", help_)
      key = (name, tuple(sorted(labels.items())))
      counts, total, n = self._hists.get(key, ([0] * len(buckets), 0.0, 0))
      i = bisect.bisect_left(buckets, value)
      counts = [c + (j >= i) for j, c in enumerate(counts)]
      self._hists[key] = (counts, total + value, n + 1)
      self._bounds[name] = tuple(buckets)

  def gauge(self, name: str, help_: str, read) -> None:
    """A gauge whose value `read()` returns at scrape time."""
    self._help[name] = ("gauge", help_)
    self._gauges[name] = read

  def render(self) -> str:
    """The Prometheus text format of every metric."""
    lines = []
    with self._lock:
      for name, (kind, help_) in sorted(self._help.items()):
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        if kind == "gauge":
          lines.append(f"{name} {float(self._gauges[name]())}")
        for (n, labels), v in sorted(self._counters.items()):
          if n == name:
            lines.append(f"{name}{_labels(dict(labels))} {v}")
        for (n, labels), (counts, total, count) in sorted(self._hists.items()):
          if n != name:
            continue
          for bound, c in zip(self._bounds[name], counts):
            lines.append(f"{name}_bucket{_labels(dict(labels, le=bound))} {c}")
          lines.append(f"{name}_bucket{_labels(dict(labels, le='+Inf'))} {count}")
          lines.append(f"{name}_sum{_labels(dict(labels))} {total}")
          lines.append(f"{name}_count{_labels(dict(labels))} {count}")
    return "\n".join(lines) + "\n"
