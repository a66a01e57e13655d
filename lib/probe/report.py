"""Figures and tables of the probe experiments: heatmaps (PNG), text tables, token views (HTML)."""

import html
import io
from typing import Sequence

import numpy as np

from lib import atomic


def heatmaps(path_png: str, panels: Sequence[tuple], suptitle: str = "") -> None:
  """Writes side-by-side heatmaps atomically.

  Args:
    panels: (title, matrix (R, C), row labels, column labels, colour-bar label) each; NaN cells
      are left blank.
  """
  # pylint: disable-next=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure   # pylint: disable=import-outside-toplevel
  rows = max(len(p[2]) for p in panels)
  cols = max(len(p[3]) for p in panels)
  fig = Figure(figsize=(1.0 + (0.45 * cols + 2.2) * len(panels), 1.2 + 0.32 * rows), dpi=110)
  FigureCanvasAgg(fig)
  for ax, (title, m, rlab, clab, cbar) in zip(np.atleast_1d(fig.subplots(1, len(panels))),
                                               panels):
    im = ax.imshow(np.ma.masked_invalid(np.asarray(m, float)), aspect="auto", cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_yticks(range(len(rlab)), rlab, fontsize=7)
    ax.set_xticks(range(len(clab)), clab, fontsize=7, rotation=60, ha="right")
    fig.colorbar(im, ax=ax, label=cbar)
  if suptitle:
    fig.suptitle(suptitle, fontsize=10)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  atomic.write_bytes(path_png, buf.getvalue())


def table(header: Sequence[str], rows: Sequence[Sequence], fmt: str = "{:.3f}") -> str:
  """A fixed-width text table; floats formatted with `fmt`."""
  cells = [[fmt.format(v) if isinstance(v, float) else str(v) for v in r] for r in rows]
  widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
  line = lambda r: "  ".join(str(v).rjust(w) for v, w in zip(r, widths))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])


def token_html(title: str, sentences: Sequence[tuple]) -> str:
  """An HTML page of sentences with each token shaded by its attribution (red +, blue -).

  Args:
    sentences: (caption, tokens, scores) each; scores are scaled by the sentence's max |score|.
  """
  out = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
         f"<h2>{html.escape(title)}</h2>"]
  for caption, tokens, scores in sentences:
    s = np.asarray(scores, float)
    top = max(float(np.abs(s).max()), 1e-12)
    spans = []
    for tok, v in zip(tokens, s):
      a = min(abs(v) / top, 1.0)
      rgb = "255,0,0" if v >= 0 else "0,0,255"
      spans.append(f"<span title='{v:+.4f}' style='background:rgba({rgb},{a:.2f});"
                   f"padding:1px 2px'>{html.escape(tok)}</span>")
    out.append(f"<p><b>{html.escape(caption)}</b><br>{' '.join(spans)}</p>")
  return "\n".join(out + ["</body></html>"])
