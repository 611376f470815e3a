"""The PNG chart: throughput and latency per concurrency level, bridge beside passthrough."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = ("bridge", "passthrough")
COLOURS = {"bridge": "#1f77b4", "passthrough": "#aaaaaa"}


def draw(throughput: dict[str, Any], title: str, path: Path) -> bool:
    """Write the chart; False when matplotlib is not installed (the bench extra has it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a server or in CI
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    levels = sorted(throughput["levels"], key=int)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = (("rps", "throughput (messages/s)"), ("p50_ms", "p50 latency (ms)"),
              ("p99_ms", "p99 latency (ms)"))
    width = 0.38
    for ax, (figure, label) in zip(axes, panels, strict=True):
        for offset, target in enumerate(TARGETS):
            values = [throughput["levels"][level][target][figure] for level in levels]
            xs = [i + (offset - 0.5) * width for i in range(len(levels))]
            bars = ax.bar(xs, values, width, label=target, color=COLOURS[target])
            ax.bar_label(bars, fmt="%.0f" if figure == "rps" else "%.2f", fontsize=8)
        ax.set_xticks(range(len(levels)), [f"{level} client(s)" for level in levels])
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
