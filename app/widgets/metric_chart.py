"""A line chart of one ChartSpec's series (plotext through textual-plotext)."""

from __future__ import annotations

from textual_plotext import PlotextPlot

from app.charts import Series

MAX_POINTS = 400  # plotext draws every point; thin long runs to keep redraws cheap


def _thin(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    if len(xs) <= MAX_POINTS:
        return xs, ys
    k = -(-len(xs) // MAX_POINTS)
    return xs[::k] + xs[-1:], ys[::k] + ys[-1:]


class MetricChart(PlotextPlot):
    """Set `series` with `show`; the title names the chart and its latest value."""

    def __init__(self, title: str, show_last: bool = True, **kw) -> None:
        super().__init__(**kw)
        self.title = title
        self.show_last = show_last
        self.series: list[Series] = []

    def show(self, series: list[Series]) -> None:
        self.series = series
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        last = series[0][2][-1] if self.show_last and series and series[0][2] else None
        plt.title(f"{self.title}  {last:.4g}" if last is not None else self.title)
        for label, xs, ys in series:
            xs, ys = _thin(xs, ys)
            if len(xs) == 1:
                plt.scatter(xs, ys, label=label if len(series) > 1 else None)
            else:
                plt.plot(xs, ys, label=label if len(series) > 1 else None)
        self.refresh()
