"""The suite's speed-up chart: ``plot_speedups(document, path)`` writes a PNG with matplotlib (Agg).

One panel per kernel; along the x axis the kernel's cases (sizes), and at each case one bar per
peer: fastppo's speed-up over that peer, peer time / fastppo time, on a log scale. Bars start at
1 (as fast as fastppo): a bar going up means fastppo is faster, one going down that the peer is.
Peers that were skipped are listed under the panel's title with the reason.
"""

from __future__ import annotations

from pathlib import Path


def peer_series(rows):
    """``{(peer, vs): [speed-up or None for each row]}``, peers in the order they first appear."""
    series = {}
    for i, row in enumerate(rows):
        for entry in row["peers"]:
            key = (entry["name"], entry["vs"])
            series.setdefault(key, [None] * len(rows))[i] = entry.get("speedup")
    return series


def skipped_peers(rows):
    """``{peer: reason}`` for peers skipped at every case of a kernel (a reason per peer, the first seen)."""
    reasons = {}
    for row in rows:
        for entry in row["peers"]:
            if "skipped" in entry:
                reasons.setdefault(entry["name"], entry["skipped"])
    measured = {entry["name"] for row in rows for entry in row["peers"] if "median_ms" in entry}
    return {name: reason for name, reason in reasons.items() if name not in measured}


def plot_speedups(document, path):
    """Writes the speed-up chart of a suite results document (see suite.py) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    kernels = list(dict.fromkeys(row["kernel"] for row in document["rows"]))
    fig, axes = plt.subplots(len(kernels), 1, figsize=(13, 3.6 * len(kernels)), squeeze=False)
    for ax, kernel in zip(axes[:, 0], kernels):
        rows = [row for row in document["rows"] if row["kernel"] == kernel]
        series = {key: values for key, values in peer_series(rows).items() if any(v is not None for v in values)}
        several_fastppo = len({vs for _, vs in series}) > 1  # then each label says which fastppo it divides by
        width = 0.8 / max(len(series), 1)
        every_value = [1.0]
        for i, ((name, vs), values) in enumerate(series.items()):
            offset = (i - (len(series) - 1) / 2) * width
            xs = [j + offset for j, v in enumerate(values) if v is not None]
            ys = [v for v in values if v is not None]
            every_value += ys
            label = f"{name} / {vs}" if several_fastppo else name
            bars = ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=label)
            ax.bar_label(bars, labels=[f"{y:.0f}" if y >= 100 else f"{y:.3g}" for y in ys], fontsize=7, padding=2)
        ax.axhline(1, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(min(every_value) / 2, max(every_value) * 3)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(rows)), [row["case"] for row in rows])
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylabel("speed-up (peer / fastppo)")
        title = f"fastppo.{kernel}"
        skipped = skipped_peers(rows)
        if skipped:
            title += "\nnot measured: " + "; ".join(f"{name} ({reason})" for name, reason in skipped.items())
        ax.set_title(title, fontsize=10)
        if series:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.text(0.5, 0.5, "no peer measured", transform=ax.transAxes, ha="center", va="center")
    mode = document["mode"]
    fig.suptitle(
        f"fastppo's speed-up over each peer, median time per call ({document['device']}"
        + ("" if mode == "full" else f", {mode} run: not a measurement")
        + ")"
    )
    fig.tight_layout()
    fig.savefig(Path(path), dpi=110)
    plt.close(fig)
