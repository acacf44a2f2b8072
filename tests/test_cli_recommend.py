"""`darht recommend` end to end: files in, rec.json + PNG out, exit code 2 with one line on errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.cli import main

MATRIX = ("source,a,b,c,d\n"
          "a,1.0,0.9,0.1,0.2\n"
          "b,0.8,1.0,0.3,0.1\n"
          "c,0.2,0.2,1.0,0.4\n"
          "d,0.1,0.3,0.5,1.0\n")
MODELS = ("model,clean_acc,whitebox_robust_acc,params,family,arch\n"
          "a,0.90,0.50,10000000,cnn,resnet18_cifar\n"
          "b,0.80,0.40,20000000,cnn,preact_resnet18\n"
          "c,0.70,0.30,30000000,vit,vit_tiny\n"
          "d,0.95,0.45,40000000,vit,deit_tiny\n")


@pytest.fixture
def mdir(tmp_path: Path) -> Path:
    d = tmp_path / "matrix"
    d.mkdir()
    (d / "transfer_matrix.csv").write_text(MATRIX)
    (d / "models.csv").write_text(MODELS)
    return d


def recommend(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["recommend", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_recommend_writes_json_and_png(mdir, tmp_path, capsys):
    out = tmp_path / "res" / "rec.json"
    code, stdout, stderr = recommend(capsys, "--matrix", str(mdir), "--k", "3", "--out", str(out))
    assert code == 0 and stdout.strip() == str(out)
    assert "a, c, d" in stderr  # the one-line summary of the best set is logged
    data = json.loads(out.read_text())
    assert (data["objective"], data["pair"], data["k"], data["exact"]) == ("minimax", "max", 3, True)
    assert data["method"] == "enumeration" and data["n_models"] == 4 and data["excluded"] == {}
    assert [s["teachers"] for s in data["sets"]] == [["a", "c", "d"], ["b", "c", "d"], ["a", "b", "d"],
                                                     ["a", "b", "c"]]
    best = data["sets"][0]
    assert best["rank"] == 1 and best["score"] == 0.5 and best["max_pair"] == 0.5
    assert best["mean_pair"] == pytest.approx(0.3)
    assert best["mean_robust_acc"] == pytest.approx((0.50 + 0.30 + 0.45) / 3)
    assert best["total_params"] == 80000000 and best["families"] == ["cnn", "vit", "vit"]
    assert best["pairs"][0] == {"a": "a", "b": "c", "score": 0.2, "transfer_ab": 0.1, "transfer_ba": 0.2}
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_recommend_csv_path_options_and_constraints(mdir, tmp_path, capsys):
    out = tmp_path / "rec.json"
    code, _, _ = recommend(capsys, "--matrix", str(mdir / "transfer_matrix.csv"), "--k", "2", "--objective", "mean",
                           "--pair", "mean", "--top", "2", "--exclude", "d", "--require", "a",
                           "--max-params", "35M", "--min-clean-acc", "0.6", "--out", str(out))
    assert code == 0
    data = json.loads(out.read_text())
    # a with b (0.85, 30M) or c (0.15, 40M > 35M budget): only ab fits
    assert [s["teachers"] for s in data["sets"]] == [["a", "b"]]
    assert data["sets"][0]["score"] == pytest.approx(0.85)
    assert data["constraints"] == {"min_clean_acc": 0.6, "min_robust_acc": None, "require": ["a"],
                                   "exclude": ["d"], "max_params": 35000000}
    assert data["excluded"] == {"d": "excluded by `exclude`"}


def test_recommend_worst_and_family_only(mdir, tmp_path, capsys):
    out = tmp_path / "w.json"
    assert recommend(capsys, "--matrix", str(mdir), "--k", "2", "--worst", "--top", "2", "--out", str(out))[0] == 0
    data = json.loads(out.read_text())
    assert data["worst"] is True and [s["teachers"] for s in data["sets"]] == [["a", "b"], ["c", "d"]]
    out = tmp_path / "f.json"
    assert recommend(capsys, "--matrix", str(mdir), "--k", "2", "--family-only", "--no-plot", "--out", str(out))[0] == 0
    data = json.loads(out.read_text())
    assert data["family_only"] is True
    assert [(s["teachers"], s["family"]) for s in data["sets"]] == [(["c", "d"], "vit"), (["a", "b"], "cnn")]
    assert not out.with_suffix(".png").exists()


def test_recommend_approximate_path_says_so(mdir, tmp_path, capsys):
    out = tmp_path / "rec.json"
    code, _, _ = recommend(capsys, "--matrix", str(mdir), "--k", "3", "--objective", "mean",
                           "--enumeration-limit", "0", "--out", str(out))
    assert code == 0
    data = json.loads(out.read_text())
    assert data["exact"] is False and data["method"] == "local-search"
    assert data["sets"][0]["teachers"] == ["a", "c", "d"]


BAD = {
    "non-square": "source,a,b\na,1,0.2\n",
    "names-differ": "source,a,b\na,1,0.2\nc,0.1,1\n",
    "non-numeric": "source,a,b\na,1,high\nb,0.1,1\n",
    "nan-both-directions": "source,a,b\na,1,nan\nb,nan,1\n",
    "duplicate": "source,a,a\na,1,0.2\na,0.1,1\n",
    "missing-name": "source,a,b\n,1,0.2\nb,0.1,1\n",
    "ragged": "source,a,b\na,1,0.2,0.4\nb,0.1,1\n",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_matrix_exit_2_one_line_no_output(tmp_path, capsys, case):
    (tmp_path / "transfer_matrix.csv").write_text(BAD[case])
    out = tmp_path / "rec.json"
    code, stdout, stderr = recommend(capsys, "--matrix", str(tmp_path), "--k", "2", "--out", str(out))
    assert code == 2 and stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("darht recommend: error: ") and "Traceback" not in stderr
    assert not out.exists() and not out.with_suffix(".png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transfer_matrix.csv"]


@pytest.mark.parametrize("argv, match", [
    (["--k", "5"], "k=5 is larger than the pool: the matrix has 4 models"),
    (["--k", "1"], "k must be at least 2"),
    (["--k", "3", "--min-robust-acc", "0.42"], "only 2 of 4 models qualify"),
    (["--k", "2", "--require", "zz"], "--require: unknown model(s) zz"),
    (["--k", "2", "--max-params", "lots"], "--max-params must be a number"),
    (["--k", "2", "--max-params", "25M"], "no set of k=2 fits --max-params 2.5e+07"),
    (["--k", "2", "--top", "0"], "--top must be at least 1"),
])
def test_user_errors_exit_2_one_line(mdir, tmp_path, capsys, argv, match):
    out = tmp_path / "rec.json"
    code, _, stderr = recommend(capsys, "--matrix", str(mdir), *argv, "--out", str(out))
    assert code == 2
    lines = stderr.splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in stderr
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_missing_matrix_and_bad_out(tmp_path, mdir, capsys):
    code, _, stderr = recommend(capsys, "--matrix", str(tmp_path / "nope"), "--k", "2",
                                "--out", str(tmp_path / "r.json"))
    assert code == 2 and "transfer matrix not found" in stderr and len(stderr.splitlines()) == 1
    code, _, stderr = recommend(capsys, "--matrix", str(mdir), "--k", "2", "--out", str(tmp_path / "r.png"))
    assert code == 2 and "must not end in .png" in stderr
    code, _, stderr = recommend(capsys, "--matrix", str(mdir), "--k", "2", "--out", str(tmp_path))
    assert code == 2 and "is a directory" in stderr


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["recommend", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--matrix", "--k", "--objective", "--pair", "--min-clean-acc", "--min-robust-acc", "--require",
                 "--exclude", "--max-params", "--top", "--worst", "--family-only", "--out"):
        assert flag in text
    assert "not available yet" not in text
