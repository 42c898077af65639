"""matplotlib figures for ``bench paper``, drawn from the same dicts that are written as JSON."""

from __future__ import annotations

import os

MARKERS = {"recompute": "s", "sync": "^", "thread": "o", "offload": "D"}
LABELS = {"recompute": "recompute", "sync": "sync (CacheGen-Sync)", "thread": "thread (CacheGen-Async)",
          "offload": "offload (ShadowServe)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _lines(ax, fig: dict, x: str, y: str) -> None:
    for mode, pts in fig["modes"].items():
        pts = [p for p in pts if p.get(y) is not None]
        ax.plot([p[x] for p in pts], [p[y] for p in pts], marker=MARKERS.get(mode, "."), label=LABELS.get(mode, mode))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plain_ticks(ax, xs) -> None:
    ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
    ax.minorticks_off()


def ttft_vs_bandwidth(fig: dict, path: str) -> None:
    plt = _plt()
    f, ax = plt.subplots(figsize=(5, 3.6))
    _lines(ax, fig, "bandwidth_gbps", "mean_ttft_ms")
    ax.set_xscale("log")
    ax.set_yscale("log")  # recompute is 10-30x above the fetch modes
    _plain_ticks(ax, [p["bandwidth_gbps"] for pts in fig["modes"].values() for p in pts])
    ax.set_xlabel("link bandwidth (Gbit/s)")
    ax.set_ylabel("mean TTFT (ms, log)")
    ax.set_title(f"TTFT vs bandwidth ({fig['request_rate']:g} req/s)", fontsize=10)
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)


def tpot_vs_rate(fig: dict, path: str) -> None:
    plt = _plt()
    f, ax = plt.subplots(figsize=(5, 3.6))
    _lines(ax, fig, "request_rate", "mean_tpot_ms")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("mean TPOT (ms)")
    ax.set_title(f"Loaded TPOT vs request rate ({fig['bandwidth_gbps']:g} Gbit/s)", fontsize=10)
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)


def throughput_vs_bandwidth(fig: dict, path: str) -> None:
    plt = _plt()
    f, ax = plt.subplots(figsize=(5, 3.6))
    _lines(ax, fig, "bandwidth_gbps", "max_rate_meeting_slo")
    ax.set_xscale("log")
    _plain_ticks(ax, [p["bandwidth_gbps"] for pts in fig["modes"].values() for p in pts])
    ax.set_xlabel("link bandwidth (Gbit/s)")
    ax.set_ylabel("max request rate meeting SLOs (req/s)")
    slo = ", ".join(f"{k} {v:g} ms" for k, v in fig["slos_ms"].items())
    ax.set_title(f"Throughput vs bandwidth ({fig['target_attainment']:.0%} within {slo})", fontsize=9)
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)


def stages(fig: dict, path: str) -> None:
    """Left: each stage alone vs inside the pipeline, and the pipeline itself; right: buffers over time."""
    plt = _plt()
    f, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = fig["path"]
    xs = range(len(names))
    a1.bar([x - 0.2 for x in xs], [fig["alone"][s]["gbps"] for s in names], 0.4, label="alone")
    a1.bar([x + 0.2 for x in xs], [fig["inside"][s]["gbps"] for s in names], 0.4, label="inside the pipeline")
    a1.axhline(fig["pipelined"]["gbps"], color="k", ls="--", lw=1,
               label=f"pipeline: {fig['efficiency']:.0%} of slowest alone")
    a1.set_xticks(list(xs), names)
    a1.set_ylabel("Gbit/s of compressed chunks")
    a1.legend(fontsize=7, loc="upper right")
    a1.set_title(f"Stage throughput (data-plane cores {fig['dataplane_cores']})", fontsize=9)
    tl = fig["timeline"]
    for pool, info in fig["buffers"].items():
        a2.plot([p["t"] for p in tl], [p["in_use"][pool] / info["slots"] for p in tl], drawstyle="steps-post",
                marker="." if len(tl) < 20 else None, label=f"{pool} (mean {info['mean_occupancy']:.0%})")
    a2.set_xlabel("seconds")
    a2.set_ylabel("slots in use (fraction)")
    a2.set_ylim(-0.05, 1.05)
    a2.legend(fontsize=7)
    a2.set_title("Buffer occupancy over the run", fontsize=9)
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)


def draw_all(figures: dict[str, dict], out_dir: str) -> list[str]:
    """One PNG per figure that has data; returns the paths written."""
    drawers = {"ttft_vs_bandwidth": ttft_vs_bandwidth, "tpot_vs_rate": tpot_vs_rate,
               "throughput_vs_bandwidth": throughput_vs_bandwidth, "stages": stages}
    paths = []
    for name, fig in figures.items():
        if name in drawers and fig:
            path = os.path.join(out_dir, f"{name}.png")
            drawers[name](fig, path)
            paths.append(path)
    return paths
