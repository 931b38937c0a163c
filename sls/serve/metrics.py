"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per app."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

UNKNOWN_TASK = "_unknown"
"""The task label of a request for a task not served (a label per wrong name would let
any client grow the metrics without bound)."""


class Metrics:
    """Requests, errors, latency and batch sizes per task; tasks and bytes held."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        common = dict(registry=self.registry)
        self.requests = Counter("sls_requests", "Predict requests answered, by task and HTTP status",
                                ["task", "code"], **common)  # fmt: skip
        self.errors = Counter("sls_errors", "Predict requests answered with an error (4xx, 5xx), by task and status",
                              ["task", "code"], **common)  # fmt: skip
        self.latency = Histogram("sls_request_seconds", "Latency of answered (2xx) predict requests, from the first byte read to the answer",
                                 ["task"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 **common)  # fmt: skip
        self.batch_images = Histogram("sls_batch_images", "A task's images per forward pass", ["task"],
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128), **common)  # fmt: skip
        self.pass_images = Histogram("sls_pass_images", "Images per forward pass, every task's together",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), **common)  # fmt: skip
        self.pass_seconds = Histogram("sls_pass_seconds", "Seconds of one forward pass",
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                      **common)  # fmt: skip
        self.tasks = Gauge("sls_tasks", "Tasks served", **common)
        self.shared_bytes = Gauge("sls_shared_backbone_bytes", "Bytes of the shared backbones' tensors", **common)
        self.task_bytes = Gauge("sls_task_bytes", "Bytes of a task's own tensors (PETL modules, head)", ["task"],
                                **common)  # fmt: skip

    def answered(self, task: str, code: int, seconds: float) -> None:
        self.requests.labels(task, str(code)).inc()
        if code >= 400:
            self.errors.labels(task, str(code)).inc()
        else:
            self.latency.labels(task).observe(seconds)

    def forward_pass(self, images_per_task: dict[str, int], seconds: float) -> None:
        """One forward pass: how many images of each task it ran, and how long it took."""
        for task, images in images_per_task.items():
            self.batch_images.labels(task).observe(images)
        self.pass_images.observe(sum(images_per_task.values()))
        self.pass_seconds.observe(seconds)

    def holding(self, pool) -> None:
        """Set the gauges from what ``pool`` holds now."""
        self.tasks.set(len(pool.tasks))
        self.shared_bytes.set(pool.shared_bytes())
        self.task_bytes.clear()
        for name, task in list(pool.tasks.items()):
            self.task_bytes.labels(name).set(task.describe()["task_bytes"])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
