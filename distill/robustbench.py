"""RobustBench interoperability: a result in the shape of RobustBench's ``model_info`` JSON files.

RobustBench keeps one JSON per model (``model_info/<dataset>/<threat_model>/<Name>.json``) with
``link, name, authors, additional_data, number_forward_passes, dataset, venue, architecture, eps,
clean_acc, reported, autoattack_acc`` (accuracies and ε as strings, accuracies in percent).
:func:`model_info` fills what a run of standard AutoAttack knows (accuracies, ε, dataset,
architecture) and leaves the bibliographic fields empty for the author, as RobustBench's own
``benchmark(..., to_disk=True)`` does. ``clean_acc`` is measured on the same images as
``autoattack_acc`` (the AutoAttack subset when ``attack_samples`` limited it), as RobustBench does.

Example:
    >>> m = {"eps": 8 / 255, "accuracy": {"clean": 0.9, "autoattack": 0.5}, "n_per_attack": {"clean": 10,
    ...      "autoattack": 10}, "settings": {"attack_settings": {"autoattack": {"version": "standard"}}}}
    >>> info = model_info(m, dataset="cifar10", architecture="resnet18_cifar")
    >>> info["clean_acc"], info["autoattack_acc"], info["eps"], info["threat_model"]
    ('90.00', '50.00', '8/255', 'Linf')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transfer_analysis.errors import UserError

__all__ = ["model_info", "MODEL_INFO_FIELDS"]

#: the keys of a RobustBench model_info JSON, in its order
MODEL_INFO_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                     "architecture", "eps", "clean_acc", "reported", "autoattack_acc")


def model_info(metrics: Mapping[str, Any], *, dataset: str, architecture: str, additional_data: bool = False,
               number_forward_passes: int = 1, name: str = "") -> dict[str, Any]:
    """A RobustBench ``model_info`` dict from :func:`distill.evaluation.evaluate_robustness`'s metrics.

    Raises:
        UserError: the metrics hold no standard AutoAttack (RobustBench numbers are standard
            AutoAttack only).
    """
    from transfer_analysis.utils import format_eps

    aa = (metrics.get("settings", {}).get("attack_settings", {}) or {}).get("autoattack")
    if "autoattack" not in metrics.get("accuracy", {}) or not aa or aa.get("version", "standard") != "standard":
        raise UserError("a RobustBench result needs standard AutoAttack among the attacks")
    n_aa = int(metrics["n_per_attack"]["autoattack"])
    common = metrics.get("diagnostics", {}).get("subsets", {})
    if n_aa != int(metrics["n_per_attack"]["clean"]) and "accuracy_common" in common:
        clean = float(common["accuracy_common"]["clean"])  # on the AutoAttack images
    else:
        clean = float(metrics["accuracy"]["clean"])
    eps = float(metrics["eps"])
    eps_text = format_eps(eps)
    eps_text = eps_text.split("(")[-1].rstrip(")") if "/" in eps_text else f"{eps:g}"
    info = {
        "link": "", "name": name, "authors": "", "additional_data": bool(additional_data),
        "number_forward_passes": int(number_forward_passes), "dataset": dataset, "venue": "",
        "architecture": architecture, "eps": eps_text, "clean_acc": f"{100 * clean:.2f}", "reported": "",
        "autoattack_acc": f"{100 * float(metrics['accuracy']['autoattack']):.2f}",
    }
    # not RobustBench fields: what it takes to read the numbers (the folder names give the threat model)
    info["threat_model"] = str(metrics.get("settings", {}).get("norm", "Linf"))
    info["n_examples"] = n_aa
    return info
