"""`ecserve top`: a terminal view of a server's /metrics, for people without Grafana.

`scrape` fetches and parses one snapshot; `render` is a pure function of two snapshots (the
current one and, when there is one, the previous) and the seconds between them.
"""

from __future__ import annotations

import math
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs


class ScrapeError(Exception):
    """The endpoint could not be read or parsed."""


@dataclass(frozen=True)
class Snapshot:
    """One scrape: sample name -> {sorted label pairs: value}, and when it was taken."""

    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)
    time: float = 0.0

    def series(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})

    def total(self, name: str, **labels: str) -> float | None:
        """Sum of `name`'s samples that carry `labels`; None if there are none."""
        want = set(labels.items())
        found = [v for k, v in self.series(name).items() if want <= set(k)]
        return sum(found) if found else None

    def by(self, name: str, keys: Iterable[str]) -> dict[tuple[str, ...], float]:
        """`name`'s samples summed by the labels `keys` (other labels, e.g. le, dropped)."""
        keys = tuple(keys)
        out: dict[tuple[str, ...], float] = {}
        for labels, v in self.series(name).items():
            d = dict(labels)
            key = tuple(d.get(k, "") for k in keys)
            out[key] = out.get(key, 0.0) + v
        return out

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """Histogram `name`'s (le, cumulative count) for the series carrying `labels`."""
        want = set(labels.items())
        acc: dict[float, float] = {}
        for k, v in self.series(name + "_bucket").items():
            d = dict(k)
            if "le" in d and want <= set(k):
                le = float(d["le"])
                acc[le] = acc.get(le, 0.0) + v
        return sorted(acc.items())


def parse(text: str, when: float = 0.0) -> Snapshot:
    """A Snapshot from Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return Snapshot(samples, when)


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode("utf-8")
        return parse(text, time.monotonic())
    except urllib.error.URLError as e:
        raise ScrapeError(f"cannot scrape {url}: {e.reason}") from None
    except (OSError, ValueError) as e:
        raise ScrapeError(f"cannot scrape {url}: {e}") from None


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lo, below = 0.0, 0.0
    for le, cum in buckets:
        if cum >= rank:
            if math.isinf(le):
                return lo
            return lo + (le - lo) * ((rank - below) / (cum - below) if cum > below else 1.0)
        lo, below = le, cum
    return lo


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(v: float | None, spec: str = ".0f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def _mean(snap: Snapshot, name: str, **labels: str) -> float | None:
    return _ratio(snap.total(name + "_sum", **labels), snap.total(name + "_count", **labels))


def _num(s: str) -> tuple[int, str]:
    return (int(s), s) if s.isdigit() else (sys.maxsize, s)


def header(snap: Snapshot) -> list[str]:
    t = snap.total
    hit_rate = _ratio(t("ecserve_prefix_cache_hits_total"),
                      t("ecserve_prefix_cache_queries_total"))
    lines = [
        f"requests running {_fmt(t('ecserve_requests_running'))}"
        f"  waiting {_fmt(t('ecserve_requests_waiting'))}"
        f"  |  KV blocks {_fmt(t('ecserve_kv_cache_blocks_used'))}"
        f"/{_fmt(t('ecserve_kv_cache_capacity_blocks'))}"
        f" (cached {_fmt(t('ecserve_kv_cache_blocks_cached'))},"
        f" evictable {_fmt(t('ecserve_kv_cache_blocks_evictable'))})"
        f"  |  prefix hits {_fmt(hit_rate, '.0f', 100)}%"
        f"  preempted {_fmt(t('ecserve_preemptions_total'))}"
        f"  |  generated tokens {_fmt(t('ecserve_generation_tokens_total'))}",
        f"TTFT mean {_fmt(_mean(snap, 'ecserve_time_to_first_token_seconds'), '.2f', 1e3)} ms"
        f"  |  ITL mean {_fmt(_mean(snap, 'ecserve_inter_token_latency_seconds'), '.2f', 1e3)}"
        " ms",
    ]
    routed = snap.by("ecserve_moe_routed_tokens_total", ["layer"])
    for (layer,) in sorted(routed, key=lambda k: _num(k[0])):
        dropped = t("ecserve_moe_dropped_tokens_total", layer=layer)
        ept = _mean(snap, "ecserve_moe_experts_per_token", layer=layer)
        lines.append(
            f"layer {layer}: dropped {_fmt(dropped)}/{_fmt(routed[(layer,)])}"
            f" ({_fmt(_ratio(dropped, routed[(layer,)]), '.1f', 100)}%)"
            f"  experts/token {_fmt(ept, '.2f')}")
    return lines


def render(snap: Snapshot, previous: Snapshot | None = None, seconds: float = 0.0) -> str:
    """The header and the per-expert (or, in aggregate mode, per-layer) table, as text."""
    tokens = snap.series("ecserve_expert_tokens_total")
    per_expert = any("expert" in dict(k) for k in tokens)
    keys = ["layer", "expert"] if per_expert else ["layer"]
    rate = previous is not None and seconds > 0
    cols = [*(f"{k:>6}" for k in keys), f"{'tokens':>10}", f"{'util%':>7}", f"{'gate':>6}",
            f"{'p50 ms':>8}", f"{'mean ms':>8}", *([f"{'tok/s':>9}"] if rate else [])]
    lines = [*header(snap), "", " ".join(cols)]
    if not tokens:
        lines.append("(no per-expert metrics: server runs with --expert-metrics off)")
    rows = snap.by("ecserve_expert_tokens_total", keys)
    for key in sorted(rows, key=lambda k: tuple(_num(x) for x in k)):
        lab = dict(zip(keys, key, strict=True))
        n = rows[key]
        secs = "ecserve_expert_compute_seconds"
        util = _ratio(n, snap.total("ecserve_expert_capacity_slots_total", **lab))
        gate = _ratio(snap.total("ecserve_expert_gate_weight_total", **lab), n)
        cells = [*(f"{x:>6}" for x in key), f"{n:>10.0f}", f"{_fmt(util, '.1f', 100):>7}",
                 f"{_fmt(gate, '.3f'):>6}",
                 f"{_fmt(quantile(0.5, snap.buckets(secs, **lab)), '.3f', 1e3):>8}",
                 f"{_fmt(_mean(snap, secs, **lab), '.3f', 1e3):>8}"]
        if rate:
            before = previous.total("ecserve_expert_tokens_total", **lab) or 0.0
            cells.append(f"{(n - before) / seconds:>9.1f}")
        lines.append(" ".join(cells))
    return "\n".join(lines) + "\n"


def run(url: str, interval: float = 2.0, iterations: int | None = None,
        out: TextIO | None = None, timeout: float = 5.0) -> int:
    """Scrape and print `iterations` times (None: until Ctrl-C), `interval` seconds apart."""
    out = out or sys.stdout
    clear = out.isatty()
    previous: Snapshot | None = None
    done = 0
    try:
        while iterations is None or done < iterations:
            if done:
                time.sleep(interval)
            snap = scrape(url, timeout)
            seconds = snap.time - previous.time if previous is not None else 0.0
            text = render(snap, previous, seconds)
            out.write(("\x1b[H\x1b[2J" if clear else "") + f"ecserve top  {url}\n\n" + text)
            out.flush()
            previous, done = snap, done + 1
    except KeyboardInterrupt:
        pass
    return 0
