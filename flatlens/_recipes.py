"""Published training setups as presets of :class:`~flatlens.train.TrainConfig`.

Each recipe is every setting of one published training script, with the file and line it
comes from (``docs/recipes.md`` prints the table). Settings given explicitly override the
preset (:meth:`TrainConfig.from_recipe`, ``flatlens train --recipe NAME --epochs 1``).

Sources, read at these commits: xxgege/GAM 694133d (``main_cifar.py``, ``gam/``,
``models/resnet_cifar.py``) and davda54/sam 3c3afdb (``example/``, ``sam.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RECIPES", "Recipe"]

GAM_REPO = "xxgege/GAM@694133d"
SAM_REPO = "davda54/sam@3c3afdb"


@dataclass(frozen=True)
class Recipe:
    """One published training setup.

    Attributes:
        name: The recipe's name (``--recipe NAME``).
        summary: One line: what it trains, with what, on what.
        data: The data set it was published on (``cifar10``, ``cifar100``).
        settings: :class:`~flatlens.train.TrainConfig` fields and their values.
        sources: For each setting, where the published code sets it (``repo file:lines``).
    """

    name: str
    summary: str
    data: str
    settings: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)


def _gam(dataset: str) -> Recipe:
    main = f"{GAM_REPO} main_cifar.py"
    c10 = dataset == "cifar10"
    gam_line = "129-131" if c10 else "124-126"
    # (grad_norm_rho, grad_rho, grad_beta_0, grad_beta_1, grad_gamma), main_cifar.py 124-131
    rho, perturb, beta0, beta1, gamma = (
        (0.2, 0.03, 0.1, 0.1, 0.05)
        if c10
        else (
            0.2,
            0.02,
            0.5,
            0.6,
            0.03,
        )
    )
    mean = (0.49139968, 0.48215827, 0.44653124) if c10 else (0.5071, 0.4867, 0.4408)
    std = (0.2023, 0.1994, 0.2010) if c10 else (0.2675, 0.2565, 0.2761)
    norm_line = "226, 235" if c10 else "248, 257"
    settings: dict[str, Any] = {
        "model": "resnet18",
        "model_kwargs": {},
        "optimizer": "gam",
        "gam_official": True,
        "gam_rho": rho,
        "gam_perturb_rho": perturb,
        "gam_minus_weight": beta0,
        "gam_plus_weight": beta1,
        "gam_orthogonal_weight": gamma,
        "gam_adaptive": False,
        "base": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "nesterov": False,
        "epochs": 200,
        "batch_size": 128,
        "seed": 0,
        "scheduler": "cosine",
        "lr_update": "epoch",
        "warmup_epochs": 0,
        "loss": "smooth_cross_entropy",
        "label_smoothing": 0.1,
        "augment": "crop-flip",
        "augment_on": "workers",
        "num_workers": 4,
        "data_mean": mean,
        "data_std": std,
        "amp": "none",
    }
    sources = {
        "model": f"{main}:33 (resnet18_c); models/resnet_cifar.py:75-110",
        "model_kwargs": f"{main}:194 (only num_classes)",
        "optimizer": f"{main}:279-280; gam/optimizer_helper.py:27-29",
        "gam_official": "gam/gam.py:115 (h- = g0 + |grad_beta_2| g2), 108-135",
        "gam_rho": f"{main}:{gam_line} (grad_norm_rho); gam/optimizer_helper.py:24-25",
        "gam_perturb_rho": f"{main}:{gam_line} (grad_rho); gam/optimizer_helper.py:21-22",
        "gam_minus_weight": f"{main}:{gam_line}, 135 (grad_beta_0)",
        "gam_plus_weight": f"{main}:{gam_line}, 136 (grad_beta_1)",
        "gam_orthogonal_weight": f"{main}:{gam_line} (grad_gamma)",
        "gam_adaptive": f"{main}:107",
        "base": f"{main}:92; gam/optimizer_helper.py:6-8",
        "lr": f"{main}:46",
        "momentum": f"{main}:51",
        "weight_decay": f"{main}:48",
        "nesterov": "gam/optimizer_helper.py:7-8 (SGD without nesterov)",
        "epochs": f"{main}:39",
        "batch_size": f"{main}:41",
        "seed": f"{main}:68",
        "scheduler": "gam/optimizer_helper.py:18; main_cifar.py:291 (stepped per epoch)",
        "warmup_epochs": "gam/optimizer_helper.py:18 (none)",
        "lr_update": f"{main}:291 (lr_scheduler.step() after each epoch)",
        "loss": "gam/train_with_gam.py:47-48; gam/smooth_cross_entropy.py:6-13",
        "label_smoothing": f"{main}:108",
        "augment": f"{main}:{'222-227' if c10 else '244-249'} (RandomCrop(32, padding=4), "
        "RandomHorizontalFlip)",
        "augment_on": f"{main}:{'222-227' if c10 else '244-249'} (per example, in the workers)",
        "num_workers": f"{main}:37",
        "data_mean": f"{main}:{norm_line}",
        "data_std": f"{main}:{norm_line}",
        "amp": "gam/train_with_gam.py:50-56 (float32)",
    }
    sources = {k: v if v.startswith(GAM_REPO) else f"{GAM_REPO} {v}" for k, v in sources.items()}
    name = f"gam-{dataset}-resnet18"
    return Recipe(
        name,
        f"GAM (the authors' code) on {dataset.upper()} with the CIFAR ResNet-18",
        dataset,
        settings,
        sources,
    )


def _sam(adaptive: bool) -> Recipe:
    ex = f"{SAM_REPO} example"
    settings: dict[str, Any] = {
        "model": "wrn16_8",
        "model_kwargs": {"layout": "davda54", "dropout": 0.0},
        "optimizer": "sam",
        "sam_rho": 2.0 if adaptive else 0.05,
        "sam_adaptive": adaptive,
        "base": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "nesterov": False,
        "epochs": 200,
        "batch_size": 128,
        "seed": 42,
        "scheduler": "step",
        "milestones": (0.3, 0.6, 0.8),
        "lr_decay": 0.2,
        "lr_update": "step",
        "warmup_epochs": 0,
        "loss": "smooth_cross_entropy",
        "label_smoothing": 0.1,
        "augment": "crop-flip-cutout",
        "augment_on": "workers",
        "num_workers": 2,
        "data_mean": None,
        "data_std": None,
        "amp": "none",
    }
    rho_source = (
        f"{ex}/train.py:27; {SAM_REPO} README.md:184 (ASAM rho=2.0)"
        if adaptive
        else f"{SAM_REPO} README.md:184 (SAM rho=0.05); sam.py:5"
    )
    sources = {
        "model": f"{ex}/train.py:20, 29, 37; example/model/wide_res_net.py:46-93",
        "model_kwargs": f"{ex}/model/wide_res_net.py:49-52, 63 (n + 1 units per group); "
        "train.py:21 (dropout 0.0)",
        "optimizer": f"{ex}/train.py:39-40, 50-60",
        "sam_rho": rho_source,
        "sam_adaptive": f"{ex}/train.py:18" if adaptive else f"{SAM_REPO} README.md:184",
        "base": f"{ex}/train.py:39",
        "lr": f"{ex}/train.py:24",
        "momentum": f"{ex}/train.py:25",
        "weight_decay": f"{ex}/train.py:28",
        "nesterov": f"{ex}/train.py:40 (SGD without nesterov)",
        "epochs": f"{ex}/train.py:22",
        "batch_size": f"{ex}/train.py:19",
        "seed": f"{ex}/train.py:32",
        "scheduler": f"{ex}/train.py:41, 65; example/utility/step_lr.py:7-18",
        "milestones": f"{ex}/utility/step_lr.py:8-14",
        "lr_decay": f"{ex}/utility/step_lr.py:11-15",
        "lr_update": f"{ex}/train.py:65 (scheduler(epoch) after every step)",
        "warmup_epochs": f"{ex}/utility/step_lr.py:7-18 (none)",
        "loss": f"{ex}/train.py:53, 59; example/model/smooth_cross_entropy.py:6-13",
        "label_smoothing": f"{ex}/train.py:23",
        "augment": f"{ex}/data/cifar.py:13-19; example/utility/cutout.py:5-20",
        "augment_on": f"{ex}/data/cifar.py:13-19, 29 (per example, in the workers)",
        "num_workers": f"{ex}/train.py:26; example/data/cifar.py:29",
        "data_mean": f"{ex}/data/cifar.py:11, 34-38 (the training set's statistics)",
        "data_std": f"{ex}/data/cifar.py:11, 34-38 (the training set's statistics)",
        "amp": f"{ex}/train.py:47-60 (float32)",
    }
    name = f"{'asam' if adaptive else 'sam'}-cifar10-wrn16-8"
    what = "ASAM (adaptive, rho 2.0)" if adaptive else "SAM (rho 0.05)"
    return Recipe(
        name, f"{what} on CIFAR-10 with davda54/sam's WRN-16-8", "cifar10", settings, sources
    )


RECIPES: dict[str, Recipe] = {
    r.name: r for r in (_gam("cifar10"), _gam("cifar100"), _sam(False), _sam(True))
}
"""The recipes by name."""
