"""What a matrix over your own pretrained timm models costs: images per second, end to end.

Builds four of timm's tiny test architectures (``test_resnet``, ``test_convnext``,
``test_efficientnet``, ``test_vit``: 0.1-0.4 M parameters, pretrained configs at 160 px), saves
them with ``timm.models.save_for_hf`` as ``local-dir:`` folders, writes an image folder of JPEGs,
and times ``run_matrix`` (PGD-10, ε = 4/255) over a 160 px pixel space, as the README's
command runs it. Reports attacked images per second (N sources x n images / attack-stage time)
and the whole run's images per second, on this machine.

    OMP_NUM_THREADS=1 python experiments/benchmarks/bench_own_pool.py [--images 100]

Ends with one line of figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100)
    a = p.parse_args()
    import numpy as np
    import timm
    import torch
    import yaml
    from PIL import Image

    from transfer_analysis.attacks import AttackConfig
    from transfer_analysis.matrix import run_matrix

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        for i in range(a.images):
            d = root / "images" / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (200, 240, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
        archs = ("test_resnet", "test_convnext", "test_efficientnet", "test_vit")
        for arch in archs:
            m = timm.create_model(arch, num_classes=10)
            m.pretrained_cfg = {**m.pretrained_cfg, "num_classes": 10}
            timm.models.save_for_hf(m, str(root / arch), safe_serialization=True)
        (root / "pool.yaml").write_text(yaml.safe_dump({"models": [
            {"name": arch, "arch": f"local-dir:{root / arch}", "pretrained": True} for arch in archs]}))
        t0 = time.perf_counter()
        res = run_matrix(root / "pool.yaml", f"imagefolder:{root / 'images'}?size=160", root / "m",
                         attack=AttackConfig("pgd", eps=4 / 255, steps=10), n_samples=a.images, batch_size=50,
                         device="cpu")
        total = time.perf_counter() - t0
    n = len(archs) * a.images
    print(f"{len(archs)} models x {a.images} images at 160 px, PGD-10: {total:.1f} s in all "
          f"({res.stats['attacks_run']} attacks, {res.stats['target_evaluations']} target evaluations)")
    print(f"figures: threads={torch.get_num_threads()} images_per_s={n / total:.2f} (source-images attacked and "
          f"evaluated on every target per second) seconds={total:.1f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
