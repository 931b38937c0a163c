"""The 19 VTAB-1k tasks: their folder names in the common (NOAH) layout, groups and aliases."""

from __future__ import annotations

from pathlib import Path

VTAB1K_GROUPS: dict[str, str] = {
    **dict.fromkeys(("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
                    "natural"),
    **dict.fromkeys(("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"), "specialized"),
    **dict.fromkeys(("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                     "smallnorb_azi", "smallnorb_ele"), "structured"),
}  # fmt: skip
"""The 19 VTAB-1k tasks under their folder names in the common (NOAH) layout, by group."""

GROUPS = ("natural", "specialized", "structured")

_ALIASES = {
    "cifar100": "cifar", "caltech": "caltech101", "flowers102": "oxford_flowers102", "flowers": "oxford_flowers102",
    "oxford_pet": "oxford_iiit_pet", "pets": "oxford_iiit_pet", "sun": "sun397", "camelyon": "patch_camelyon",
    "pcam": "patch_camelyon", "resisc": "resisc45", "retinopathy": "diabetic_retinopathy",
    "kitti_dist": "kitti", "dsprites_location": "dsprites_loc", "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi", "smallnorb_elevation": "smallnorb_ele",
    "clevr_counts": "clevr_count", "clevr_distance": "clevr_dist",
}  # fmt: skip



def vtab_task(name: str) -> str | None:
    """The NOAH folder name of a VTAB-1k task name or folder, or None.

    Case, ``-`` / ``_`` and a leading ``vtab-`` do not matter; common aliases
    (``cifar100``, ``pets``, ``camelyon``, ``retinopathy``, ...) are known.
    """
    key = Path(str(name).rstrip("/\\")).name.lower().replace("-", "_")
    key = key.removeprefix("vtab_")
    key = _ALIASES.get(key, key)
    return key if key in VTAB1K_GROUPS else None


def vtab_group(name: str) -> str | None:
    """The VTAB-1k group (natural, specialized, structured) of a task name or folder
    (as :func:`vtab_task` reads it), or None."""
    task = vtab_task(name)
    return None if task is None else VTAB1K_GROUPS[task]
