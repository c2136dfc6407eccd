"""A token-length histogram of a dataset (plotext bars)."""

from __future__ import annotations

from textual_plotext import PlotextPlot


def bins(lengths: list[int], n: int = 12) -> tuple[list[str], list[int]]:
    """(bin labels, counts) over [0, max] in n equal bins."""
    if not lengths:
        return [], []
    top = max(lengths)
    width = max(1, -(-top // n))
    counts = [0] * (top // width + 1)
    for v in lengths:
        counts[v // width] += 1
    return [str(i * width) for i in range(len(counts))], counts


class LengthHistogram(PlotextPlot):
    def show(self, lengths: list[int], max_len: int | None = None) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        labels, counts = bins(lengths)
        over = sum(v > max_len for v in lengths) if max_len else 0
        plt.title(f"tokens per row (n={len(lengths)}, over max {over})")
        if counts:
            xs = list(range(len(counts)))
            plt.bar(xs, counts)
            ticks = sorted({0, len(xs) // 3, 2 * len(xs) // 3, len(xs) - 1})
            plt.xticks(ticks, [labels[i] for i in ticks])  # fixed ticks: plotext's own choice wobbles
        self.refresh()
