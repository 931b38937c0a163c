"""Many tasks in one command: ``sls sweep CONFIG.yaml``.

A sweep file (YAML) lists tasks; each runs :func:`sls.stages.run` into
``<out>/<task name>/``, and a summary of all of them is written beside::

    out: runs/vtab                # default: runs/<file name without .yaml>
    data_root: ~/vtab-1k          # a task's relative ``data`` (not an embedded set) is under it
    defaults:                     # RunConfig fields shared by every task
      model: vit_base_patch16_224
      weights: ViT-B_16.npz
      recipe: vtab                # the paper's training recipe and per-task scales (sls.recipes)
    methods:                      # optional: every task runs once per method
      - {name: repadapter, petl: repadapter}
      - {name: convpass, petl: convpass}
    tasks: vtab-1k                # the 19 VTAB-1k tasks, or a list:
    # tasks:
    #   - cifar                               # data = name = cifar
    #   - {data: dtd, petl_options: {scale: 10}}
    #   - {name: my-set, data: /data/my-set, group: specialized}

A task's settings are ``defaults``, then its method's, then its own, each replacing
the previous (``petl_options`` and ``retrain_options`` are merged key by key). A
``recipe`` (:mod:`sls.recipes`, e.g. ``recipe: vtab`` in ``defaults``) fills in what
none of them sets, the per-task Convpass / RepAdapter scale included. Its
name is its ``name`` (else the last part of its ``data``), plus ``-<method>`` with
methods; its group is its ``group``, else the VTAB-1k group of its name
(:func:`vtab_group`), else ``other``.

Running again skips the tasks whose folder holds a complete run with the same
settings and resumes the interrupted ones (:func:`sls.stages.run`). A task that
fails (a user error, or any other exception such as CUDA running out of memory, whose
traceback is printed) is reported, its error kept in ``<task>/failed.json`` (so every
shard's summary lists it, until a re-run finishes it), and the sweep goes on; the exit
status says some failed, and running again retries only failed and unfinished tasks.
A task another process is writing (an overlapping shard) is left to it: ``busy``.
``shard=(i, n)`` runs tasks i, i+n, i+2n, ... only, so n machines or GPUs can share a
sweep; the summary always covers every task whose folder is complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from sls import distributed
from sls._io import atomic_write, write_json, write_text
from sls._lock import describe_holder, folder_lock, holder
from sls.config import RunConfig, config_fields, read_yaml, settings_from_mapping
from sls.data import EMBEDDED_DATASETS
from sls.errors import ConfigError, FolderLockedError, SLSError, TaskRecordError
from sls.recipes import apply_recipe
from sls.record import RECORD_FILE, read_record
from sls.stages import changed_settings, run
from sls.vtab import GROUPS, VTAB1K_GROUPS, vtab_group

_TASK_KEYS = ("name", "group")
_NOT_PER_TASK = ("out", "progress")  # the sweep sets them
_TOP_KEYS = ("out", "data_root", "defaults", "methods", "tasks")
FAILURE_FILE = "failed.json"
"""In a task folder: the error of the last sweep attempt that failed (gone once it succeeds)."""


@dataclass(frozen=True)
class SweepTask:
    """One task of a sweep: its folder name, VTAB group, method label and settings."""

    name: str
    group: str
    method: str
    config: RunConfig


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: where it writes and its tasks, in file order."""

    source: Path
    out: Path
    tasks: list[SweepTask]


@dataclass
class SweepReport:
    """What one ``sls sweep`` invocation did.

    Attributes:
        ran: tasks run (or resumed) to completion now.
        skipped: tasks already complete with the same settings.
        failed: task name -> the error message.
        busy: task name -> who is writing it (another shard).
        rows: the summary rows (every task, every group), as written to ``summary.csv``.
        files: the summary files written (none for a dry run).
    """

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    busy: dict[str, str] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _settings(entry: dict, where: str, extra: tuple[str, ...]) -> tuple[dict, dict]:
    """Split a YAML mapping into RunConfig settings (checked, converted) and the ``extra`` keys."""
    fields = [name for name in config_fields() if name not in _NOT_PER_TASK]
    return settings_from_mapping(entry, where, allowed=fields, extra=extra)


def _merge(*layers: dict) -> dict:
    merged: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if key in ("petl_options", "retrain_options", "model_kwargs") and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


def _task_name(text: str, where: str) -> str:
    name = str(text)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"{where}: task name {name!r} must be a plain folder name")
    return name


def load_sweep(path: str | Path, *, out: str | Path | None = None, progress: bool = True) -> Sweep:
    """Read and check a sweep file; nothing runs.

    Args:
        path: the YAML file.
        out: the sweep folder, replacing the file's ``out``.
        progress: progress bars in every task's run.
    """
    path = Path(path)
    spec = read_yaml(path, "sweep file")
    unknown = sorted(set(spec) - set(_TOP_KEYS)) if isinstance(spec, dict) else []
    if not isinstance(spec, dict) or unknown or "tasks" not in spec:
        problem = f"unknown key(s) {', '.join(map(str, unknown))}; " if unknown else ""
        raise ConfigError(f"{path}: {problem}a sweep file is a mapping with a 'tasks' list and optional "
                          "defaults, methods, out, data_root")  # fmt: skip
    defaults, _ = _settings(spec.get("defaults") or {}, f"{path}: defaults", ())
    entries = spec["tasks"]
    if isinstance(entries, str) and entries.lower().replace("_", "-") == "vtab-1k":
        entries = list(VTAB1K_GROUPS)
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'tasks' must be a non-empty list, or vtab-1k for the 19 VTAB-1k tasks")
    methods = spec.get("methods") or [None]
    if not isinstance(methods, list):
        raise ConfigError(f"{path}: 'methods' must be a list of mappings with a name")
    data_root = Path(str(spec["data_root"])).expanduser() if spec.get("data_root") else None
    sweep_out = Path(out or spec.get("out") or Path("runs") / path.stem)

    tasks: list[SweepTask] = []
    for index, entry in enumerate(entries):
        where = f"{path}: task {index + 1}"
        if isinstance(entry, str):
            entry = {"data": entry}
        own, extra = _settings(entry, where, _TASK_KEYS)
        for method_entry in methods:
            method_settings, method_extra = {}, {}
            if method_entry is not None:
                method_settings, method_extra = _settings(method_entry, f"{path}: method {method_entry!r}", ("name",))
                if "name" not in method_extra:
                    raise ConfigError(f"{path}: every method needs a name, {method_entry!r} has none")
            settings = _merge(defaults, method_settings, own)
            if "data" not in settings:
                raise ConfigError(f"{where}: no data (give the task, or defaults, a 'data')")
            base = _task_name(extra.get("name") or Path(str(settings["data"]).rstrip("/")).name, where)
            method = str(method_extra.get("name") or settings.get("petl", RunConfig.petl))
            name = f"{base}-{_task_name(method, where)}" if method_entry is not None else base
            group = str(extra.get("group") or vtab_group(base) or vtab_group(settings["data"]) or "other")
            data = str(settings["data"])
            if data_root is not None and data not in EMBEDDED_DATASETS and not Path(data).expanduser().is_absolute():
                settings["data"] = str(data_root / data)
            if settings.get("recipe"):
                try:
                    settings = apply_recipe(settings["recipe"], settings)
                except ConfigError as err:
                    raise ConfigError(f"{where}: {err}") from None
            config = RunConfig(**settings, out=str(sweep_out / name), progress=progress)
            config.validate()
            tasks.append(SweepTask(name=name, group=group, method=method, config=config))
    names = [task.name for task in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{path}: several tasks are named {', '.join(repeated)}; give them distinct 'name's")
    return Sweep(source=path, out=sweep_out, tasks=tasks)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with 0 <= i < n."""
    index, sep, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        shard = None
    if not sep or shard is None or not 0 <= shard[0] < shard[1]:
        raise ConfigError(f"--shard wants I/N with 0 <= I < N (this machine's share of N), got {text!r}")
    return shard


def task_status(task: SweepTask) -> str:
    """``done`` (complete, same settings), ``busy`` (another process is writing it),
    ``failed`` (its last attempt failed), ``partial`` (resumable), ``other settings``
    (a run with other settings is there: it will be refused) or ``new``."""
    folder = Path(task.config.out)
    if holder(folder) is not None:
        return "busy"
    if not (folder / RECORD_FILE).is_file():
        return "failed" if (folder / FAILURE_FILE).is_file() else "new"
    try:
        record = read_record(folder)
    except TaskRecordError:
        return "other settings"
    if changed_settings(task.config, record):
        return "other settings"
    if "evaluate" in record.stages:
        return "done"
    return "failed" if (folder / FAILURE_FILE).is_file() else "partial"


def recorded_failure(task: SweepTask) -> str | None:
    """The error kept by the task's last failed attempt, if any."""
    path = Path(task.config.out) / FAILURE_FILE
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return "failed (its failed.json is unreadable)" if path.exists() else None


def _keep_failure(task: SweepTask, error: str | None) -> None:
    """Write (or, ``None``, remove) the task's failure file, unless another process took the folder."""
    folder = Path(task.config.out)
    try:
        with folder_lock(folder):
            if error is None:
                (folder / FAILURE_FILE).unlink(missing_ok=True)
            else:
                write_json(folder / FAILURE_FILE, {"error": error, "host": socket.gethostname(),
                                                   "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})  # fmt: skip
    except (FolderLockedError, OSError):
        pass


def run_sweep(sweep: Sweep, *, shard: tuple[int, int] = (0, 1), dry_run: bool = False,
              log=print) -> SweepReport:  # fmt: skip
    """Run this shard's tasks in order, then write the summary of the whole sweep.

    Args:
        shard: ``(i, n)``: run tasks i, i+n, ... of the file's list.
        dry_run: only say what would run (``log``), write nothing.
        log: where the one-line messages go (nothing is logged but on the main
            process of a distributed run).

    Returns:
        what ran, what was skipped, what failed, and the summary.
    """
    index, count = shard
    mine = sweep.tasks[index::count]
    report = SweepReport()
    say = log if distributed.is_main() else (lambda message: None)
    for position, task in enumerate(mine, start=1):
        status = distributed.run_on_main(task_status, task)  # one answer for every process
        head = f"[{position}/{len(mine)}] {task.name} ({task.group})"
        if dry_run:
            say(f"{head}: {status}; {task.config.model} + {task.config.petl} on {task.config.data} -> {task.config.out}")
            continue
        if status == "done":
            report.skipped.append(task.name)
            say(f"{head}: already done, skipped")
            continue
        if status == "busy":
            report.busy[task.name] = distributed.run_on_main(lambda: describe_holder(holder(task.config.out) or {}))
            say(f"{head}: being written by {report.busy[task.name]}, left to it")
            continue
        say(f"{head}: {'running' if status == 'new' else 'resuming'}")
        try:
            record = run(task.config)
        except FolderLockedError as err:  # another shard took it in the meantime
            report.busy[task.name] = str(err)
            say(f"{head}: {err}, left to it")
            continue
        except SLSError as err:
            report.failed[task.name] = str(err)
            say(f"{head}: FAILED: {err}")
            distributed.run_on_main(_keep_failure, task, str(err))
            continue
        except Exception as err:  # one task's fault (CUDA out of memory, a bug) must not end the sweep
            if distributed.active():  # ... unless it may have struck one process only: the others would wait forever
                raise
            report.failed[task.name] = f"{type(err).__name__}: {err}"
            say(f"{head}: FAILED ({type(err).__name__}): {err}")
            traceback.print_exc(file=sys.stderr)
            distributed.run_on_main(_keep_failure, task, report.failed[task.name])
            continue
        distributed.run_on_main(_keep_failure, task, None)
        report.ran.append(task.name)
        say(f"{head}: done; {_one_line(_task_row(task, record.to_dict()))}")
    report.rows = distributed.run_on_main(summary_rows, sweep, report.failed)
    if not dry_run:  # overlapping shards take turns writing the summary
        report.files = distributed.run_on_main(_write_summary_locked, sweep, report.rows)
    return report


def _one_line(row: dict) -> str:
    return (f"accuracy {_percent(row['full_accuracy'])} -> {_percent(row['pruned_accuracy'])}, "
            f"k = {row['depth']}/{row['blocks']}, speed-up {_times(row['speedup'])}")  # fmt: skip


def _task_row(task: SweepTask, record: dict | None, status: str = "done", error: str = "") -> dict:
    row = {"level": "task", "method": task.method, "group": task.group, "task": task.name, "status": status,
           "tasks": 1, "full_accuracy": None, "pruned_accuracy": None, "pruned_no_retrain": None, "depth": None,
           "blocks": None, "speedup": None, "speedup_batch1": None, "flops_ratio": None, "storage_bytes": None,
           "error": error}  # fmt: skip
    if record is None:
        return row
    results = record.get("results", {})
    accuracy = results.get("accuracy", {})
    speed = results.get("throughput", {})
    retrained = accuracy.get("pruned_retrained")
    row.update({
        "full_accuracy": accuracy.get("full"),
        "pruned_accuracy": retrained if retrained is not None else accuracy.get("pruned_no_retrain"),
        "pruned_no_retrain": accuracy.get("pruned_no_retrain"),
        "depth": record.get("depth"),
        "blocks": record.get("backbone", {}).get("num_blocks"),
        "speedup": speed["pruned"] / speed["full"] if speed.get("full") else None,
        "storage_bytes": results.get("storage_bytes", {}).get("task"),
    })  # fmt: skip
    figures = results.get("measurements")  # sls.bench.measure's, in records evaluated since it exists
    if figures:
        full, pruned = figures["full"], figures["pruned"]
        row["flops_ratio"] = full["flops"] / pruned["flops"]
        if "1" in full["throughput"]:
            row["speedup_batch1"] = pruned["throughput"]["1"] / full["throughput"]["1"]
    return row


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _group_row(method: str, group: str, rows: list[dict], level: str = "group") -> dict:
    done = [r for r in rows if r["status"] == "done"]
    row = {"level": level, "method": method, "group": group, "task": "", "status": f"{len(done)}/{len(rows)} done",
           "tasks": len(rows), "blocks": _mean([r["blocks"] for r in done]), "error": ""}  # fmt: skip
    for key in ("full_accuracy", "pruned_accuracy", "pruned_no_retrain", "depth", "speedup", "speedup_batch1",
                "flops_ratio", "storage_bytes"):  # fmt: skip
        row[key] = _mean([r[key] for r in done])
    return row


def summary_rows(sweep: Sweep, failed: dict[str, str] | None = None) -> list[dict]:
    """One row per task (from its record when complete), then per method one row per
    group (means over the group's complete tasks) and, over the VTAB groups present,
    the mean of the group means (VTAB's usual average)."""
    failed = failed or {}
    rows = []
    for task in sweep.tasks:
        status = task_status(task)
        error = failed.get(task.name) or (recorded_failure(task) if status == "failed" else None)
        if status == "done":
            rows.append(_task_row(task, read_record(task.config.out).to_dict()))
        elif error is not None:
            rows.append(_task_row(task, None, "failed", error))
        else:
            rows.append(_task_row(task, None, status if status in ("busy", "other settings") else "pending"))
    methods = list(dict.fromkeys(task.method for task in sweep.tasks))
    groups = [g for g in GROUPS if any(t.group == g for t in sweep.tasks)]
    groups += sorted({t.group for t in sweep.tasks} - set(GROUPS))
    summary = []
    for method in methods:
        group_rows = []
        for group in groups:
            members = [r for r in rows if r["method"] == method and r["group"] == group]
            if members:
                group_rows.append(_group_row(method, group, members))
        vtab = [r for r in group_rows if r["group"] in GROUPS]
        summary += group_rows
        if len(vtab) > 1:
            overall = {k: _mean([r[k] for r in vtab]) for k in ("full_accuracy", "pruned_accuracy",
                                                                 "pruned_no_retrain", "depth", "speedup",
                                                                 "speedup_batch1", "flops_ratio", "storage_bytes",
                                                                 "blocks")}  # fmt: skip
            members = [r for r in rows if r["method"] == method and r["group"] in GROUPS]
            done = sum(r["status"] == "done" for r in members)
            summary.append({"level": "mean of groups", "method": method, "group": "+".join(r["group"] for r in vtab),
                            "task": "", "status": f"{done}/{len(members)} done", "tasks": len(members), "error": "",
                            **overall})  # fmt: skip
    return rows + summary


CSV_COLUMNS = ("level", "method", "group", "task", "status", "tasks", "full_accuracy", "pruned_accuracy",
               "pruned_no_retrain", "depth", "blocks", "speedup", "speedup_batch1", "flops_ratio", "storage_bytes",
               "error")  # fmt: skip


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _size(value) -> str:
    return "-" if value is None else f"{value / 1024:.1f} kB"


def _depth(row: dict) -> str:
    if row["depth"] is None:
        return "-"
    if row["level"] == "task":
        return f"{row['depth']}/{row['blocks']}"
    return f"{row['depth']:.1f}"


def summary_markdown(sweep: Sweep, rows: list[dict]) -> str:
    tasks = [r for r in rows if r["level"] == "task"]
    counts = {s: sum(r["status"] == s for r in tasks) for s in ("done", "failed")}
    lines = [f"# Sweep summary: {sweep.source.name}", "",
             f"{counts['done']} of {len(tasks)} tasks done, {counts['failed']} failed, "
             f"{len(tasks) - counts['done'] - counts['failed']} pending. Pruned accuracy is after retraining "
             "when the task retrains. Speed-up: the task's throughput at its throughput batch (batch 1 in the CSV), "
             "pruned over full, measured in one run; FLOPs cut: full over pruned FLOPs per image. "
             "Storage: the task's tensors (PETL of the kept blocks + head).", "",
             "## Per group", "",
             "| method | group | tasks | full accuracy | pruned accuracy | mean k | speed-up | FLOPs cut | storage |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["level"] != "task":
            label = f"**{r['group']}** (mean of groups)" if r["level"] == "mean of groups" else r["group"]
            lines.append(f"| {r['method']} | {label} | {r['status']} | {_percent(r['full_accuracy'])} | "
                         f"{_percent(r['pruned_accuracy'])} | {_depth(r)} | {_times(r['speedup'])} | "
                         f"{_times(r['flops_ratio'])} | {_size(r['storage_bytes'])} |")  # fmt: skip
    lines += ["", "## Per task", "",
              "| task | group | method | status | full accuracy | pruned accuracy | k / N | speed-up | FLOPs cut | storage |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in tasks:
        status = r["status"] if r["status"] != "failed" else f"failed: {r['error']}".replace("|", "/")
        lines.append(f"| {r['task']} | {r['group']} | {r['method']} | {status} | {_percent(r['full_accuracy'])} | "
                     f"{_percent(r['pruned_accuracy'])} | {_depth(r)} | {_times(r['speedup'])} | "
                     f"{_times(r['flops_ratio'])} | {_size(r['storage_bytes'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def summary_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    return buffer.getvalue()


def plot_summary(path: Path, rows: list[dict], title: str) -> Path:
    """Accuracy full vs pruned and speed-up, per task (left) and per group (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [r for r in rows if r["level"] == "task"]
    groups = [r for r in rows if r["level"] != "task"]
    fig, axes = plt.subplots(2, 2, figsize=(max(8.0, 0.45 * len(tasks) + 4), 7), dpi=110,
                             gridspec_kw={"width_ratios": [max(len(tasks), 1), max(len(groups), 1)]})  # fmt: skip
    for column, (part, labels) in enumerate(((tasks, [r["task"] for r in tasks]),
                                             (groups, [f"{r['method']}\n{r['group'] if r['level'] == 'group' else r['level']}"
                                                       for r in groups]))):  # fmt: skip
        positions = list(range(len(part)))

        def values(key: str) -> list[float]:
            return [math.nan if r[key] is None else r[key] for r in part]

        top, bottom = axes[0, column], axes[1, column]
        top.bar([p - 0.2 for p in positions], [100 * v for v in values("full_accuracy")], 0.4, label="full")
        top.bar([p + 0.2 for p in positions], [100 * v for v in values("pruned_accuracy")], 0.4, label="pruned (SLS)")
        top.set_ylabel("test accuracy (%)")
        top.set_title("per task" if column == 0 else "per group (means)", fontsize=9)
        top.set_ylim(0, 100)
        top.legend(fontsize=7, loc="lower left")
        bottom.bar(positions, values("speedup"), 0.6, color="tab:green")
        bottom.axhline(1.0, color="black", linewidth=0.8)
        bottom.set_ylabel("speed-up (pruned / full)")
        for axis in (top, bottom):
            axis.set_xticks(positions)
            axis.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def _write_summary_locked(sweep: Sweep, rows: list[dict]) -> list[Path]:
    with folder_lock(sweep.out, wait=120, what="sweep summary"):
        return write_summary(sweep, rows)


def write_summary(sweep: Sweep, rows: list[dict]) -> list[Path]:
    """``summary.md``, ``summary.csv`` and ``summary.png`` in the sweep folder."""
    return [
        write_text(sweep.out / "summary.md", summary_markdown(sweep, rows)),
        write_text(sweep.out / "summary.csv", summary_csv(rows)),
        plot_summary(sweep.out / "summary.png", rows, f"sweep {sweep.source.name}: SLS per task and per group"),
    ]
