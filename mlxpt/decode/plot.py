"""Accuracy-vs-samples charts without a plotting dependency: a terminal chart and a PNG.

`series` maps a label to [(n, accuracy), ...]; n may be fractional (adaptive stopping's mean
samples). The x axis is log2(n) (1, 2, 4, 8, 16 evenly spaced; ticks at whole n). The PNG is drawn on an RGB raster with a built-in 5x7 font and written with zlib.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

Series = dict[str, list[tuple[int, float]]]
MARKERS = "o*x+#@%&"

# 5x7 glyphs, row-major, "#" = ink; lower-case text is drawn in capitals.
_GLYPHS = {
    "A": ".###.#...##...#######...##...##...#",
    "B": "####.#...##...#####.#...##...#####.",
    "C": ".###.#...##....#....#....#...#.###.",
    "D": "####.#...##...##...##...##...#####.",
    "E": "######....#....####.#....#....#####",
    "F": "######....#....####.#....#....#....",
    "G": ".###.#...##....#.####...##...#.####",
    "H": "#...##...##...#######...##...##...#",
    "I": ".###...#....#....#....#....#...###.",
    "J": "..###...#....#....#....#.#..#..##..",
    "K": "#...##..#.#.#..##...#.#..#..#.#...#",
    "L": "#....#....#....#....#....#....#####",
    "M": "#...###.###.#.##.#.##...##...##...#",
    "N": "#...##...###..##.#.##..###...##...#",
    "O": ".###.#...##...##...##...##...#.###.",
    "P": "####.#...##...#####.#....#....#....",
    "Q": ".###.#...##...##...##.#.##..#..##.#",
    "R": "####.#...##...#####.#.#..#..#.#...#",
    "S": ".#####....#.....###.....#....#####.",
    "T": "#####..#....#....#....#....#....#..",
    "U": "#...##...##...##...##...##...#.###.",
    "V": "#...##...##...##...##...#.#.#...#..",
    "W": "#...##...##...##.#.##.#.##.#.#.#.#.",
    "X": "#...##...#.#.#...#...#.#.#...##...#",
    "Y": "#...##...#.#.#...#....#....#....#..",
    "Z": "#####....#...#...#...#...#....#####",
    "0": ".###.#...##..###.#.###..##...#.###.",
    "1": "..#...##....#....#....#....#...###.",
    "2": ".###.#...#....#...#...#...#...#####",
    "3": "####.....#....#.###.....#....#####.",
    "4": "...#...##..#.#.#..#.#####...#....#.",
    "5": "######....####.....#....##...#.###.",
    "6": "..##..#...#....####.#...##...#.###.",
    "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.",
    "9": ".###.#...##...#.####....#...#..##..",
    "-": "...............#####...............",
    ".": ".........................##...##...",
    "%": "##..###..#...#...#...#...#..###..##",
    ":": "......##...##.........##...##......",
    "/": "....#....#...#...#...#...#....#....",
    "(": "...#...#...#....#....#.....#.....#.",
    ")": ".#.....#.....#....#....#...#...#...",
    "=": "..........#####.....#####..........",
    "_": "..............................#####",
    "+": ".......#....#..#####..#....#.......",
    ",": "....................##....#...#....",
    " ": "." * 35,
}
_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def _xpos(n: int, ns: list[int]) -> float:
    """Position of n in [0, 1] on a log2 axis over `ns`."""
    lo, hi = math.log2(min(ns)), math.log2(max(ns))
    return 0.5 if hi == lo else (math.log2(n) - lo) / (hi - lo)


def _ymax(series: Series) -> float:
    top = max((a for pts in series.values() for _, a in pts), default=0.0)
    return min(1.0, max(0.1, math.ceil(top * 10 + 0.5) / 10))


def terminal_chart(series: Series, width: int = 56, height: int = 13, title: str = "accuracy vs samples") -> str:
    """A text chart: one marker per series, dots between points, accuracy in % on the y axis."""
    ns = sorted({n for pts in series.values() for n, _ in pts})
    if not ns:
        return ""
    ymax = _ymax(series)
    grid = [[" "] * width for _ in range(height)]

    def cell(pos: float, a: float) -> tuple[int, int]:
        x = round(pos * (width - 1))
        y = height - 1 - round(min(a, ymax) / ymax * (height - 1))
        return x, y

    for k, pts in enumerate(series.values()):
        pts = sorted(pts)
        for (n0, a0), (n1, a1) in zip(pts, pts[1:], strict=False):
            x0, x1 = _xpos(n0, ns), _xpos(n1, ns)
            for s in range(1, 20):
                f = s / 20
                x, y = cell(x0 + f * (x1 - x0), a0 + f * (a1 - a0))
                if grid[y][x] == " ":
                    grid[y][x] = "."
        for n, a in pts:
            x, y = cell(_xpos(n, ns), a)
            grid[y][x] = MARKERS[k % len(MARKERS)]
    lines = [title]
    for r, row in enumerate(grid):
        label = f"{ymax * (height - 1 - r) / (height - 1) * 100:5.1f}%" if r % 3 == 0 else " " * 6
        lines.append(f"{label} |" + "".join(row))
    lines.append(" " * 7 + "+" + "-" * width)
    axis = [" "] * (width + 12)
    for n in (n for n in ns if float(n).is_integer()):
        x = 8 + round(_xpos(n, ns) * (width - 1))
        for j, ch in enumerate(str(n)):
            if x + j < len(axis):
                axis[x + j] = ch
    lines.append("".join(axis).rstrip() + "   N (samples, log scale)")
    lines += [f"  {MARKERS[k % len(MARKERS)]} {label}" for k, label in enumerate(series)]
    return "\n".join(lines)


class _Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def dot(self, x: int, y: int, c, size: int = 1) -> None:
        for dy in range(size):
            for dx in range(size):
                xx, yy = x + dx - size // 2, y + dy - size // 2
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = (yy * self.w + xx) * 3
                    self.px[i : i + 3] = bytes(c)

    def line(self, x0: float, y0: float, x1: float, y1: float, c, size: int = 1) -> None:
        steps = max(1, int(max(abs(x1 - x0), abs(y1 - y0))))
        for s in range(steps + 1):
            f = s / steps
            self.dot(round(x0 + f * (x1 - x0)), round(y0 + f * (y1 - y0)), c, size)

    def text(self, x: int, y: int, s: str, c=(0, 0, 0), scale: int = 2) -> None:
        for k, ch in enumerate(s.upper()):
            g = _GLYPHS.get(ch, _GLYPHS[" "])
            for r in range(7):
                for col in range(5):
                    if g[r * 5 + col] == "#":
                        for dy in range(scale):
                            for dx in range(scale):
                                self.dot(x + k * 6 * scale + col * scale + dx, y + r * scale + dy, c)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3 : (y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        head = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def png_chart(series: Series, title: str = "accuracy vs samples") -> bytes:
    """PNG bytes of the accuracy-vs-N chart (log2 x axis, accuracy in % on y, a legend)."""
    W, H, left, right, top, bottom = 900, 480, 90, 330, 50, 60
    cv = _Canvas(W, H)
    pw, ph = W - left - right, H - top - bottom
    ns = sorted({n for pts in series.values() for n, _ in pts}) or [1]
    ymax = _ymax(series)
    grey, black = (220, 220, 220), (0, 0, 0)
    for t in range(6):
        y = top + ph - ph * t / 5
        cv.line(left, y, left + pw, y, grey)
        cv.text(left - 70, round(y) - 7, f"{ymax * t / 5 * 100:.0f}%")
    for n in (n for n in ns if float(n).is_integer()):
        x = left + _xpos(n, ns) * pw
        cv.line(x, top, x, top + ph, grey)
        cv.text(round(x) - 6 * len(str(int(n))), top + ph + 10, str(int(n)))
    cv.line(left, top + ph, left + pw, top + ph, black, 2)
    cv.line(left, top, left, top + ph, black, 2)
    cv.text(left, 15, title)
    cv.text(left + pw // 2 - 60, H - 24, "N samples")
    for k, (label, pts) in enumerate(series.items()):
        color = _PALETTE[k % len(_PALETTE)]
        xy = [(left + _xpos(n, ns) * pw, top + ph - min(a, ymax) / ymax * ph) for n, a in sorted(pts)]
        for (x0, y0), (x1, y1) in zip(xy, xy[1:], strict=False):
            cv.line(x0, y0, x1, y1, color, 3)
        if len(pts) == 1 and pts[0][0] == min(ns) and len(ns) > 1:  # a one-sample baseline: dashed level
            for x in range(left, left + pw, 16):
                cv.line(x, xy[0][1], min(x + 8, left + pw), xy[0][1], color, 2)
        for x, y in xy:
            cv.dot(round(x), round(y), color, 9)
        ly = top + 10 + 28 * k
        cv.line(left + pw + 20, ly + 7, left + pw + 50, ly + 7, color, 3)
        cv.text(left + pw + 58, ly, label[:22])
    return cv.png()


def write_png(path: str | Path, series: Series, title: str = "accuracy vs samples") -> None:
    from mlxpt.runs.atomic import atomic_write_bytes

    atomic_write_bytes(path, png_chart(series, title))
