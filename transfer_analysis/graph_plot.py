"""Draw the transferability graph with a chosen teacher set highlighted (matplotlib, Agg).

Nodes sit on a circle grouped by family (colour = family); every edge is shaded by its pair score;
the chosen set's nodes are enlarged and outlined and its edges drawn thick on top. No pyplot state
is touched: the figure is a plain :class:`matplotlib.figure.Figure` on an Agg canvas.

Example:
    >>> import pandas as pd
    >>> from transfer_analysis.selection import transfer_graph
    >>> T = pd.DataFrame([[1, .1, .9], [.2, 1, .3], [.8, .4, 1]], index=list("abc"), columns=list("abc"))
    >>> png = render_transfer_graph(transfer_graph(T), highlight=["a", "b"])
    >>> png[:4]
    b'\\x89PNG'
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

__all__ = ["render_transfer_graph", "plot_transfer_graph"]


def _layout(graph: nx.Graph) -> dict[str, tuple[float, float]]:
    """Circle, nodes grouped by family then name (deterministic, readable for ~20 models)."""
    nodes = sorted(graph.nodes, key=lambda n: (graph.nodes[n].get("family") is None,
                                               str(graph.nodes[n].get("family") or ""), str(n)))
    n = max(len(nodes), 1)
    return {v: (math.cos(math.pi / 2 - 2 * math.pi * i / n), math.sin(math.pi / 2 - 2 * math.pi * i / n))
            for i, v in enumerate(nodes)}


def render_transfer_graph(graph: nx.Graph, highlight: Sequence[str] = (), title: str | None = None,
                          dpi: int = 150, max_edges: int = 1500) -> bytes:
    """Render the graph to PNG bytes.

    Args:
        graph: from :func:`transfer_analysis.selection.transfer_graph` (edge ``weight`` = pair score,
            node ``family``).
        highlight: the chosen set.
        title: figure title.
        dpi: resolution.
        max_edges: draw at most this many edges besides the chosen set's (the lowest scores).

    Returns:
        The PNG file content.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pos = _layout(graph)
    nodes = list(pos)
    chosen = set(highlight)
    n = len(nodes)
    side = float(min(16.0, max(7.0, 0.28 * n + 4.0)))
    dpi = int(min(dpi, 2000 / (side + 2.2)))  # at most ~2000 px wide: large pools stay a small file
    fig = Figure(figsize=(side + 2.2, side), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.02, 0.78, 0.9))
    ax.set_aspect("equal")
    ax.axis("off")

    sm = _draw_edges(ax, graph, pos, chosen, max_edges)
    fam_color = _draw_nodes(ax, graph, pos, chosen)
    _draw_legend(fig, graph, sm, fam_color, chosen)
    if title:
        fig.suptitle(title, fontsize=12, x=0.42)
    from . import plots

    return plots.figure_bytes(fig, "png", dpi=dpi)


def _draw_edges(ax: Any, graph: nx.Graph, pos: dict[str, Any], chosen: set[str], max_edges: int) -> Any:
    """Every edge coloured by its pair score (the chosen set's bold and labelled); the colour scale."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize

    n = len(pos)
    # light (low transfer) to dark violet (high), never black: a high-score edge stays a colour at the
    # alpha the other edges are drawn with (magma_r's black end read as plain grey)
    cmap = "viridis_r"
    weights = [float(d.get("weight", 0.0)) for _, _, d in graph.edges(data=True)]
    lo, hi = (min(weights), max(weights)) if weights else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    norm = Normalize(vmin=lo, vmax=hi)
    sm = ScalarMappable(norm=norm, cmap=cmap)

    plain, plain_c, hot, hot_c = [], [], [], []
    edges = sorted(graph.edges(data=True), key=lambda e: e[2].get("weight", 0.0))
    shown = sum(1 for a, b, _ in edges if not (a in chosen and b in chosen))
    if shown > max_edges:  # large pools: only the lowest-transfer edges, or the picture is a blot
        keep = max_edges
        kept = []
        for a, b, d in edges:
            if a in chosen and b in chosen:
                kept.append((a, b, d))
            elif keep > 0:
                kept.append((a, b, d))
                keep -= 1
        edges = kept
        ax.text(0.0, -1.55, f"showing the {max_edges} lowest-score of {shown} edges", ha="center", fontsize=9)
    # draw high scores first so that the low-transfer edges stay visible on top
    edges = edges[::-1]
    rgba = sm.to_rgba(np.asarray([float(d.get("weight", 0.0)) for _, _, d in edges], dtype=float)) if edges else []
    for (a, b, _), col in zip(edges, rgba):
        seg = (pos[a], pos[b])
        if a in chosen and b in chosen:
            hot.append(seg)
            hot_c.append(col)
        else:
            plain.append(seg)
            plain_c.append(col)
    base_w = 1.2 if n <= 25 else max(0.2, 25.0 / n)
    if plain:
        ax.add_collection(LineCollection(plain, colors=plain_c, linewidths=base_w * 1.3, alpha=0.85, zorder=1))
    if hot:
        ax.add_collection(LineCollection(hot, colors="black", linewidths=5.0, zorder=2))
        ax.add_collection(LineCollection(hot, colors=hot_c, linewidths=3.2, zorder=3))
        if len(hot) <= 28:  # the chosen set's pair scores, written on its edges
            for a, b, d in graph.edges(data=True):
                if a in chosen and b in chosen:
                    (x0, y0), (x1, y1) = pos[a], pos[b]
                    ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{float(d.get('weight', 0.0)):.2f}", fontsize=8,
                            ha="center", va="center", zorder=7,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})

    return sm


def _draw_nodes(ax: Any, graph: nx.Graph, pos: dict[str, Any], chosen: set[str]) -> dict[Any, Any]:
    """Nodes coloured by family (the chosen set's larger, outlined) and their labels; family -> colour."""
    from matplotlib import colormaps

    nodes = list(pos)
    n = len(nodes)
    fams = sorted({graph.nodes[v].get("family") for v in nodes}, key=lambda f: (f is None, str(f or "")))
    tab = colormaps["tab10" if len(fams) <= 10 else "tab20"]
    fam_color = {f: ((0.7, 0.7, 0.7, 1.0) if f is None else tab(i % tab.N)) for i, f in enumerate(fams)}
    xy = np.asarray([pos[v] for v in nodes]) if nodes else np.zeros((0, 2))
    size = 260 if n <= 25 else max(40, 6000 / n)
    colors = [fam_color[graph.nodes[v].get("family")] for v in nodes]
    is_hot = np.asarray([v in chosen for v in nodes], dtype=bool)
    if len(nodes):
        ax.scatter(xy[~is_hot, 0], xy[~is_hot, 1], s=size, c=[c for c, h in zip(colors, is_hot) if not h],
                   edgecolors="white", linewidths=1.0, zorder=4)
        if is_hot.any():
            ax.scatter(xy[is_hot, 0], xy[is_hot, 1], s=size * 1.9, c=[c for c, h in zip(colors, is_hot) if h],
                       edgecolors="black", linewidths=2.5, zorder=5)
    fs = 10 if n <= 25 else max(4, int(220 / n))
    for v, (x, y) in pos.items():
        r = 1.13 if n <= 25 else 1.08
        ang = math.degrees(math.atan2(y, x))
        rot = ang if -90 <= ang <= 90 else ang - 180
        ax.text(x * r, y * r, str(v), ha="left" if x >= 0 else "right", va="center", rotation=rot,
                rotation_mode="anchor", fontsize=fs, fontweight="bold" if v in chosen else "normal", zorder=6)
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-1.6, 1.6)

    return fam_color


def _draw_legend(fig: Any, graph: nx.Graph, sm: Any, fam_color: dict[Any, Any], chosen: set[str]) -> None:
    """The pair-score colour bar and the family / chosen-set legend."""
    from matplotlib.lines import Line2D

    fams = list(fam_color)
    cax = fig.add_axes((0.84, 0.12, 0.025, 0.6))
    cb = fig.colorbar(sm, cax=cax)
    cb.set_label(f"pair score ({graph.graph.get('pair', 'max')} of the two transfer rates)")
    handles = [Line2D([], [], marker="o", linestyle="", markersize=9, markerfacecolor=fam_color[f],
                      markeredgecolor="white", label="unknown family" if f is None else str(f)) for f in fams]
    if chosen:
        handles.append(Line2D([], [], marker="o", linestyle="-", color="black", markersize=11,
                              markerfacecolor="white", markeredgecolor="black", markeredgewidth=2.5,
                              label="chosen set"))
    fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(0.995, 0.995), fontsize=9, frameon=False)


def plot_transfer_graph(graph: nx.Graph, path: str | os.PathLike, highlight: Sequence[str] = (),
                        title: str | None = None, dpi: int = 150) -> Path:
    """Write :func:`render_transfer_graph` to ``path`` atomically and return the path.

    Example:
        >>> import pandas as pd, tempfile, pathlib
        >>> from transfer_analysis.selection import transfer_graph
        >>> T = pd.DataFrame([[1, .1], [.2, 1]], index=list("ab"), columns=list("ab"))
        >>> p = plot_transfer_graph(transfer_graph(T), pathlib.Path(tempfile.mkdtemp()) / "g.png", ["a", "b"])
        >>> p.stat().st_size > 0
        True
    """
    from .files import atomic_write

    blob = render_transfer_graph(graph, highlight=highlight, title=title, dpi=dpi)
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fh.write(blob)
    return path
