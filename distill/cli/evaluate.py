"""`darht evaluate`: evaluate a model under white-box and black-box attacks; write ``metrics.json``.

Where the model comes from (one of):

- ``--pool POOL.yaml --name NAME``: pool model NAME (resize and normalization as in the pool);
- ``--model RUNDIR``: the student of a ``darht distill`` run: ``RUNDIR/student.safetensors``,
  rebuilt from the spec in its metadata, or from ``RUNDIR/config.yaml`` (``resolved.student``,
  else ``student``, ``student_kwargs``, ``num_teachers``) for weights without one;
- ``--model W.safetensors --arch ARCH [--model-kwargs JSON]``: a plain timm model (no
  normalization), or, without ``--arch``, the pool entry ``W.yaml`` written beside the weights by
  ``darht train-teacher``.

``transfer:NAME`` attacks take their source models from ``--pool``. The evaluation subset is a
seeded class-balanced one (``--n-samples``, whole test set in order when larger), or the saved
indices given with ``--indices``; its indices are written beside the output as
``<out stem>.indices.json``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.cli.common import add_data_arguments, parse_json_kwargs
from transfer_analysis.errors import UserError
from transfer_analysis.files import read_yaml

if TYPE_CHECKING:
    import torch
    from torch import nn

HELP = "Evaluate a model under white-box and black-box attacks (clean, FGSM, PGD, CW, AutoAttack, transfer)"

logger = logging.getLogger("darht.evaluate")


def parse_attack_samples(text: str | None) -> dict[str, int]:
    """``"autoattack=200,cw=500"`` -> ``{"autoattack": 200, "cw": 500}`` (``None`` -> ``{}``).

    Example:
        >>> parse_attack_samples("autoattack=200")
        {'autoattack': 200}
    """
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, count = item.partition("=")
        if not sep or not name.strip() or not count.strip().isdigit():
            raise UserError(f"--attack-samples takes ATTACK=N[,ATTACK=N] (e.g. autoattack=200), got {item.strip()!r}")
        out[name.strip()] = int(count)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``darht evaluate`` (see CLI.md)."""
    src = p.add_argument_group("model")
    src.add_argument("--model", default=None,
                     help="a run directory of 'darht distill' (config.yaml + student.safetensors) or a weights "
                          "file (.safetensors or a torch state dict)")
    src.add_argument("--arch", default=None,
                     help="timm architecture of a --model weights file (default: read the pool entry W.yaml "
                          "beside it)")
    src.add_argument("--model-kwargs", default=None, help="JSON kwargs for --arch, e.g. '{\"width\": 16}'")
    src.add_argument("--pool", default=None, help="pool YAML: the model to evaluate (--name) and transfer sources")
    src.add_argument("--name", default=None, help="evaluate this pool model (needs --pool)")
    src.add_argument("--trust-checkpoint", action="store_true",
                     help="allow a torch checkpoint that needs arbitrary unpickling (runs code from the file)")
    add_data_arguments(p, n_samples=1000)
    p.add_argument("--indices", default=None,
                   help="evaluate on the test indices saved in this JSON file (overrides --n-samples)")
    p.add_argument("--attacks", default="clean,fgsm,pgd20,cw,autoattack",
                   help="comma-separated: clean, fgsm, pgd20 (pgdN), cw (cwN), autoattack, autoattack-fast, "
                        "transfer:NAME (default: clean,fgsm,pgd20,cw,autoattack)")
    p.add_argument("--attack-samples", default=None, metavar="ATTACK=N[,ATTACK=N]",
                   help="run an expensive attack on a seeded class-balanced part of the samples only, e.g. "
                        "autoattack=200 (nested when several; worst case and flags use the common part)")
    p.add_argument("--eps", default="8/255", help="L-inf radius, a number or a fraction (default 8/255)")
    p.add_argument("--batch-size", type=int, default=256, help="images per attack batch (default 256)")
    p.add_argument("--no-eps-sweep", action="store_true",
                   help="skip the large-eps PGD check for gradient masking")
    p.add_argument("--eot-iter", type=int, default=None, metavar="N",
                   help="EOT gradient samples per step of autoattack-rand (AutoAttack's rand version for randomized "
                        "models; default 20)")
    p.add_argument("--out", required=True, help="metrics JSON to write (e.g. metrics.json)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file (and drop a saved state)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation from OUT_STEM.state.pt (same metrics as an "
                        "uninterrupted run)")


# --------------------------------------------------------------------------------------------
# model lookup
# --------------------------------------------------------------------------------------------
def _student_spec_from_config(cfg_path: Path) -> dict[str, Any]:
    """The student's spec from a run's ``config.yaml``: ``resolved.student``, else the top-level keys."""
    cfg = read_yaml(cfg_path)
    if not isinstance(cfg, Mapping):
        raise UserError(f"{cfg_path} is not a mapping of settings; re-run 'darht distill' or pass a weights file")
    resolved = cfg.get("resolved")
    spec = resolved.get("student") if isinstance(resolved, Mapping) else None
    if isinstance(spec, Mapping) and isinstance(spec.get("arch"), str):
        return dict(spec)
    arch, kwargs = cfg.get("student"), cfg.get("student_kwargs") or {}
    if isinstance(arch, Mapping):  # tolerate {arch: ..., kwargs: ...}
        arch, kwargs = arch.get("arch"), arch.get("kwargs") or kwargs
    if not isinstance(arch, str) or not arch:
        raise UserError(f"{cfg_path} names no student architecture (key 'student'); is this a 'darht distill' run?")
    if not isinstance(kwargs, Mapping):
        raise UserError(f"{cfg_path}: student_kwargs must be a mapping, got {kwargs!r}")
    num_teachers = cfg.get("num_teachers", 0)
    if not isinstance(num_teachers, int) or isinstance(num_teachers, bool) or num_teachers < 0:
        raise UserError(f"{cfg_path}: num_teachers must be a non-negative integer, got {num_teachers!r}")
    return {"arch": arch, "kwargs": dict(kwargs), "num_teachers": num_teachers}


def load_run_student(run_dir: Path, num_classes: int, in_chans: int) -> nn.Module:
    """Rebuild the student of a ``darht distill`` run directory and load ``student.safetensors``.

    The student's spec (architecture, kwargs, teachers, normalization) comes from the weights'
    metadata (:func:`distill.student.load_student`); for weights without it, from the run's
    ``config.yaml`` (``resolved.student``, else ``student``, ``student_kwargs``, ``num_teachers``),
    built with :func:`distill.student.build_student`.
    """
    from safetensors import safe_open

    from transfer_analysis.pool import apply_state_dict, load_state_dict_file

    weights = run_dir / "student.safetensors"
    cfg_path = run_dir / "config.yaml"
    if not weights.is_file():
        if not cfg_path.is_file():
            raise UserError(f"{run_dir} holds neither student.safetensors nor config.yaml; --model takes a "
                            "'darht distill' run directory or a weights file")
        raise UserError(f"{weights} not found; the run has not finished (resume it with 'darht distill --resume')")
    try:
        from distill.student import STUDENT_METADATA_KEY, build_student, load_student
    except ImportError as err:
        raise UserError(f"cannot rebuild the student of {run_dir}: distill.student is not available in this "
                        "installation; evaluate a weights file with --model W.safetensors --arch ARCH") from err
    try:
        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:  # noqa: BLE001 - corrupt headers come as several exception types
        raise UserError(f"{weights} is not a valid safetensors file ({err}); re-create it") from err
    if STUDENT_METADATA_KEY in meta:
        logger.info("student from %s (spec in its metadata)", weights)
        return load_student(weights)
    if not cfg_path.is_file():
        raise UserError(f"{weights} carries no student spec and {run_dir} has no config.yaml; evaluate it with "
                        "--model W.safetensors --arch ARCH instead")
    spec = _student_spec_from_config(cfg_path)
    if spec.get("num_classes") not in (None, num_classes):
        raise UserError(f"the student of {run_dir} has {spec['num_classes']} classes but the dataset has "
                        f"{num_classes}; evaluate it on the dataset it was trained on")
    model = build_student(spec["arch"], num_classes, spec.get("num_teachers") or 0,
                          in_chans=int(spec.get("in_chans") or in_chans), image_size=spec.get("image_size"),
                          input_size=spec.get("input_size"), mean=spec.get("mean"), std=spec.get("std"),
                          **dict(spec.get("kwargs") or {}))
    apply_state_dict(model, load_state_dict_file(weights), what=f"{weights}")
    logger.info("student %s (%d teachers) from %s", spec["arch"], spec.get("num_teachers") or 0, cfg_path)
    return model


def _entry_beside(weights: Path, yaml_path: Path):
    """The pool entry in ``yaml_path`` (a single entry, a list of entries or a pool file)."""
    from transfer_analysis.pool import parse_pool_entries

    data = read_yaml(yaml_path)
    if isinstance(data, Mapping) and "models" not in data:
        data = {"models": [data]}
    elif isinstance(data, list):
        data = {"models": data}
    entries = parse_pool_entries(data, str(yaml_path))
    if len(entries) > 1:
        same = [e for e in entries if e.checkpoint and Path(e.checkpoint).name == weights.name]
        if len(same) != 1:
            raise UserError(f"{yaml_path} holds {len(entries)} models and none (or several) use {weights.name}; "
                            "use --pool with --name instead")
        entries = same
    return entries[0]


def load_weights_model(weights: Path, arch: str | None, model_kwargs: dict[str, Any], num_classes: int,
                       in_chans: int, image_size: int, device: torch.device, trust: bool = False) -> nn.Module:
    """A weights file as a pixel-space model: with ``arch`` a plain timm model, else the entry beside it."""
    from transfer_analysis.pool import (PixelSpaceModel, apply_state_dict, build_pool_model, create_timm_model,
                                        load_state_dict_file, merge_implied_kwargs)

    if not weights.is_file():
        raise UserError(f"model weights not found: {weights}")
    yaml_path = weights.with_suffix(".yaml")
    if arch is None:
        if not yaml_path.is_file():
            raise UserError(f"--model {weights} needs --arch ARCH (and --model-kwargs), or the pool entry "
                            f"{yaml_path.name} beside it as written by 'darht train-teacher'")
        entry = _entry_beside(weights, yaml_path)
        entry.checkpoint = str(weights)
        entry.trust_checkpoint = entry.trust_checkpoint or trust
        entry.kwargs = {**entry.kwargs, **model_kwargs}
        logger.info("model %s (%s) from %s", entry.name, entry.arch, yaml_path)
        return build_pool_model(entry, num_classes, in_chans, image_size, device)
    model_kwargs = merge_implied_kwargs(model_kwargs, "--model-kwargs", num_classes=num_classes, in_chans=in_chans)
    net = create_timm_model(arch, num_classes=num_classes, in_chans=in_chans, image_size=image_size, **model_kwargs)
    apply_state_dict(net, load_state_dict_file(weights, trust=trust), what=f"{weights}")
    logger.info("model %s from %s (no normalization)", arch, weights)
    return PixelSpaceModel(net, name=weights.stem)


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
def _check_out(out: Path, force: bool = False, robustbench: bool = False, resume: bool = False) -> None:
    """Claim ``--out`` and its side files (``<stem>.indices.json``, ``<stem>.robustbench.json`` with
    standard AutoAttack, the resumable ``<stem>.state.pt``) before any work."""
    from transfer_analysis.rundir import claim_output_files

    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'metrics.json'}")
    state = _state_path(out)
    if resume and force:
        raise UserError("--resume continues an evaluation and --force replaces it; give one of them")
    if resume and not state.is_file():
        raise UserError(f"nothing to resume: {state} does not exist"
                        + (f" ({out} is complete)" if out.is_file() else ""))
    if not resume and not force and state.is_file():
        raise UserError(f"an interrupted evaluation left {state}; pass --resume to continue it or --force to "
                        "start over")
    claim_output_files([out, _indices_path(out), *([_robustbench_path(out)] if robustbench else [])], force=force)
    if force and state.is_file():
        state.unlink()


def _state_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.state.pt")


def _indices_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.indices.json")


def _robustbench_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.robustbench.json")


def run(args: argparse.Namespace) -> int:
    from distill.cli.common import dataset_file, require_files

    if args.model is not None and not Path(args.model).exists():
        raise UserError(f"--model {args.model} not found; give a 'darht distill' run directory or a weights file")
    require_files((args.pool, "pool file"), (args.indices, "indices file"), (dataset_file(args.dataset), "dataset file"))
    from distill.evaluation import attack_kind, check_attack_samples, evaluate_robustness, parse_attacks
    from transfer_analysis.data import balanced_subset, load_dataset, load_indices, save_indices
    from transfer_analysis.pool import load_pool
    from transfer_analysis.utils import atomic_write_json, format_eps, parse_eps, resolve_device, seed_everything

    # Everything the user typed is checked before any work is done.
    attacks = parse_attacks(args.attacks)
    eps = parse_eps(args.eps)
    # checked here, before any model is loaded
    attack_samples = check_attack_samples(parse_attack_samples(args.attack_samples), ["clean", *attacks])
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.eot_iter is not None and (args.eot_iter < 1 or "autoattack-rand" not in attacks):
        raise UserError("--eot-iter N (N >= 1) sets the EOT samples of autoattack-rand: add autoattack-rand to "
                        f"--attacks (got {args.eot_iter} with {','.join(attacks)})")
    out = Path(args.out)
    _check_out(out, force=args.force, robustbench="autoattack" in attacks, resume=args.resume)
    sources = [a.split(":", 1)[1] for a in attacks if attack_kind(a) == "transfer"]
    if args.name is not None and args.pool is None:
        raise UserError("--name selects a model of a pool; give --pool POOL.yaml too")
    if args.model is not None and args.name is not None:
        raise UserError("give either --model (a run directory or weights) or --pool with --name, not both")
    if args.model is None and args.name is None:
        raise UserError("nothing to evaluate: give --model RUNDIR|W.safetensors or --pool POOL.yaml --name NAME")
    if sources and args.pool is None:
        raise UserError(f"attack transfer:{sources[0]} needs --pool POOL.yaml holding model {sources[0]!r}")
    model_kwargs = parse_json_kwargs(args.model_kwargs, "--model-kwargs")
    model_path = Path(args.model) if args.model is not None else None
    if model_path is not None:
        if not model_path.exists():
            raise UserError(f"--model {model_path} not found; give a 'darht distill' run directory or a weights file")
        if model_path.is_dir() and (args.arch is not None or model_kwargs):
            raise UserError("--arch and --model-kwargs apply to a weights file; a run directory's config.yaml "
                            "already names the student")
    if args.model_kwargs and args.arch is None and model_path is not None and not model_path.is_dir():
        logger.debug("--model-kwargs without --arch: merged into the entry beside the weights")

    device = resolve_device(args.device)
    seed_everything(args.seed)
    ds = load_dataset(args.dataset, args.data_root, download=not args.no_download)
    if args.indices is not None:
        indices = load_indices(args.indices)
        if len(indices) == 0 or int(indices.min()) < 0 or int(indices.max()) >= len(ds.y_test):
            raise UserError(f"--indices {args.indices} does not index this test set of {len(ds.y_test)} images")
    else:
        indices = balanced_subset(ds.y_test, args.n_samples, seed=args.seed)

    names = ([args.name] if args.name is not None else []) + [s for s in sources if s != args.name]
    pool = load_pool(args.pool, ds.num_classes, ds.in_chans, ds.image_size, device, names=names) \
        if args.pool is not None and names else {}
    if args.name is not None:
        model = pool[args.name]
        described = f"{args.pool}:{args.name}"
    elif model_path is not None and model_path.is_dir():
        model = load_run_student(model_path, ds.num_classes, ds.in_chans)
        described = str(model_path)
    else:
        assert model_path is not None
        model = load_weights_model(model_path, args.arch, model_kwargs, ds.num_classes, ds.in_chans, ds.image_size,
                                   device, trust=args.trust_checkpoint)
        described = str(model_path)
    model.to(device).eval().requires_grad_(False)

    x = ds.images("test", indices)
    y = ds.labels("test", indices)
    logger.info("evaluating %s on %d %s test images (eps %s)", described, len(y), args.dataset, format_eps(eps))
    from transfer_analysis import distributed as dist_utils

    # under torchrun the samples are sharded over the processes (fixed, seeded groups: the same
    # metrics as one process) and rank 0 alone writes the files
    with dist_utils.process_group(device):
        device = dist_utils.rank_device(device)
        model.to(device)
        metrics = evaluate_robustness(model, x, y, attacks=attacks, eps=eps, batch_size=args.batch_size,
                                      pool={s: pool[s] for s in sources}, seed=args.seed, device=device,
                                      n_classes=ds.num_classes, check_eps_sweep=not args.no_eps_sweep,
                                      attack_samples=attack_samples, subset_seed=args.seed, eot_iter=args.eot_iter,
                                      state_path=_state_path(out))
        world, rank = dist_utils.world_size(), dist_utils.rank()
        dist_utils.barrier()
    if rank != 0:
        return 0
    indices_path = _indices_path(out)
    metrics["settings"].update({
        "model": described,
        "arch": args.arch,
        "pool": args.pool,
        "dataset": args.dataset,
        "split": "test",
        "n_samples": int(len(indices)),
        "indices_file": indices_path.name,
        "processes": world,
    })
    save_indices(indices_path, indices, dataset=args.dataset, split="test", seed=args.seed)
    atomic_write_json(out, metrics)
    if "autoattack" in attacks:  # the same result in RobustBench's model_info shape
        from distill.robustbench import model_info

        arch = args.arch or getattr(getattr(model, "entry", None), "arch", None) or \
            (getattr(model, "spec", None) or {}).get("arch") or type(model).__name__
        atomic_write_json(_robustbench_path(out), model_info(metrics, dataset=args.dataset, architecture=arch,
                                                             name=Path(described).stem))
        logger.info("wrote %s (RobustBench model_info shape)", _robustbench_path(out))
    _state_path(out).unlink(missing_ok=True)  # complete: the result is written
    width = max(len(k) for k in metrics["accuracy"])
    for name, acc in metrics["accuracy"].items():
        logger.info("  %-*s %.4f", width, name, acc)
    logger.info("  %-*s %.4f", width, "worst case", metrics["worst_case"])
    if metrics["flags"]:
        logger.warning("%d gradient-masking flag(s); see 'flags' in %s", len(metrics["flags"]), out)
    logger.info("wrote %s and %s", out, indices_path)
    return 0
