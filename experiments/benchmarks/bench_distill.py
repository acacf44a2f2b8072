"""Benchmark: one DARHT training step against the sum of its parts, each measured alone.

The parts are what a DARHT step must do on an adversarial batch: the student's inner attack
(10-step PGD on its final-logit CE), the K frozen teachers' forwards, and the student update
(forward with the feature map, ``darht_loss``, backward, SGD step). The step itself runs through
``create_method("darht").step`` exactly as the trainer calls it (``p_adv = 1``, so every measured
step attacks and the parts are comparable). ``ratio = step / (attack + teachers + update)``; the
aim is at most 1.10 (the method adds no work of its own beyond its parts).

Small defaults (ResNet-18-CIFAR at width 8, 3 teachers, batch 64 of 3x32x32) run in about a
minute on 2 CPU cores; on a GPU pass ``--device cuda --width 64 --batch-size 256``. Not a test.

Run:
    python experiments/benchmarks/bench_distill.py [--device cpu] [--threads 2] [--repeats 7]
        [--amp] [--channels-last] [--compile]

``--amp`` (bf16 autocast), ``--channels-last`` and ``--compile`` switch on the trainer's options of
the same names, so their effect on a step is one run each; the last line also gives the peak memory
(CUDA: max allocated; CPU: the process's peak RSS).

On a CPU shared with other jobs, OpenMP's spin-waiting makes multi-threaded timings erratic (a step
can take 5x its usual time); run with ``OMP_WAIT_POLICY=PASSIVE`` or ``--threads 1`` there.

The last line holds every figure (milliseconds per call, medians over the repeats; the ratio of the
minima is also given, as it is less sensitive to other load on a shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
from collections.abc import Callable

import torch

from transfer_analysis.attacks import pgd_attack
from distill.losses import darht_loss
from distill.methods import FrozenTeachers, create_method
from distill.student import build_student
from distill.trainer import peak_memory
from transfer_analysis.models import PixelSpaceModel, create_timm_model
from transfer_analysis.utils import resolve_device

logger = logging.getLogger("bench_distill")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1000


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--width", type=int, default=8, help="base width of the ResNet-18-CIFAR student and teachers")
    p.add_argument("--steps", type=int, default=10, help="PGD steps of the inner attack")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="bf16 autocast around every part, as the trainer's --amp")
    p.add_argument("--channels-last", action="store_true", help="channels_last student, teachers and batch")
    p.add_argument("--compile", action="store_true", help="torch.compile the student backbone and the teachers")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)

    k, c, n, s = args.teachers, args.num_classes, args.batch_size, args.image_size
    student = build_student("resnet18_cifar", c, k, in_chans=3, image_size=s, width=args.width).to(device)
    teachers = {f"t{i}": PixelSpaceModel(create_timm_model("resnet18_cifar", c, 3, width=args.width)).to(device)
                for i in range(k)}
    frozen = FrozenTeachers(teachers)
    method = create_method("darht", eps=8 / 255, steps=args.steps, p_adv=1.0)
    method.bind(frozen)
    method.on_epoch_start(epoch=1, epochs=2, lr=0.1, base_lr=0.1)  # the CE+KD phase: every term is computed
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if args.channels_last:
        student.to(memory_format=torch.channels_last)
        for t in teachers.values():
            t.to(memory_format=torch.channels_last)
    if args.compile:
        student.backbone.compile()
        for t in teachers.values():
            t.compile()
    x = torch.rand(n, 3, s, s, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, c, (n,), device=device)
    student.train()

    def full_step() -> None:
        parts = method.step(student, x, y)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()

    def attack() -> None:
        pgd_attack(student, x, y, eps=method.eps, alpha=method.alpha, steps=method.steps, start=method.start)

    x_adv = pgd_attack(student, x, y, eps=method.eps, alpha=method.alpha, steps=method.steps, start=method.start)

    def teacher_forwards() -> None:
        frozen.logits(x_adv)

    t_logits = frozen.logits(x_adv)

    def update() -> None:
        logits, fmap = student.forward_with_map(x_adv)
        loss = darht_loss(logits, fmap, t_logits, y, phase="ce+kd")["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # Interleave the measurements (round-robin) so that a noisy machine affects all of them alike.
    results: dict[str, list[float]] = {"step": [], "attack": [], "teachers": [], "update": []}
    fns = {"step": full_step, "attack": attack, "teachers": teacher_forwards, "update": update}
    amp = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if args.amp else \
        contextlib.nullcontext
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with amp():
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        for _ in range(args.repeats):
            for name, fn in fns.items():
                results[name].append(_time_ms(fn, device))
    memory = peak_memory(device)
    med = {name: statistics.median(v) for name, v in results.items()}
    best = {name: min(v) for name, v in results.items()}
    parts_sum = med["attack"] + med["teachers"] + med["update"]
    ratio = med["step"] / parts_sum
    ratio_min = best["step"] / (best["attack"] + best["teachers"] + best["update"])
    for name, values in results.items():
        logger.info("%-8s ms per call: %s", name, ", ".join(f"{v:.1f}" for v in values))
    line = (f"bench_distill device={device} threads={args.threads} batch={n} image={s} K={k} width={args.width} "
            f"steps={args.steps} repeats={args.repeats}: step_ms={med['step']:.1f} attack_ms={med['attack']:.1f} "
            f"teachers_ms={med['teachers']:.1f} update_ms={med['update']:.1f} parts_sum_ms={parts_sum:.1f} "
            f"ratio={ratio:.3f} ratio_of_minima={ratio_min:.3f} (aim <= 1.10) amp={int(args.amp)} "
            f"channels_last={int(args.channels_last)} compile={int(args.compile)} "
            f"peak_memory_mb={memory['peak_memory_mb']} ({memory['peak_memory_kind']})")
    print(line)  # noqa: T201 - a script's result line
    return line


if __name__ == "__main__":
    main()
