"""Figures of the toolkit, drawn with matplotlib's object API on the Agg canvas (no pyplot state).

Example:
    >>> import tempfile, pathlib
    >>> import pandas as pd
    >>> m = pd.DataFrame([[1.0, 0.25], [0.5, float("nan")]], index=pd.Index(["a", "b"], name="source"),
    ...                  columns=["a", "b"])
    >>> p = plot_heatmap(m, pathlib.Path(tempfile.mkdtemp()) / "h.png", title="demo")
    >>> p.read_bytes()[:4] == b"\\x89PNG"
    True
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .files import atomic_write

__all__ = ["plot_heatmap", "figure_bytes", "save_figure", "texts_outside"]

#: margin around the tight bounding box of a saved figure, in inches
PAD_INCHES = 0.08


def figure_bytes(fig: Any, fmt: str = "png", dpi: float | None = None) -> bytes:
    """A figure rendered with a tight bounding box: every artist, text included, is inside the
    image by construction (a footnote or a long label widens the image, it is never cut).

    Every picture of the toolkit is written through this function (or :func:`save_figure`).

    Example:
        >>> from matplotlib.figure import Figure
        >>> from matplotlib.backends.backend_agg import FigureCanvasAgg
        >>> fig = Figure(figsize=(2, 1)); _ = FigureCanvasAgg(fig)
        >>> _ = fig.text(1.5, 0.5, "far to the right of the figure")
        >>> texts_outside(fig, tight=False), texts_outside(fig, tight=True)
        (['far to the right of the figure'], [])
    """
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=PAD_INCHES)
    return buf.getvalue()


def save_figure(fig: Any, path: str | os.PathLike, dpi: float | None = None) -> Path:
    """Write ``fig`` atomically to ``path`` (format from the suffix) with :func:`figure_bytes`."""
    path = Path(path)
    data = figure_bytes(fig, path.suffix.lstrip(".") or "png", dpi)
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return path


def texts_outside(fig: Any, tight: bool) -> list[str]:
    """The texts ``fig`` draws that reach past the region a save keeps: the tight bounding box
    (``tight``, as :func:`figure_bytes` saves) or the figure itself (a plain ``savefig``). A
    check for tests: the figure is drawn once and every text actually drawn is measured (tick
    labels outside the view limits exist as artists but are never drawn).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    if not hasattr(fig.canvas, "get_renderer"):
        FigureCanvasAgg(fig)
    drawn: list[tuple[str, Any]] = []
    original = Text.draw

    def record(self: Text, renderer: Any) -> None:
        original(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self.get_text(), self.get_window_extent(renderer)))

    Text.draw = record
    try:
        fig.canvas.draw()
    finally:
        Text.draw = original
    renderer = fig.canvas.get_renderer()
    w, h = fig.get_size_inches()
    saved = fig.get_tightbbox(renderer).padded(PAD_INCHES) if tight else Bbox.from_bounds(0, 0, w, h)
    out = []
    for text, extent in drawn:
        box = extent.transformed(fig.dpi_scale_trans.inverted())
        if box.width == 0 and box.height == 0:
            continue
        if box.x0 < saved.x0 - 1e-6 or box.y0 < saved.y0 - 1e-6 or box.x1 > saved.x1 + 1e-6 or \
                box.y1 > saved.y1 + 1e-6:
            out.append(text)
    return out


def plot_heatmap(matrix: pd.DataFrame, path: str | os.PathLike, title: str | None = None,
                 colorbar_label: str = "transfer rate", vmin: float = 0.0, vmax: float = 1.0,
                 cmap: str = "viridis", annotate: bool = True, dpi: int = 150,
                 diagonal: "np.ndarray | list[float] | None" = None,
                 diagonal_label: str = "white-box success") -> Path:
    """Draw a source x target matrix as an annotated heatmap with a fixed colour scale; write a PNG.

    Rows are sources (the matrix index), columns targets. Cells show the value with two decimals
    (``-`` where it is NaN, drawn grey); the figure and fonts scale with the number of models so
    that 20 models stay readable. The file is written atomically.

    Args:
        matrix: values in [vmin, vmax], index = sources, columns = targets.
        path: where to write the PNG.
        title: figure title.
        colorbar_label: label of the colour bar.
        vmin, vmax: fixed colour scale (0-1 by default, so figures are comparable).
        cmap: matplotlib colour map name.
        annotate: write each cell's value.
        dpi: resolution.
        diagonal: values written on the diagonal instead of the matrix's own (for ``transfer_rate``,
            whose diagonal is 1 by definition: the white-box success rate). They are another
            quantity, so those cells are hatched, carry their number, and stay off the colour
            scale (the colour bar is the off-diagonal cells' only); a note under the figure names
            them ``diagonal_label``.

    Returns:
        The path written.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = matrix.to_numpy(dtype=float).copy()
    n_rows, n_cols = values.shape
    if diagonal is not None:
        diag = np.asarray(diagonal, dtype=float)
        if n_rows != n_cols or diag.shape != (n_rows,):
            raise ValueError(f"diagonal needs {n_rows} values for a square matrix, got shape {diag.shape}")
        np.fill_diagonal(values, diag)
    side = max(n_rows, n_cols)
    cell = 0.55 if side <= 12 else 0.45
    width = max(4.5, cell * n_cols + 2.8)
    height = max(3.5, cell * n_rows + 2.0)
    label_size = 10 if side <= 8 else (8 if side <= 16 else 7)
    annot_size = 9 if side <= 8 else (7 if side <= 16 else 6)

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colour_map = colormaps[cmap].with_extremes(bad="#d0d0d0")
    shown = values.copy()
    if diagonal is not None:
        np.fill_diagonal(shown, np.nan)  # not on the transfer-rate colour scale
    masked = np.ma.masked_invalid(shown)
    image = ax.imshow(masked, cmap=colour_map, vmin=vmin, vmax=vmax, aspect="equal", interpolation="nearest")
    ax.set_xticks(range(n_cols))
    ax.set_yticks(range(n_rows))
    ax.set_xticklabels([str(c) for c in matrix.columns], rotation=45 if side <= 8 else 60, ha="right",
                       rotation_mode="anchor", fontsize=label_size)
    ax.set_yticklabels([str(r) for r in matrix.index], fontsize=label_size)
    ax.set_xlabel("target", fontsize=label_size + 1)
    ax.set_ylabel(str(matrix.index.name or "source"), fontsize=label_size + 1)
    ax.set_xticks(np.arange(-0.5, n_cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    if annotate:
        for i in range(n_rows):
            for j in range(n_cols):
                v = values[i, j]
                if diagonal is not None and i == j:
                    continue  # written with its hatching below
                if math.isnan(v):
                    ax.text(j, i, "-", ha="center", va="center", fontsize=annot_size, color="#505050")
                    continue
                r, g, b, _ = colour_map((v - vmin) / (vmax - vmin) if vmax > vmin else 0.0)
                luminance = 0.299 * r + 0.587 * g + 0.114 * b
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=annot_size,
                        color="black" if luminance > 0.5 else "white")
    if diagonal is not None:
        from matplotlib.patches import Rectangle

        for i in range(n_rows):
            ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor="#707070", hatch="///",
                                   linewidth=0.8, zorder=2))
            v = values[i, i]
            ax.text(i, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=annot_size,
                    color="black", fontweight="bold", zorder=3,
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"})
        fig.text(0.01, 0.0, f"hatched diagonal: {diagonal_label}, not on the colour scale\n"
                 "(the conditional transfer rate there is 1 by definition)",
                 fontsize=max(6, label_size - 2), ha="left", va="top")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(colorbar_label, fontsize=label_size)
    bar.ax.tick_params(labelsize=label_size)
    if title:
        ax.set_title(title, fontsize=label_size + 1)
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)  # looked up at call time: tests may wrap it
