"""Tables and plots of a run."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from sls._io import atomic_write, write_text


def scores_csv(scores: np.ndarray, threshold: float, depth: int) -> str:
    """CSV text: one row per block with its score, whether it passes T, whether it is kept
    (score and pass left empty for a block not scored: None or NaN)."""
    lines = ["block,score,passes_threshold,kept"]
    for block, score in enumerate(_floats(scores), start=1):
        if math.isnan(score):
            lines.append(f"{block},,,{int(block <= depth)}")
        else:
            lines.append(f"{block},{score:.6f},{int(score >= threshold)},{int(block <= depth)}")
    return "\n".join(lines) + "\n"


def _floats(values) -> np.ndarray:
    """Scores as floats, a block not scored (None) as NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def write_scores_csv(path: str | Path, scores: np.ndarray, threshold: float, depth: int) -> Path:
    return write_text(path, scores_csv(scores, threshold, depth))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def _draw_scores(ax, scores, threshold, depth, *, std=None, title="", ylabel="score") -> None:
    scores = _floats(scores)
    std = None if std is None else np.nan_to_num(_floats(std))
    blocks = np.arange(1, len(scores) + 1)
    colors = ["tab:blue" if b <= depth else "tab:gray" for b in blocks]
    ax.bar(blocks, scores, color=colors, alpha=0.35, width=0.7)
    ax.errorbar(blocks, scores, yerr=std, fmt="o-", color="tab:blue", capsize=3, label="score per block")
    ax.axhline(threshold, color="tab:red", linestyle="--", label=f"threshold T = {threshold:.3f}")
    ax.axvline(depth + 0.5, color="black", linestyle=":", label=f"k = {depth} (blocks > k dropped)")
    unscored = blocks[np.isnan(scores)]
    if unscored.size:  # left out by the lazy walk: the rule never reads them
        low = np.nanmin(scores) if np.isfinite(scores).any() else 0.0
        for block in unscored:
            ax.text(block, low, "not\nscored", ha="center", va="bottom", fontsize=6, color="tab:gray")
    ax.set_xticks(blocks)
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=7)


def plot_scores(
    path: str | Path,
    scores: np.ndarray,
    threshold: float,
    depth: int,
    *,
    std: np.ndarray | None = None,
    title: str = "",
    ylabel: str = "t-SNE silhouette (SLS score)",
) -> Path:
    """Score per block, the threshold line and the chosen k, as a PNG."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 3.8), dpi=120)
    _draw_scores(ax, scores, threshold, depth, std=std, title=title, ylabel=ylabel)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_criteria(path: str | Path, results: list[dict]) -> Path:
    """One panel per criterion: scores (mean +- std over seeds), threshold, k."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(results), 1, figsize=(6.4, 3.2 * len(results)), dpi=110, squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        _draw_scores(ax, np.array(res["scores"]), res["threshold"], res["depth"], std=np.array(res["scores_std"]),
                     title=f"{res['criterion']}: k = {res['depth']}", ylabel=res["label"])  # fmt: skip
    fig.tight_layout()
    return _save_png(fig, path)


def plot_embeddings(path: str | Path, embeddings: list[np.ndarray], labels: np.ndarray, scores, *, depth: int,
                    classes: list[str] | None = None) -> Path:  # fmt: skip
    """Grid of per-block 2-D t-SNE scatter plots coloured by class, with each block's score."""
    plt = _pyplot()
    n = len(embeddings)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), dpi=100, squeeze=False)
    cmap = plt.get_cmap("tab10" if len(np.unique(labels)) <= 10 else "tab20")
    for block, ax in enumerate(axes.flat, start=1):
        ax.set_xticks([])
        ax.set_yticks([])
        if block > n:
            ax.axis("off")
            continue
        points = embeddings[block - 1]
        ax.scatter(points[:, 0], points[:, 1], c=cmap(labels % cmap.N), s=3, linewidths=0)
        kept = "kept" if block <= depth else "dropped"
        ax.set_title(f"block {block}: {scores[block - 1]:.3f} ({kept})", fontsize=8)
    if classes is not None and len(classes) <= 20:
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=cmap(i), markersize=4) for i in range(len(classes))]
        fig.legend(handles, classes, loc="lower center", ncol=min(len(classes), 10), fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save_png(fig, path)


_COMPARE_STYLES = {"full": ("black", "s", "full model"), "sls": ("tab:blue", "o", "SLS (depth k)"),
                   "depgraph": ("tab:orange", "^", "DepGraph (width ratio r)")}  # fmt: skip


def annotate_apart(ax, points: list[tuple[float, float, str]], *, fontsize: float = 6) -> list:
    """Label each ``(x, y, text)`` point just above and right of it; a label that would
    overlap one placed before moves down a line at a time, with a thin leader line
    back to its point. Top labels are placed first. Returns the annotations."""
    ax.autoscale_view()
    renderer = ax.figure.canvas.get_renderer()
    placed, labels = [], []
    for x, y, text in sorted(points, key=lambda p: (-p[1], p[0])):
        label = ax.annotate(text, (x, y), fontsize=fontsize, xytext=(4, 3), textcoords="offset points")
        dy = 3.0
        while any(label.get_window_extent(renderer).overlaps(box) for box in placed):
            dy -= 1.25 * fontsize
            label.xyann = (4, dy)
        if dy < 3.0:
            ax.annotate("", (x, y), xytext=(4, dy + 0.4 * fontsize), textcoords="offset points",
                        arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5"))  # fmt: skip
        placed.append(label.get_window_extent(renderer))
        labels.append(label)
    return labels


def plot_compare(path: str | Path, rows: list[dict], *, title: str = "", metric: str = "accuracy") -> Path:
    """The test ``metric`` (the task's: accuracy, mIoU, mAP; each row's ``accuracy``)
    against measured throughput, one labelled point per model of
    :func:`sls.compare.compare`; filled markers were retrained after pruning, hollow ones not."""
    fig, ax = _pyplot().subplots(figsize=(7.2, 4.6), dpi=120)
    for method, (color, marker, label) in _COMPARE_STYLES.items():
        chosen = [row for row in rows if row["method"] == method]
        for i, row in enumerate(chosen):
            face = color if row["retrained"] or method == "full" else "none"
            ax.scatter(row["throughput"], 100 * row["accuracy"], marker=marker, edgecolors=color, facecolors=face,
                       s=36, label=label if i == 0 else None)  # fmt: skip
    annotate_apart(ax, [(row["throughput"], 100 * row["accuracy"], row["model"]) for row in rows])
    ax.set_xlabel("throughput (images/s, deployable models, one timing run)")
    ax.set_ylabel(f"test {metric} (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7, title="hollow: not retrained", title_fontsize=7)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_budget(path: str | Path, search: dict, *, title: str = "") -> Path:
    """Validation accuracy against throughput of every depth the ``--max-drop`` search
    tried (a record's ``budget_search``), the full model, the budget line and the chosen k."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 4.2), dpi=120)
    full = search["full"]
    points = sorted(search["tried"], key=lambda row: row["depth"])
    curve = [*points, full]  # by depth, the full model last
    ax.plot([p["throughput"] for p in curve], [100 * p["val_accuracy"] for p in curve], ":", color="tab:gray")
    for row in points:
        color = "tab:blue" if row["within_budget"] else "tab:red"
        ax.scatter(row["throughput"], 100 * row["val_accuracy"], color=color, s=30, zorder=3)
        ax.annotate(f"k={row['depth']}", (row["throughput"], 100 * row["val_accuracy"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.scatter(full["throughput"], 100 * full["val_accuracy"], marker="s", color="black", s=36, zorder=3,
               label=f"full model (k={full['depth']})")  # fmt: skip
    floor = 100 * full["val_accuracy"] - search["max_drop_points"]
    ax.axhline(floor, color="tab:red", linestyle="--", label=f"budget: {search['max_drop_points']:g} points below full")
    chosen = next((row for row in points if row["depth"] == search["chosen_depth"]), full)
    ax.scatter(chosen["throughput"], 100 * chosen["val_accuracy"], s=160, facecolors="none", edgecolors="tab:green",
               linewidths=2, zorder=4, label=f"chosen k = {chosen['depth']}")  # fmt: skip
    ax.set_xlabel(f"throughput (images/s, batch {search['throughput_batch']}, one timing run)")
    ax.set_ylabel(f"validation accuracy (%, {search['val_images']} images)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7, title="blue: within budget, red: not", title_fontsize=7)
    fig.tight_layout()
    return _save_png(fig, path)


def depth_distribution(depths: list[int]) -> str:
    """``"k=8 x3, k=7 x2"``: how often each k came out over the seeds."""
    values, counts = np.unique(np.asarray(depths), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return ", ".join(f"k={values[i]} x{counts[i]}" for i in order)


def scores_line(record: dict) -> str:
    """``"sls scores, blocks 1..N: ...; T = ...; k = K of N blocks"`` for a pruned task's record."""
    scores = " ".join("-" if v is None else f"{v:.3f}" for v in record["scores"])
    return (f"{record.get('criterion', 'sls')} scores, blocks 1..{len(record['scores'])}: {scores}; "
            f"T = {record['threshold']:.3f}; k = {record['depth']} of {record['backbone']['num_blocks']} blocks")


def selection_notes(record: dict) -> list[str]:
    """What a person should know about how firmly the rule chose k: its margin to T,
    and blocks under the stop that pass T again."""
    notes = []
    if record.get("selection_margin") is not None:
        notes.append(f"margin to T: {record['selection_margin']:.3f} (the closer of the stopping block and the "
                     "lowest kept block)")  # fmt: skip
    passing = record.get("passing_below") or []
    if passing:
        notes.append(f"note: block(s) {', '.join(map(str, passing))} under the stop pass T again (non-monotone "
                     f"scores); the rule keeps blocks 1..{record['selected_depth']} as the paper's does")  # fmt: skip
    return notes


def summary_rows(record: dict) -> list[tuple[str, str, str]]:
    """(quantity, full model, pruned model) rows of a run's record."""
    res = record["results"]
    n_blocks = record["backbone"]["num_blocks"]
    depth = record["depth"]
    speedup = res["throughput"]["pruned"] / res["throughput"]["full"]
    if record.get("config", {}).get("depth") is not None:
        chosen = f"given; SLS chose {record['selected_depth']}" if "selected_depth" in record else "given"
    elif "budget_search" in record:
        chosen = f"--max-drop; SLS chose {record['budget_search']['start_depth']}"
    else:
        chosen = f"k, alpha={record['alpha']:g}"
    rows = [
        ("blocks", str(n_blocks), f"{depth}  ({chosen})"),
        ("parameters", f"{res['parameters']['full'] / 1e6:.2f} M", f"{res['parameters']['pruned'] / 1e6:.2f} M"),
        (f"test {metric_name(record)}", f"{100 * res['accuracy']['full']:.1f}%", f"{100 * res['accuracy']['pruned_no_retrain']:.1f}% before retraining"),
    ]
    if res["accuracy"].get("pruned_retrained") is not None:
        strategy = record.get("retrain_strategy")
        how = f" ({strategy}, {record['retrain_epochs']} epoch(s))" if strategy else ""
        rows.append(("", "", f"{100 * res['accuracy']['pruned_retrained']:.1f}% after retraining{how}"))
    metrics = res.get("metrics", {})
    after = metrics.get("pruned_retrained") or metrics.get("pruned_no_retrain") or {}
    for key, label in (("mAP50", "test mAP@50"), ("pixel_accuracy", "test pixel accuracy")):
        if key in (metrics.get("full") or {}):
            rows.append((label, f"{100 * metrics['full'][key]:.1f}%", f"{100 * after[key]:.1f}%" if key in after else ""))
    per_seed = record.get("depths_per_seed", [])
    if len(per_seed) > 1:
        rows.insert(1, (f"k over {len(per_seed)} t-SNE starts", "", depth_distribution(per_seed)))
    per_alpha = record.get("depth_per_alpha", [])
    if len(per_alpha) > 1:
        rows.insert(1, ("k per alpha", "", ", ".join(f"alpha={row['alpha']:g}: k={row['depth']}" for row in per_alpha)))
    search = record.get("budget_search")
    if search:
        rows.insert(1, (f"--max-drop {search['max_drop_points']:g}", "",
                        f"k = {search['chosen_depth']} (SLS's k = {search['start_depth']}); {len(search['tried'])} "
                        f"depth(s) tried on {search['val_images']} validation images"))  # fmt: skip
    rows.insert(0, ("data", "", data_line(record)))
    rows += [
        (
            f"throughput (batch {res['throughput']['batch_size']})",
            f"{res['throughput']['full']:.1f} img/s",
            f"{res['throughput']['pruned']:.1f} img/s  ({speedup:.2f}x)",
        ),
    ]
    figures = res.get("measurements")
    if figures:
        full, pruned = figures["full"], figures["pruned"]
        rows.append(("GFLOPs per image", f"{full['flops'] / 1e9:.2f}",
                     f"{pruned['flops'] / 1e9:.2f}  ({full['flops'] / pruned['flops']:.2f}x fewer)"))  # fmt: skip
        if "latency_ms" in full:
            rows.append(("latency (batch 1, p50 / p99)", f"{full['latency_ms']['p50']:.1f} / {full['latency_ms']['p99']:.1f} ms",
                         f"{pruned['latency_ms']['p50']:.1f} / {pruned['latency_ms']['p99']:.1f} ms  "
                         f"({full['latency_ms']['p50'] / pruned['latency_ms']['p50']:.2f}x)"))  # fmt: skip
    rows.append(("task storage", "", f"{res['storage_bytes']['task'] / 1e3:.1f} kB (PETL + head + k)"))
    return rows


def metric_name(record: dict) -> str:
    """What ``results.accuracy`` holds: the task's primary metric (accuracy for classification)."""
    return record.get("results", {}).get("metric", "accuracy")


def data_line(record: dict) -> str:
    """``"2000 train / 1000 test images at 84 px; fine-tune 2 epochs (126 steps), retrain 2"``."""
    splits = record.get("data", {}).get("splits", {})
    counts = {name: splits.get(name, {}).get("size", splits.get(name)) for name in ("train", "test")}
    resolved = record.get("resolved") or {}
    size = resolved.get("img_size", record["backbone"].get("img_size"))
    epochs = resolved.get("epochs", record.get("config", {}).get("epochs"))
    steps = ""
    batch = record.get("config", {}).get("batch_size")
    if isinstance(counts["train"], int) and batch:
        steps = f" ({epochs * -(-counts['train'] // batch)} steps)"
    retrain = record.get("retrain_epochs", resolved.get("retrain_epochs"))
    if not record.get("config", {}).get("retrain", True):
        retrain = None
    return (f"{counts['train']} train / {counts['test']} test images at {size} px; fine-tune {epochs} epoch(s)"
            f"{steps}" + (f", retrain {retrain}" if retrain else ""))


def run_notes(record: dict) -> list[str]:
    """Warnings a person must see about a run: a fine-tune that looks failed."""
    check = record.get("finetune_check")
    if check and not check["ok"]:
        return [f"warning: the fine-tune looks failed: {'; '.join(check['problems'])}"]
    return []


def plot_training(path: str | Path, training: dict, *, title: str = "", metric: str = "accuracy") -> Path:
    """Loss (left) and the validation ``metric`` (right) per epoch of each training stage."""
    fig, (loss_ax, acc_ax) = _pyplot().subplots(1, 2, figsize=(8.4, 3.4), dpi=110)
    for stage, rows in training.items():
        epochs = [row["epoch"] for row in rows]
        loss_ax.plot(epochs, [row["loss"] for row in rows], marker="o", markersize=3, label=stage)
        val = [(row["epoch"], 100 * row["val_accuracy"]) for row in rows if row.get("val_accuracy") is not None]
        if val:
            acc_ax.plot(*zip(*val), marker="o", markersize=3, label=stage)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("mean training loss")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel(f"validation {metric} (%)")
    if not acc_ax.lines:
        acc_ax.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=acc_ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    for axis in (loss_ax, acc_ax):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save_png(fig, path)


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
