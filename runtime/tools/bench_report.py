"""`nanogpt-deploy bench`'s output: one flat row per (target, case), the text table, the PNG plot.

    print(format_table(report)); plot_report(report, "bench.png")
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .bench import BenchError, Case


def rows(report: dict) -> list[dict]:
    """One flat row per (target, case): what the table, the JSON consumer and the plot read."""
    out = []
    for r in report["results"]:
        for c in r["cases"]:
            row = {"target": r["label"], **c["case"], "peak_rss_mb": r["peak_rss_mb"]}
            row.update({k: v for k, v in c.items() if k not in ("case", "step_latency_ms")})
            out.append(row)
    return out


def format_table(report: dict) -> str:
    """The text table: one aligned row per (target, case); a skipped case keeps the key columns aligned and gives
    its reason in place of the numbers."""
    head = ("target", "batch", "prompt", "new", "TTFT ms", "decode tok/s", "p50 ms", "p95 ms", "e2e tok/s",
            "peak RSS MB", "guesses accepted")
    lines = []
    for r in rows(report):
        key = (r["target"], r["batch"], r["prompt"], r["new"])
        if "skipped" in r:
            lines.append((*key, "skipped: " + r["skipped"]))
            continue
        f = lambda k, spec, r=r: format(r[k], spec) if k in r else "-"  # noqa: E731
        lines.append((*key, f("ttft_ms", ".1f"), f("decode_tok_s", ".1f"),
                      f("latency_p50_ms", ".2f"), f("latency_p95_ms", ".2f"), f("e2e_tok_s", ".1f"),
                      f"{r['peak_rss_mb']:.0f}",
                      f"{r['speculative']['acceptance']:.0%}, {r['speculative']['tokens_per_target_step']:.2f}/step, "
                      + ("tokens = target" if r["speculative"]["same_tokens_as_target"] else "TOKENS DIFFER")
                      if "speculative" in r else "-"))
    # widths from the header and the measured rows; a skip row's reason runs on past the key columns
    measured = [head] + [ln for ln in lines if len(ln) == len(head)]
    widths = [max(len(str(x[i])) for x in measured + ([ln[:4] for ln in lines] if i < 4 else []))
              for i in range(len(head))]

    def fmt(cells):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(head)] + [fmt(ln) if len(ln) == len(head) else fmt(ln[:4]) + "  " + ln[4] for ln in lines])


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'nanogpt-deploy[bench]'") from None
    return plt


def check_plot_path(path: str | os.PathLike) -> Path:
    """The --plot path, refused before any timing when it cannot be written: matplotlib missing, a suffix it cannot
    write, or no writable folder to put it in (missing folders are created when the plot is written)."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path).expanduser()
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.is_dir():
        raise BenchError(f"--plot {path} is a folder; give a file name such as {path / 'bench.png'}")
    if path.suffix.lower().lstrip(".") not in formats:
        raise BenchError(f"--plot {path}: {repr(path.suffix) if path.suffix else 'a name without a suffix'} is not an "
                         "image format matplotlib writes; end the name in .png (or "
                         f".{', .'.join(sorted(set(formats) - {'png'}))})")
    folder = next(d for d in (path.absolute().parent, *path.absolute().parent.parents) if d.exists())
    try:
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise BenchError(f"--plot {path}: cannot write in {folder} ({e.strerror or e}); give a path in a writable "
                         f"folder") from None
    return path


def plot_report(report: dict, path: str | os.PathLike) -> Path:
    """PNG: decode tokens/s against context length per target (left, legend below), latency p50/p95 per (target,
    case) as horizontal bars on a log axis (right), so one slow case does not flatten the others."""
    plt = _pyplot()
    series, bars, styles = [], [], ("-", "--", ":", "-.")
    for i, r in enumerate(report["results"]):  # one color per target, one line style per case
        for j, c in enumerate(r["cases"]):
            steps = c.get("step_latency_ms")
            if not steps:
                continue
            case = Case(**c["case"])
            ms = np.array(steps)
            k = min(8, len(ms))  # smooth over 8 steps: single steps are noisy
            ms = np.convolve(ms, np.ones(k) / k, mode="valid")
            ctx = case.prompt + 1 + np.arange(len(ms)) + (k - 1) / 2
            series.append((ctx, case.batch * 1e3 / ms, f"C{i % 10}", styles[j % len(styles)],
                           f"{r['label']} {case.label}"))
            bars.append((f"{r['label']}  {case.label}", c["latency_p50_ms"], c["latency_p95_ms"]))
    legend_rows = -(-len(series) // 2)  # two columns below the plots
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5 + 0.25 * max(len(bars), legend_rows)),
                                   gridspec_kw={"width_ratios": [1.2, 1]})
    for ctx, tok_s, color, style, label in series:
        ax1.plot(ctx, tok_s, color=color, linestyle=style, label=label)
    ax1.set(xlabel="context length (tokens in the KV cache)", ylabel="decode tokens/s (batch x 1 / step latency)",
            title="decode throughput vs context")
    ax1.grid(alpha=0.3)
    if bars:
        y = np.arange(len(bars))[::-1]  # the first case on top
        ax2.barh(y + 0.2, [b[1] for b in bars], 0.4, label="p50")
        ax2.barh(y - 0.2, [b[2] for b in bars], 0.4, label="p95")
        ax2.set_yticks(y, [b[0] for b in bars], fontsize=9)
        ax2.set_xscale("log")
        ax2.grid(alpha=0.3, axis="x", which="both")
        ax2.legend(loc="upper right", bbox_to_anchor=(1, -0.12), ncol=2, fontsize=9, frameon=False)  # below: no bar hidden
        fig.legend(*ax1.get_legend_handles_labels(), loc="lower left", ncol=2, fontsize=9, frameon=False,
                   bbox_to_anchor=(0.02, 0))
    ax2.set(xlabel="per-token decode latency, ms (log scale)", title="decode latency percentiles")
    m = report.get("machine", {})
    fig.suptitle(f"{m.get('cpu', '')}, {report['settings'].get('threads') or 'default'} threads", fontsize=10)
    # room below the panels for the legend: its rows in inches, as a fraction of the figure's height
    fig.tight_layout(rect=(0, min(0.5, (0.3 + 0.22 * legend_rows) / fig.get_figheight()), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
