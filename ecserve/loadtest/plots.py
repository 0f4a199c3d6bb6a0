"""--plot-dir: latency CDFs and throughput / in-flight over time, as PNGs (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecserve.errors import ConfigError
from ecserve.loadtest.records import RequestRecord

MISSING = "--plot-dir needs matplotlib: pip install 'ecserve[plots]' (or matplotlib>=3.7)"


def require_matplotlib() -> Any:
    """matplotlib.pyplot on the Agg backend; ConfigError with the install hint if missing."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(MISSING, field="plot_dir") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(records: Sequence[RequestRecord], out_dir: str, title: str = "") -> list[Path]:
    plt = require_matplotlib()
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    return [_latency_cdfs(plt, records, d / "latency_cdf.png", title),
            _over_time(plt, records, d / "throughput.png", title)]


def _latency_cdfs(plt: Any, records: Sequence[RequestRecord], path: Path, title: str) -> Path:
    ok = [r for r in records if r.success]
    series = {
        "TTFT": [r.ttft for r in ok],
        "TPOT": [t for r in ok if (t := r.tpot) is not None],
        "ITL": [g for r in ok for g in r.itl],
        "E2EL": [r.latency for r in ok],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, series.items(), strict=True):
        ms = np.sort(np.asarray(values, dtype=float) * 1000.0)
        if ms.size:
            ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post")
            for p, style in ((50, ":"), (99, "--")):
                ax.axvline(np.percentile(ms, p), color="grey", linestyle=style,
                           label=f"p{p} {np.percentile(ms, p):.1f} ms")
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{name} ({ms.size} samples)")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction ≤ x")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency CDFs {title}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _over_time(plt: Any, records: Sequence[RequestRecord], path: Path, title: str) -> Path:
    end = max((r.end for r in records), default=0.0)
    nbins = max(int(np.ceil(end)), 1)
    times = [t for r in records for t in r.chunk_times]
    tokens = [n for r in records for n in r.chunk_tokens]
    per_bin, edges = np.histogram(times, bins=nbins, range=(0, nbins), weights=tokens)
    widths = np.minimum(edges[1:], max(end, 1e-9)) - edges[:-1]  # the last bin may be partial
    per_sec = per_bin / np.maximum(widths, 1e-9)
    events = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records])
    xs, ys, level = [0.0], [0], 0
    for t, delta in events:
        level += delta
        xs.append(t)
        ys.append(level)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.bar(edges[:-1], per_sec, width=widths, align="edge", alpha=0.7)
    top.set_ylabel("output tok/s (1 s bins)")
    top.grid(alpha=0.3)
    bottom.step(xs, ys, where="post")
    bottom.set_ylabel("requests in flight")
    bottom.set_xlabel("seconds since the start")
    bottom.grid(alpha=0.3)
    fig.suptitle(f"Throughput and load {title}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
