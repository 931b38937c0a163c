"""``sls serve``: many tasks over one shared backbone, behind HTTP.

- :mod:`sls.serve.pool`: :class:`TaskPool`, the tasks in memory over shared backbones;
- :mod:`sls.serve.batching`: dynamic batching per task, one inference thread;
- :mod:`sls.serve.app`: the FastAPI app and :func:`serve`;
- :mod:`sls.serve.metrics`: the Prometheus metrics.

The HTTP layer (FastAPI, uvicorn) is imported only by :func:`serve` and :func:`create_app`.
"""

from sls.serve.pool import ServedTask, TaskPool, task_folders

__all__ = ["ServedTask", "TaskPool", "create_app", "serve", "task_folders"]


def create_app(*args, **kwargs):
    """See :func:`sls.serve.app.create_app`."""
    from sls.serve.app import create_app as create

    return create(*args, **kwargs)


def serve(*args, **kwargs):
    """See :func:`sls.serve.app.serve`."""
    from sls.serve.app import serve as run

    return run(*args, **kwargs)
