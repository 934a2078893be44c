"""Plain-text tables for the terminal."""

from __future__ import annotations


def table(header: list[str], rows: list[list[object]], *, max_width: int = 60) -> str:
    """Left-aligned text columns, numbers right-aligned; long cells keep their tail."""
    def cell(v: object) -> str:
        s = str(v)
        return s if len(s) <= max_width else "…" + s[-(max_width - 1):]

    cells = [[cell(h) for h in header]] + [[cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", "").rstrip("x%"))
        return True
    except ValueError:
        return s in ("-", "")
