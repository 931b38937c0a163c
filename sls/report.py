"""Tables and plots of a run."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from sls._io import atomic_write, write_text


def scores_csv(scores: np.ndarray, threshold: float, depth: int) -> str:
    """CSV text: one row per block with its score, whether it passes T, whether it is kept."""
    lines = ["block,score,passes_threshold,kept"]
    for block, score in enumerate(scores, start=1):
        lines.append(f"{block},{score:.6f},{int(score >= threshold)},{int(block <= depth)}")
    return "\n".join(lines) + "\n"


def write_scores_csv(path: str | Path, scores: np.ndarray, threshold: float, depth: int) -> Path:
    return write_text(path, scores_csv(scores, threshold, depth))


def plot_scores(
    path: str | Path,
    scores: np.ndarray,
    threshold: float,
    depth: int,
    *,
    title: str = "",
    ylabel: str = "t-SNE silhouette (SLS score)",
) -> Path:
    """Score per block, the threshold line and the chosen k, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = np.arange(1, len(scores) + 1)
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    colors = ["tab:blue" if b <= depth else "tab:gray" for b in blocks]
    ax.bar(blocks, scores, color=colors, alpha=0.35, width=0.7)
    ax.plot(blocks, scores, "o-", color="tab:blue", label="score per block")
    ax.axhline(threshold, color="tab:red", linestyle="--", label=f"threshold T = {threshold:.3f}")
    ax.axvline(depth + 0.5, color="black", linestyle=":", label=f"k = {depth} (blocks > k dropped)")
    ax.set_xticks(blocks)
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def summary_rows(record: dict) -> list[tuple[str, str, str]]:
    """(quantity, full model, pruned model) rows of a run's record."""
    res = record["results"]
    n_blocks = record["backbone"]["num_blocks"]
    depth = record["depth"]
    speedup = res["throughput"]["pruned"] / res["throughput"]["full"]
    rows = [
        ("blocks", str(n_blocks), f"{depth}  (k, alpha={record['alpha']:g})"),
        ("parameters", f"{res['parameters']['full'] / 1e6:.2f} M", f"{res['parameters']['pruned'] / 1e6:.2f} M"),
        ("test accuracy", f"{100 * res['accuracy']['full']:.1f}%", f"{100 * res['accuracy']['pruned_no_retrain']:.1f}% before retraining"),
    ]
    if res["accuracy"].get("pruned_retrained") is not None:
        rows.append(("", "", f"{100 * res['accuracy']['pruned_retrained']:.1f}% after retraining"))
    rows += [
        (
            f"throughput (batch {res['throughput']['batch_size']})",
            f"{res['throughput']['full']:.1f} img/s",
            f"{res['throughput']['pruned']:.1f} img/s  ({speedup:.2f}x)",
        ),
        ("task storage", "", f"{res['storage_bytes']['task'] / 1e3:.1f} kB (PETL + head + k)"),
    ]
    return rows


def print_summary(record: dict) -> None:
    """Print the summary table of a run to the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SLS on {record['data']['name']} with {record['backbone']['model']} + {record['petl']['method']}")
    for column in ("", "full model", "pruned model"):
        table.add_column(column)
    for row in summary_rows(record):
        table.add_row(*row)
    Console().print(table)
