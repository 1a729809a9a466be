"""Plain text tables for the CLI and the benchmarks: aligned columns, no dependency."""

from __future__ import annotations

from typing import Any


def render_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """Fixed-width text table; columns in ``right`` (default: all but the first) right-aligned."""
    right = right if right is not None else set(range(1, len(headers)))
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: list[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """``render_table`` for raw values: numeric columns right-aligned, the rest left."""
    numeric = {
        i
        for i in range(len(headers))
        if rows and all(isinstance(r[i], int | float) and not isinstance(r[i], bool) for r in rows)
    }
    return render_table(headers, [[str(c) for c in r] for r in rows], right=numeric)


def key_values(rows: list[tuple[str, Any]]) -> str:
    """``key  value`` lines with the keys padded to one width."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)
