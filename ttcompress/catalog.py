"""What ``--arch`` and ``--recipe`` accept: the architecture registry, the architecture families and the shipped
recipes, as plain dicts (``ttcompress archs`` / ``ttcompress recipes``)."""

from __future__ import annotations

from ttcompress import archs

FAMILIES = (
    {"name": "torchvision:NAME", "input_size": [3, 224, 224], "num_classes": 1000,
     "normalization": {"mean": list(archs.IMAGENET_MEAN), "std": list(archs.IMAGENET_STD)},
     "description": "any torchvision classification model (torchvision.models.list_models()); classes from the "
                    "checkpoint"},
    {"name": "timm:NAME", "input_size": None, "num_classes": None, "normalization": None,
     "description": "any timm model (timm.list_models(); pip install 'ttcompress[timm]'), pretrained=False; input "
                    "size and mean/std from timm's config of NAME, classes from the checkpoint"},
    {"name": "path/to/file.py:Class", "input_size": None, "num_classes": None, "normalization": None,
     "description": "your own nn.Module, built with no arguments; an input_size class attribute gives (C, H, W)"},
)


def arch_catalog() -> list[dict]:
    """One dict per registry architecture (``kind`` "registry"), then the families (``kind`` "family")."""
    rows = []
    for spec, info in archs.REGISTRY.items():
        norm = None if info.mean is None else {"mean": list(info.mean), "std": list(info.std or ())}
        rows.append({"name": spec, "kind": "registry", "input_size": list(info.input_size),
                     "num_classes": info.num_classes, "normalization": norm, "description": info.description})
    return rows + [{**family, "kind": "family"} for family in FAMILIES]


def recipe_catalog() -> list[dict]:
    """One dict per shipped recipe (``recipes/*.yaml``), read through :meth:`FinetuneConfig.from_recipe`."""
    from ttcompress.train import FinetuneConfig
    from ttcompress.train.recipes import shipped_recipes

    rows = []
    for path in shipped_recipes().values():
        cfg = FinetuneConfig.from_recipe(path)
        control = {k: getattr(cfg, k) for k in ("clip_to", "divide_to", "fastclip_to", "bn_to", "linear_to",
                                                "orthogonal_k") if getattr(cfg, k)}
        rows.append({"name": path.stem, "description": cfg.description, "data": cfg.data, "arch": cfg.arch,
                     "epochs": cfg.epochs, "steps": cfg.steps, "control": control, "path": str(path)})
    return rows
