"""One prepared check of every CUDA path, short enough for a brief slot on a shared GPU.

    bash experiments/benchmarks/gpu_check.sh             # on the GPU machine: under 8 minutes on one GPU
    bash experiments/benchmarks/gpu_check.sh --dry-run   # the same steps, tiny, on the CPU (tested)

Steps, each timed and checked (a failure prints its traceback and the script exits non-zero):

1. ``amp``: bf16 autocast forwards while the attack gradient stays fp32 (``pgd_attack`` turns
   autocast off): the adversarial example is fp32 and inside the ε-ball.
2. ``distill``: one DARHT epoch on CIFAR-shaped synthetic data (3x32x32, 10 classes) from two
   teachers, with bf16 autocast, channels_last and ``torch.compile`` (``--no-compile`` skips it).
3. ``matrix``: the transferability engine on three models.
4. ``autoattack``: standard AutoAttack on 500 images (``--dry-run``: 16).
5. ``nccl``: a one-process NCCL group (``--dry-run``: gloo) and an all-reduce.

The last line is ``gpu_check: ok device=... amp_s=... distill_s=... matrix_s=... autoattack_s=...
nccl_s=... total_s=...`` (or ``gpu_check: FAILED ...``), ready to paste into
``experiments/benchmarks/README.md`` with the hardware.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny(width: int, seed: int, classes: int = 10, chans: int = 3) -> torch.nn.Module:
    from transfer_analysis.models import PixelSpaceModel, create_timm_model

    torch.manual_seed(seed)
    return PixelSpaceModel(create_timm_model("resnet18_cifar", classes, chans, width=width)).eval()


def step_amp(device: torch.device, small: bool) -> str:
    from transfer_analysis.attacks import pgd_attack

    model = _tiny(8, 0).to(device)
    x = torch.rand(64 if not small else 8, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (len(x),), device=device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(x)
        x_adv = pgd_attack(model, x, y, eps=8 / 255, alpha=2 / 255, steps=5, start="uniform")
    assert x_adv.dtype == torch.float32, x_adv.dtype
    assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
    return f"logits {logits.dtype}, x_adv {x_adv.dtype}"


def step_distill(device: torch.device, small: bool, compile_: bool, out: Path) -> str:
    from distill.trainer import train
    from transfer_analysis.data import make_synthetic

    n_train = 512 if small else 8192
    data = make_synthetic(num_classes=10, in_chans=3, image_size=32, n_train=n_train, n_test=256)
    teachers = {"t0": _tiny(8, 1), "t1": _tiny(8, 2)}
    cfg = {"method": "darht", "student": "resnet18_cifar", "student_kwargs": {"width": 8 if small else 16},
           "dataset": "synthetic", "epochs": 1, "batch_size": 128, "lr": 0.1, "eval_samples": 64,
           "final_attacks": ["clean", "pgd20"], "final_eval_samples": 128, "final_check_eps_sweep": False,
           "method_kwargs": {"phases": [0.0, 0.0]}, "amp": True, "channels_last": True, "compile": compile_,
           "device": str(device)}
    result = train(cfg, out / "distill", dataset=data, teachers=teachers)
    assert result.completed and result.metrics is not None
    acc = result.metrics["accuracy"]
    return f"clean {acc['clean']:.3f}, pgd20 {acc['pgd20']:.3f}, amp_active {device.type == 'cuda'}"


def step_matrix(device: torch.device, small: bool, out: Path) -> str:
    from transfer_analysis.attacks import AttackConfig
    from transfer_analysis.data import make_synthetic
    from transfer_analysis.matrix import transfer_matrix

    data = make_synthetic(num_classes=10, in_chans=3, image_size=32, n_train=16, n_test=64 if small else 1024)
    pool = {f"m{i}": _tiny(4 + 2 * i, 10 + i) for i in range(3)}
    res = transfer_matrix(pool, data.images("test"), data.labels("test"), AttackConfig("pgd", eps=8 / 255, steps=5),
                          batch_size=256, device=device, cache_dir=out / "cache", dataset="synthetic")
    assert res is not None and res.matrix.shape == (3, 3)
    return f"{res.stats['attacks_run']} attacks"


def step_autoattack(device: torch.device, small: bool) -> str:
    from distill.evaluation import evaluate_robustness
    from transfer_analysis.data import make_synthetic

    n = 16 if small else 500
    data = make_synthetic(num_classes=10, in_chans=3, image_size=32, n_train=16, n_test=n)
    model = _tiny(8, 3).to(device)
    m = evaluate_robustness(model, data.images("test"), data.labels("test"), attacks=["clean", "autoattack"],
                            eps=8 / 255, batch_size=250, device=device, check_eps_sweep=False)
    return f"n {m['n']}, clean {m['accuracy']['clean']:.3f}, autoattack {m['accuracy']['autoattack']:.3f}"


def step_nccl(device: torch.device) -> str:
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0)
    try:
        t = torch.ones(4, device=device)
        dist.all_reduce(t)
        assert float(t.sum()) == 4.0
    finally:
        dist.destroy_process_group()
    return backend


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="check every CUDA path in one run")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what the tests run)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile in the distill step")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: FAILED no CUDA device (use --dry-run on a CPU)")
        return 1
    device = torch.device("cpu" if args.dry_run else "cuda")
    small = args.dry_run
    compile_ = not args.no_compile and not args.dry_run
    times: dict[str, float] = {}
    failed: list[str] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        steps: list[tuple[str, Callable[[], str]]] = [
            ("amp", lambda: step_amp(device, small)),
            ("distill", lambda: step_distill(device, small, compile_, out)),
            ("matrix", lambda: step_matrix(device, small, out)),
            ("autoattack", lambda: step_autoattack(device, small)),
            ("nccl", lambda: step_nccl(device)),
        ]
        for name, fn in steps:
            t0 = time.perf_counter()
            try:
                detail = fn()
                print(f"[{name}] ok in {time.perf_counter() - t0:.1f} s: {detail}", flush=True)
            except Exception:  # noqa: BLE001 - a check script reports every failure and goes on
                traceback.print_exc()
                failed.append(name)
                print(f"[{name}] FAILED after {time.perf_counter() - t0:.1f} s", flush=True)
            times[name] = time.perf_counter() - t0
    hw = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    figures = " ".join(f"{k}_s={v:.1f}" for k, v in times.items())
    status = "ok" if not failed else "FAILED " + ",".join(failed)
    print(f"gpu_check: {status} device={hw.replace(' ', '_')} torch={torch.__version__} {figures} "
          f"total_s={time.perf_counter() - t_all:.1f}")
    return 0 if not failed else 1


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "darht-inductor"))
    raise SystemExit(main())
