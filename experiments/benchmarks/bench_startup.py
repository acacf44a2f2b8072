"""Start-up time of the command line: each subcommand's `--help`, a refusal and a `recommend` run,
next to a bare `import torch`. Each figure is the best of a few fresh interpreters.

    python experiments/benchmarks/bench_startup.py [--repeat 3]

Prints a table and one line of figures (seconds).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _best(argv: list[str], repeat: int, cwd: str) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=cwd, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        m = Path(d) / "matrix"
        m.mkdir()
        (m / "transfer_matrix.csv").write_text("source,a,b,c\na,1,0.2,0.5\nb,0.3,1,0.1\nc,0.4,0.6,1\n")
        darht = [py, "-m", "distill.cli"]
        cases = {
            "python -c pass": [py, "-c", "pass"],
            "import torch": [py, "-c", "import torch"],
            "import torch, timm, torchattacks": [py, "-c", "import torch, timm, torchattacks"],
            "darht --help": [*darht, "--help"],
            **{f"darht {sub} --help": [*darht, sub, "--help"]
               for sub in ("matrix", "recommend", "train-teacher", "distill", "evaluate", "pipeline")},
            "darht matrix (missing pool: refusal)": [*darht, "matrix", "--pool", "no.yaml", "--dataset", "synthetic",
                                                     "--out", "m"],
            "darht recommend --no-plot (a whole run)": [*darht, "recommend", "--matrix", str(m), "--k", "2", "--out",
                                                        "r1.json", "--no-plot", "--force"],
            "darht recommend (a whole run, with rec.png)": [*darht, "recommend", "--matrix", str(m), "--k", "2",
                                                            "--out", "r2.json", "--force"],
        }
        times = {name: _best(argv, args.repeat, d) for name, argv in cases.items()}
    width = max(map(len, times))
    for name, t in times.items():
        print(f"{name:<{width}}  {t:6.2f} s")
    torch_t = times["import torch"]
    print("figures: " + ", ".join(f"{k}={v:.2f}s" for k, v in times.items()) + f"; help/torch ratio "
          f"{times['darht --help'] / torch_t:.2f}")


if __name__ == "__main__":
    main()
