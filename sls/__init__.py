"""sls: prune whole tail blocks of PETL-adapted vision transformers with the SLS criterion.

Han & Tang, "Straightforward Layer-wise Pruning for More Efficient Visual Adaptation",
ECCV 2024. The public API is re-exported here by name.
"""

__version__ = "0.1.0"

from sls.errors import SLSError  # noqa: E402
from sls.select import DepthDecision, DepthSelector, select_depth  # noqa: E402

__all__ = ["DepthDecision", "DepthSelector", "SLSError", "select_depth", "__version__"]

_LAZY = {
    "RunConfig": "sls.config",
    "run": "sls.stages",
    "Experiment": "sls.experiment",
    "TaskRecord": "sls.record",
    "read_record": "sls.record",
    "Runtime": "sls.runtime",
    "load_task": "sls.experiment",
    "save_task": "sls.artifact",
    "create_backbone": "sls.backbones",
    "block_features": "sls.backbones",
    "truncate": "sls.backbones",
    "create_petl": "sls.petl",
    "apply_recipe": "sls.recipes",
}
__all__ += sorted(_LAZY)


def __getattr__(name: str):
    # torch-backed parts load on first use, so `import sls` and DepthSelector stay torch-free.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sls' has no attribute {name!r}")
