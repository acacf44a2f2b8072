"""Time `select_teachers` on random transfer matrices (CPU; no timing is asserted anywhere).

Runs exact minimax on 40 models with k=4, then minimax and mean on 200 models with k=5 (minimax
exact by threshold + clique search, mean approximate by local search), and prints the seconds of
each; the last line holds all of them.

    python experiments/benchmarks/bench_recommend.py [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from transfer_analysis.selection import select_teachers


def random_pool(n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A transfer matrix with family structure (high transfer inside a family) and a models table."""
    rng = np.random.default_rng(seed)
    fam = rng.integers(0, 5, size=n)
    base = rng.beta(2, 5, size=(n, n))
    t = np.clip(base + 0.35 * (fam[:, None] == fam[None, :]), 0, 1)
    np.fill_diagonal(t, 1.0)
    names = [f"m{i:03d}" for i in range(n)]
    models = pd.DataFrame({"model": names, "clean_acc": rng.uniform(0.7, 0.95, n),
                           "whitebox_robust_acc": rng.uniform(0.3, 0.6, n),
                           "params": rng.integers(1, 100, n) * 1_000_000,
                           "family": [f"f{f}" for f in fam]})
    return pd.DataFrame(t, index=names, columns=names), models


def timed(n: int, k: int, objective: str, seed: int) -> tuple[float, bool]:
    matrix, models = random_pool(n, seed)
    t0 = time.perf_counter()
    rec = select_teachers(matrix, k=k, objective=objective, models=models, top=5)
    return time.perf_counter() - t0, rec.exact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    runs = [(40, 4, "minimax"), (200, 5, "minimax"), (200, 5, "mean")]
    parts = []
    for n, k, obj in runs:
        sec, exact = timed(n, k, obj, args.seed)
        parts.append(f"{n}/k={k} {obj}: {sec:.2f} s ({'exact' if exact else 'approximate'})")
    print("select_teachers: " + "; ".join(parts))


if __name__ == "__main__":
    main()
