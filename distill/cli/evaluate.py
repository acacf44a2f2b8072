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
from pathlib import Path
from typing import Any

from distill.cli.common import add_data_arguments, parse_json_kwargs
from transfer_analysis.errors import UserError

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
    """Options of ``darht evaluate`` (docs/cli.md)."""
    src = p.add_argument_group("model")
    src.add_argument("--model", default=None,
                     help="a run directory of 'darht distill' (config.yaml + student.safetensors), a weights "
                          "file (.safetensors or a torch state dict), or a pretrained timm model hf-hub:ORG/NAME or "
                          "local-dir:PATH")
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
                   help="comma-separated: clean, fgsm, pgd20 (pgdN), cw (cwN), autoattack, autoattack-rand, "
                        "autoattack-fast (non-standard), "
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


def io_paths(args: argparse.Namespace) -> tuple[list, list]:
    """What ``darht evaluate`` reads and writes (no output may be an input)."""
    from distill.cli.common import dataset_file, dir_files

    model = None if args.model is None or args.model.startswith(("hf-hub:", "local-dir:")) else args.model
    out = Path(args.out)
    return ([("--model", p) for p in dir_files(model, ("student.safetensors", "config.yaml"))]
            + [("--pool", args.pool), ("--indices", args.indices), ("--dataset", dataset_file(args.dataset))],
            [("--out", out, False), ("--out", _indices_path(out), False), ("--out", _robustbench_path(out), False),
             ("--out", out.with_name(f"{out.stem}.state.pt"), False)])


def run(args: argparse.Namespace) -> int:
    from distill.cli.common import dataset_file, require_files

    # before any heavy import: a missing --model, pool, indices or dataset file is refused at once
    model_file = None if args.model is None or args.model.startswith(("hf-hub:", "local-dir:")) else args.model
    require_files((model_file, "model (a 'darht distill' run directory or a weights file)"), (args.pool, "pool file"),
                  (args.indices, "indices file"), (dataset_file(args.dataset), "dataset file"))
    from distill.evaluation import attack_kind, check_attack_samples, parse_attacks
    from distill.evaluation.models import check_model_source
    from transfer_analysis.utils import parse_eps

    # Everything the user typed is checked before any work is done.
    attacks = parse_attacks(args.attacks)
    eps = parse_eps(args.eps)
    attack_samples = check_attack_samples(parse_attack_samples(args.attack_samples), ["clean", *attacks])
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.eot_iter is not None and (args.eot_iter < 1 or "autoattack-rand" not in attacks):
        raise UserError("--eot-iter N (N >= 1) sets the EOT samples of autoattack-rand: add autoattack-rand to "
                        f"--attacks (got {args.eot_iter} with {','.join(attacks)})")
    sources = [a.split(":", 1)[1] for a in attacks if attack_kind(a) == "transfer"]
    model_kwargs = parse_json_kwargs(args.model_kwargs, "--model-kwargs")
    check_model_source(args.model, args.pool, args.name, arch=args.arch, model_kwargs=model_kwargs, sources=sources)
    out = Path(args.out)
    _check_out(out, force=args.force, robustbench="autoattack" in attacks, resume=args.resume)
    metrics, model, described, indices = _evaluate(args, attacks, eps, attack_samples, sources, model_kwargs, out)
    if metrics is not None:
        _write_outputs(args, out, metrics, model, described, indices, attacks)
    return 0


def _evaluate(args: argparse.Namespace, attacks: list[str], eps: float, attack_samples: dict[str, int],
              sources: list[str], model_kwargs: dict[str, Any], out: Path) -> tuple[Any, Any, str, Any]:
    """Load the data and the model, and evaluate (sharded under torchrun); metrics on rank 0, else None."""
    from distill.evaluation import evaluate_robustness
    from distill.evaluation.models import load_model
    from transfer_analysis import distributed as dist_utils
    from transfer_analysis.data import balanced_subset, load_dataset, load_indices
    from transfer_analysis.utils import format_eps, resolve_device, seed_everything

    device = resolve_device(args.device)
    seed_everything(args.seed)
    ds = load_dataset(args.dataset, args.data_root, download=not args.no_download)
    if args.indices is not None:
        indices = load_indices(args.indices)
        if len(indices) == 0 or int(indices.min()) < 0 or int(indices.max()) >= len(ds.y_test):
            raise UserError(f"--indices {args.indices} does not index this test set of {len(ds.y_test)} images")
    else:
        indices = balanced_subset(ds.y_test, args.n_samples, seed=args.seed)
    model, described, pool = load_model(args.model, args.pool, args.name, num_classes=ds.num_classes,
                                        in_chans=ds.in_chans, image_size=ds.image_size, device=device,
                                        arch=args.arch, model_kwargs=model_kwargs, trust=args.trust_checkpoint,
                                        sources=sources)
    x, y = ds.images("test", indices), ds.labels("test", indices)
    logger.info("evaluating %s on %d %s test images (eps %s)", described, len(y), args.dataset, format_eps(eps))
    # under torchrun the samples are sharded over the processes (fixed, seeded groups: the same
    # metrics as one process) and rank 0 alone writes the files
    with dist_utils.process_group(device):
        device = dist_utils.rank_device(device)
        model.to(device)
        metrics = evaluate_robustness(model, x, y, attacks=attacks, eps=eps, batch_size=args.batch_size, pool=pool,
                                      seed=args.seed, device=device, n_classes=ds.num_classes,
                                      check_eps_sweep=not args.no_eps_sweep, attack_samples=attack_samples,
                                      subset_seed=args.seed, eot_iter=args.eot_iter, state_path=_state_path(out))
        metrics["settings"]["processes"] = dist_utils.world_size()
        main = dist_utils.rank() == 0
        dist_utils.barrier()
    return (metrics if main else None), model, described, indices


def _write_outputs(args: argparse.Namespace, out: Path, metrics: dict[str, Any], model: Any, described: str,
                   indices: Any, attacks: list[str]) -> None:
    """``metrics.json``, its indices, the RobustBench ``model_info`` with AutoAttack; the state goes."""
    from transfer_analysis.data import save_indices
    from transfer_analysis.utils import atomic_write_json

    indices_path = _indices_path(out)
    metrics["settings"].update({
        "model": described, "arch": args.arch, "pool": args.pool, "dataset": args.dataset, "split": "test",
        "n_samples": int(len(indices)), "indices_file": indices_path.name,
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
