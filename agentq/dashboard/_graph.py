"""A job's neighbourhood drawn as SVG, on the server: its parent above, the jobs
it depends on to the left, the jobs waiting on it to the right, the jobs
dispatched from inside it below. Each box links to its job's page and is
coloured by state (``dashboard.css``); an edge points the way work flows
(dependency -> dependent, parent -> child)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

__all__ = ["Node", "job_graph"]

_W, _H = 200, 46  # a box
_GAP_X, _GAP_Y = 70, 22
_PAD = 12


@dataclass(frozen=True, slots=True)
class Node:
    """A job in the graph; ``state`` None when the caller may not see it (its box
    says so and links nowhere)."""

    job_id: str
    state: str | None
    label: str | None = None


def _box(node: Node, x: int, y: int, role: str, current: bool = False) -> str:
    state = node.state or "hidden"
    classes = f"node state-{escape(state)}{' current' if current else ''}"
    title = escape(node.label or node.job_id)
    short = escape(node.job_id[:17] + "…" if len(node.job_id) > 18 else node.job_id)
    caption = escape(f"{role}: {state}")
    body = (f'<rect x="{x}" y="{y}" width="{_W}" height="{_H}" rx="6"/>'
            f'<text x="{x + 8}" y="{y + 19}" class="id">{short}</text>'
            f'<text x="{x + 8}" y="{y + 37}" class="caption">{caption}</text>'
            f"<title>{title}</title>")
    if node.state is None or current:
        return f'<g class="{classes}" data-job-id="{escape(node.job_id)}">{body}</g>'
    return (f'<a href="/jobs/{escape(node.job_id)}" class="{classes}" '
            f'data-job-id="{escape(node.job_id)}">{body}</a>')


def _edge(x1: int, y1: int, x2: int, y2: int, kind: str) -> str:
    return (f'<line class="edge {kind}" x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" '
            'marker-end="url(#arrow)"/>')


def job_graph(job: Node, *, parent: Node | None, dependencies: Sequence[Node],
              dependents: Sequence[Node], children: Sequence[Node]) -> str:
    """The SVG (a string of markup, every text escaped) of ``job`` and its neighbours."""
    side_rows = max(1, len(dependencies), len(dependents))
    column_h = side_rows * (_H + _GAP_Y) - _GAP_Y
    top = _PAD + (_H + _GAP_Y * 2 if parent else 0)
    x_left, x_mid, x_right = _PAD, _PAD + _W + _GAP_X, _PAD + 2 * (_W + _GAP_X)
    y_mid = top + (column_h - _H) // 2
    parts: list[str] = []
    edges: list[str] = []
    if parent is not None:
        parts.append(_box(parent, x_mid, _PAD, "parent"))
        edges.append(_edge(x_mid + _W // 2, _PAD + _H, x_mid + _W // 2, y_mid, "child"))
    for i, node in enumerate(dependencies):
        y = top + i * (_H + _GAP_Y) + (column_h - (len(dependencies) * (_H + _GAP_Y) - _GAP_Y)) // 2
        parts.append(_box(node, x_left, y, "dependency"))
        edges.append(_edge(x_left + _W, y + _H // 2, x_mid, y_mid + _H // 2, "dependency"))
    for i, node in enumerate(dependents):
        y = top + i * (_H + _GAP_Y) + (column_h - (len(dependents) * (_H + _GAP_Y) - _GAP_Y)) // 2
        parts.append(_box(node, x_right, y, "dependent"))
        edges.append(_edge(x_mid + _W, y_mid + _H // 2, x_right, y + _H // 2, "dependency"))
    parts.append(_box(job, x_mid, y_mid, "this job", current=True))
    bottom = top + column_h
    width = x_right + _W + _PAD
    if children:
        y_child = bottom + _GAP_Y * 2
        per_row = 3
        for i, node in enumerate(children):
            row, col = divmod(i, per_row)
            x = _PAD + col * (_W + _GAP_X)
            y = y_child + row * (_H + _GAP_Y)
            parts.append(_box(node, x, y, "child"))
            edges.append(_edge(x_mid + _W // 2, y_mid + _H, x + _W // 2, y, "child"))
        rows = (len(children) + per_row - 1) // per_row
        bottom = y_child + rows * (_H + _GAP_Y) - _GAP_Y
    height = bottom + _PAD
    defs = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
            'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
            '<path d="M 0 0 L 10 5 L 0 10 z"/></marker></defs>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="job-graph" role="img" '
            f'aria-label="dependency graph of {escape(job.job_id)}" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
            f'{defs}{"".join(edges)}{"".join(parts)}</svg>')
