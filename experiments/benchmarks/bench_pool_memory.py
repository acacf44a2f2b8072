"""Peak memory of a matrix over a pool larger than the model budget, and of image folders as they grow.

Two measurements, each in fresh processes (peak RSS is per process):

1. ``darht matrix`` over N/3 and N ResNet-18 (CIFAR stem, width 64: 11.2 M parameters, 43 MB each)
   with ``max_model_bytes`` unlimited and at 2.5 models: the process peak RSS, the model bytes held
   at the peak, the model builds, and the time ratio (models are rebuilt when let go). With the
   budget, the peak RSS should not grow with N.
2. A class-balanced subset of 100 images decoded from image folders of 300 and 3000 files: the
   peak RSS should not grow with the folder (only the file list does).

    OMP_NUM_THREADS=1 python experiments/benchmarks/bench_pool_memory.py [--models 12]

Ends with one line of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child_matrix(pool: str, out: str, budget: str | None) -> None:
    from transfer_analysis.attacks import AttackConfig
    from transfer_analysis.matrix import run_matrix
    from transfer_analysis.runtime import peak_memory

    t0 = time.perf_counter()
    run_matrix(pool, "synthetic:num_classes=10,in_chans=3,image_size=32,n_train=10,n_test=40", out,
               attack=AttackConfig("fgsm", eps=8 / 255), n_samples=40, batch_size=40, device="cpu",
               max_model_bytes=None if budget is None else int(budget))
    env = json.loads((Path(out) / "env.json").read_text())["memory"]
    print(json.dumps({**env, **peak_memory(__import__("torch").device("cpu")), "seconds": time.perf_counter() - t0}))


def _child_folder(folder: str) -> None:
    import torch

    from transfer_analysis.data import balanced_subset, load_dataset
    from transfer_analysis.runtime import peak_memory

    ds = load_dataset(f"imagefolder:{folder}?size=64&workers=0")
    x = ds.images("test", balanced_subset(ds.y_test, 100, seed=0))
    print(json.dumps({"files": len(ds.test_files), "decoded": int(x.shape[0]), **peak_memory(torch.device("cpu"))}))


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _make_folder(root: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=85)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=12, help="the larger pool (the smaller has a third)")
    p.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        if a.child[0] == "matrix":
            _child_matrix(a.child[1], a.child[2], a.child[3] if len(a.child) > 3 else None)
        else:
            _child_folder(a.child[1])
        return
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_mb = 11_173_962 * 4 / 2**20
        rows = {}
        for n in (a.models // 3, a.models):
            pool = tmp_path / f"pool{n}.yaml"
            pool.write_text(yaml.safe_dump({"models": [{"name": f"m{i}", "arch": "resnet18_cifar",
                                                        "kwargs": {"width": 64}} for i in range(n)]}))
            rows[n] = (_run(["--child", "matrix", str(pool), str(tmp_path / f"full{n}")]),
                       _run(["--child", "matrix", str(pool), str(tmp_path / f"lazy{n}"),
                             str(int(2.5 * model_mb * 2**20))]))
            print(f"pool: {n} models x {model_mb:.0f} MB = {n * model_mb:.0f} MB of weights")
            for name, r in zip(("unlimited", "budget 2.5 models"), rows[n]):
                print(f"  {name:>18}: peak RSS {r['peak_memory_mb']:.0f} MB, models held at most "
                      f"{r['peak_model_bytes_held'] / 2**20:.0f} MB, builds {r['model_builds']}, {r['seconds']:.1f} s")
        small = _run(["--child", "folder", str(_make_folder(tmp_path / "f300", 300))])
        large = _run(["--child", "folder", str(_make_folder(tmp_path / "f3000", 3000))])
        print(f"image folder, 100 images decoded: {small['files']} files peak RSS {small['peak_memory_mb']:.0f} MB, "
              f"{large['files']} files {large['peak_memory_mb']:.0f} MB")
    lo, hi = a.models // 3, a.models
    grow_full = rows[hi][0]["peak_memory_mb"] - rows[lo][0]["peak_memory_mb"]
    grow_lazy = rows[hi][1]["peak_memory_mb"] - rows[lo][1]["peak_memory_mb"]
    print(f"figures: rss_growth_unlimited_mb={grow_full:.0f} rss_growth_budget_mb={grow_lazy:.0f} "
          f"(pool {lo} -> {hi} models, +{(hi - lo) * model_mb:.0f} MB of weights) "
          f"time_ratio_budget_{hi}={rows[hi][1]['seconds'] / rows[hi][0]['seconds']:.2f} "
          f"folder_rss_300={small['peak_memory_mb']:.0f} folder_rss_3000={large['peak_memory_mb']:.0f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
