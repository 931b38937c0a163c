"""Named presets of run settings: ``sls run --recipe vtab``.

A recipe fills in the :class:`~sls.config.RunConfig` settings a run does not give
itself: every setting given (on the command line, or in a sweep file) wins over the
recipe, and the recipe wins over RunConfig's defaults. The resolved values, and the
recipe's name, go into the task record like any other setting.

``vtab`` is the paper's VTAB-1k training recipe (Han & Tang, ECCV 2024, following
NOAH, Convpass and RepAdapter): 224 px inputs normalised with ImageNet's statistics,
every image of train800val200 for training and of test for testing, AdamW at 1e-3
with weight decay 1e-4, batch 64, 100 epochs with 10 warm-up epochs and a cosine to
1e-5, drop-path 0.1, seed 42; retraining after pruning gets the same schedule again.
Convpass and RepAdapter get bottleneck 8 and dropout 0.1, and the per-dataset scale s
their authors published for each VTAB-1k task, and for Convpass the published conv init
(:data:`VTAB_PRESETS`, looked up by the last part of ``data`` as
:func:`sls.vtab.vtab_task` reads it: ``~/vtab-1k/dtd``, ``vtab-dtd`` or ``DTD``). A task without a published scale needs ``--petl-option scale=S``. The recipe sets no backbone: the paper's is
``--model vit_base_patch16_224.orig_in21k --weights ViT-B_16.npz``.

Differences from the paper's code, on purpose: the final epoch is reported (their code
reports the best test epoch), and throughput is measured at batch 1 in this library's
own loop (:func:`sls.bench.throughput`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sls.errors import ConfigError
from sls.vtab import vtab_task


@dataclass(frozen=True)
class Recipe:
    """A preset.

    Attributes:
        name: what ``--recipe`` takes.
        description: one line for ``--help``.
        settings: RunConfig fields and their values.
        petl_options: per PETL method, options over the method's defaults.
        per_dataset: per PETL method, options per dataset name; a method listed here
            needs its dataset listed too, or a ``scale`` given.
    """

    name: str
    description: str
    settings: dict
    petl_options: dict[str, dict] = field(default_factory=dict)
    per_dataset: dict[str, dict[str, dict]] = field(default_factory=dict)


VTAB_PRESETS: dict[str, dict[str, dict]] = {
    # Convpass (Jie & Deng): JieShibo/PETL-ViT, vtab/configs/convpass/<task>.yaml (commit 675871c:
    # cifar, caltech101, svhn, eurosat, resisc45, clevr_dist) and convpass/vtab/configs/convpass/
    # <task>.yaml (commit 0f1c47f: the others); each gives scale and xavier_init. Not in the
    # copies we could read: oxford_iiit_pet, smallnorb_azi.
    "convpass": {
        "cifar": {"scale": 0.1, "conv_init": "identity"},
        "caltech101": {"scale": 1.0, "conv_init": "identity"},
        "dtd": {"scale": 0.01, "conv_init": "xavier"},
        "oxford_flowers102": {"scale": 0.1, "conv_init": "xavier"},
        "svhn": {"scale": 100.0, "conv_init": "xavier"},
        "sun397": {"scale": 0.1, "conv_init": "identity"},
        "patch_camelyon": {"scale": 10.0, "conv_init": "identity"},
        "eurosat": {"scale": 10.0, "conv_init": "identity"},
        "resisc45": {"scale": 10.0, "conv_init": "identity"},
        "diabetic_retinopathy": {"scale": 1.0, "conv_init": "identity"},
        "clevr_count": {"scale": 1.0, "conv_init": "identity"},
        "clevr_dist": {"scale": 0.1, "conv_init": "xavier"},
        "dmlab": {"scale": 10.0, "conv_init": "identity"},
        "kitti": {"scale": 10.0, "conv_init": "xavier"},
        "dsprites_loc": {"scale": 100.0, "conv_init": "xavier"},
        "dsprites_ori": {"scale": 0.1, "conv_init": "xavier"},
        "smallnorb_ele": {"scale": 1.0, "conv_init": "xavier"},
    },
    # RepAdapter: the SLS authors' RuiZiHan/SLS, configs/repadapter/<task>.yaml (commit 182d9b0),
    # and for dsprites_ori luogen1996/RepAdapter, configs/repblock/dsprites_ori.yaml (commit a7b33b7),
    # which agrees with the former on all 11 tasks both have. Not in the copies
    # we could read:
    # cifar, sun397, clevr_dist, smallnorb_ele.
    "repadapter": {
        "caltech101": {"scale": 5.0},
        "dtd": {"scale": 1.0},
        "oxford_flowers102": {"scale": 0.5},
        "oxford_iiit_pet": {"scale": 0.1},
        "svhn": {"scale": 10.0},
        "patch_camelyon": {"scale": 1.0},
        "eurosat": {"scale": 1.0},
        "resisc45": {"scale": 5.0},
        "diabetic_retinopathy": {"scale": 0.1},
        "clevr_count": {"scale": 0.5},
        "dmlab": {"scale": 5.0},
        "kitti": {"scale": 5.0},
        "dsprites_loc": {"scale": 5.0},
        "dsprites_ori": {"scale": 0.1},
        "smallnorb_azi": {"scale": 10.0},
    },
}
"""Per-task PETL options of the vtab recipe, from the authors' published config files
(named in the comments), by the task's folder name in the NOAH layout."""


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="demo",
            description="what sls demo runs, small enough for a laptop's CPU: 84 px, 2000 training and 1000 test "
            "images, 2 + 2 epochs (suits the embedded MNIST-5k, not a user's own set)",
            settings=dict(img_size=84, train_samples=2000, test_samples=1000, epochs=2, retrain_epochs=2),
        ),
        Recipe(
            name="demo-segmentation",
            description="what sls demo --task segmentation runs: mnist-scenes at 112 px, 800 training and 200 test "
            "scenes (training curves on 50 validation scenes), 3 + 2 epochs, the linear head, AdamW 1e-3 (the head "
            "at 1e-2)",
            settings=dict(task="segmentation", data="mnist-scenes", img_size=112, epochs=3, retrain_epochs=2, lr=1e-3,
                          val_samples=50),
        ),
        Recipe(
            name="demo-detection",
            description="what sls demo --task detection runs: mnist-scenes at 112 px, 800 training and 200 test "
            "scenes (training curves on 50 validation scenes), FCOS on a simple feature pyramid, 3 + 2 epochs, AdamW "
            "1e-3 (the head at 1e-2)",
            settings=dict(task="detection", data="mnist-scenes", img_size=112, epochs=3, retrain_epochs=2, lr=1e-3,
                          val_samples=50),
        ),
        Recipe(
            name="vtab",
            description="the paper's VTAB-1k recipe: 224 px, ImageNet normalisation, all images, AdamW 1e-3 "
            "(wd 1e-4), batch 64, 100 + 100 epochs, 10 warm-up, cosine to 1e-5, drop-path 0.1, seed 42; "
            "Convpass/RepAdapter bottleneck 8, dropout 0.1, the published per-task scale (and Convpass conv init)",
            settings=dict(
                img_size=224,
                normalize="imagenet",
                train_samples=None,
                test_samples=None,
                analysis_samples=None,
                val_samples=None,
                lr=1e-3,
                weight_decay=1e-4,
                batch_size=64,
                epochs=100,
                retrain_epochs=100,
                warmup_epochs=10,
                min_lr=1e-5,
                drop_path=0.1,
                seed=42,
                throughput_batch=1,
            ),
            petl_options={
                "convpass": {"bottleneck": 8, "dropout": 0.1},
                "repadapter": {"bottleneck": 8, "dropout": 0.1},
            },
            per_dataset=VTAB_PRESETS,
        ),
    )
}


def demo_recipe(task: str) -> str:
    """The recipe ``sls demo --task`` runs."""
    return "demo" if task == "classification" else f"demo-{task}"


def list_recipes() -> list[str]:
    return sorted(RECIPES)


def describe_recipes() -> str:
    return "; ".join(f"{name}: {RECIPES[name].description}" for name in list_recipes())


def apply_recipe(name: str, settings: dict) -> dict:
    """RunConfig settings: ``settings`` (those given) over the recipe ``name``'s.

    ``petl_options`` are merged key by key: the method's options in the recipe, then
    the dataset's, then the given ones.

    Raises:
        ConfigError: an unknown recipe, or a method whose scale the recipe sets per
            dataset, on a dataset it has no scale for, without a given ``scale``.
    """
    from sls.config import RunConfig

    try:
        recipe = RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(list_recipes())}") from None
    merged = {**recipe.settings, **settings, "recipe": name}
    petl = merged.get("petl", RunConfig.petl)
    data = merged.get("data", RunConfig.data)
    given = dict(settings.get("petl_options") or {})
    options = dict(recipe.petl_options.get(petl, {}))
    if petl in recipe.per_dataset:
        presets, task = recipe.per_dataset[petl], vtab_task(data)
        if task in presets:
            options.update(presets[task])
        elif "scale" not in given:
            if task is None:
                raise ConfigError(f"recipe {name} sets the {petl} scale per VTAB-1k task, and {data!r} is not one; "
                                  "give the scale with --petl-option scale=S")  # fmt: skip
            raise ConfigError(f"recipe {name} has no published {petl} scale for VTAB-1k task {task}; give one "
                              "with --petl-option scale=S")  # fmt: skip
    merged["petl_options"] = {**options, **given}
    return merged
