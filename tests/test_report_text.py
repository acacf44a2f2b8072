"""What a newcomer reads: every picture's text fits, and the report's sentences fit the study.

The pictures are drawn from the committed Fashion-MNIST study (real tables, no training here) with
``Figure.savefig`` watched: every text artist must lie inside the region each save keeps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

from distill.pipeline.claim import plot_claim
from distill.pipeline.report import (
    claim_summary_sentence,
    comparison_sentences,
    plot_robustness_vs_accuracy,
    plot_training_curves,
    plural,
    summarize_students,
)
from transfer_analysis.plots import plot_heatmap, texts_outside

STUDY = Path(__file__).resolve().parents[1] / "results" / "fashion-mnist"
PICTURES = ("transfer_heatmap.png", "recommendation.png", "robustness_vs_accuracy.png", "training_curves.png",
            "claim.png")


@pytest.fixture
def saved_figures(monkeypatch):
    """Every ``Figure.savefig`` call: the figure, whether it saved the tight bounding box, and the
    texts that reach past what it saved (checked right after the save, while the canvas is there)."""
    calls: list[tuple[Figure, bool, list[str]]] = []
    original = Figure.savefig

    def watch(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        tight = kwargs.get("bbox_inches") == "tight"
        calls.append((self, tight, texts_outside(self, tight)))
        return out

    monkeypatch.setattr(Figure, "savefig", watch)
    return calls


def test_every_picture_of_a_study_keeps_all_its_text(tmp_path, saved_figures):
    from transfer_analysis.graph_plot import plot_transfer_graph
    from transfer_analysis.selection import read_matrix, transfer_graph

    matrix, models = read_matrix(STUDY)
    long = pd.read_csv(STUDY / "transfer_long.csv")
    whitebox = long[(long.metric == "target_error") & (long.source == long.target)].set_index("source")
    # long names: the labels and the footnote are where text used to be cut
    renamed = matrix.rename(index=lambda n: f"{n}_with_a_long_name", columns=lambda n: f"{n}_with_a_long_name")
    plot_heatmap(renamed, tmp_path / PICTURES[0], title="transfer rate: pgd, eps 0.1 (0.1000), n=1000",
                 diagonal=whitebox.loc[matrix.index, "value"].to_numpy())
    rec = json.loads((STUDY / "recommendation.json").read_text())
    best = rec["low-transfer"]["sets"][0]["teachers"] if "low-transfer" in rec else list(matrix.index[:3])
    plot_transfer_graph(transfer_graph(matrix, models), tmp_path / PICTURES[1], highlight=best, title="k = 3")
    students = pd.read_csv(STUDY / "students_detail.csv")
    plot_robustness_vs_accuracy(students, tmp_path / PICTURES[2], "pgd20_acc")
    plot_training_curves({rid: STUDY / "students" / rid for rid in students["id"]}, tmp_path / PICTURES[3])
    plot_claim(pd.read_csv(STUDY / "claim_sets.csv"), tmp_path / PICTURES[4])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(PICTURES)
    assert len(saved_figures) == len(PICTURES)
    for _, tight, outside in saved_figures:
        assert tight, "a picture saved without the tight bounding box can cut its text"
        assert outside == []


def test_the_text_check_sees_a_cut_footnote():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    fig.text(0.01, 0.01, "a footnote far longer than the figure is wide, as the heatmap's once was")
    assert texts_outside(fig, tight=False) and not texts_outside(fig, tight=True)


def test_heatmap_diagonal_is_off_the_colour_scale(tmp_path, saved_figures):
    m = pd.DataFrame([[1.0, 0.2], [0.3, 1.0]], index=pd.Index(["a", "b"], name="source"), columns=["a", "b"])
    plot_heatmap(m, tmp_path / "h.png", diagonal=[0.55, 0.4])
    fig, _, _ = saved_figures[0]
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    assert shown.mask[0, 0] and shown.mask[1, 1] and not shown.mask[0, 1]  # the colour bar is transfer rates only
    texts = [t.get_text() for t in ax.texts]
    assert "0.55" in texts and "0.40" in texts and "0.20" in texts
    assert sum(1 for p in ax.patches if p.get_hatch()) == 2


# ------------------------------------------------------------------------------------------ sentences
def _summary(labels_sets: list[tuple[str, str]], seeds: int = 2) -> pd.DataFrame:
    rows = []
    for i, (label, tset) in enumerate(labels_sets):
        for s in range(seeds):
            rows.append({"label": label, "method": label.split("-")[0], "teacher_set": tset, "teachers": "a+b",
                         "seed": s, "pgd20_acc": 0.5 + 0.05 * i + 0.001 * s, "clean_acc": 0.7})
    return summarize_students(pd.DataFrame(rows))


def test_one_student_has_nothing_to_compare_with():
    (sentence,) = comparison_sentences(_summary([("darht-low-transfer", "low-transfer")], seeds=1), "pgd20_acc",
                                       set())
    assert "only student here" in sentence and "nothing to compare it with" in sentence
    assert "No converged" not in sentence


def test_a_named_study_compares_the_low_transfer_student_with_each_other():
    summary = _summary([("darht-low-transfer", "low-transfer"), ("darht-high-transfer", "high-transfer"),
                        ("pgd-at-none", "none"), ("darht-sampled-01", "sampled")])
    sentences = comparison_sentences(summary, "pgd20_acc", set())
    assert len(sentences) == 4  # two others (sampled sets are the claim's) x (robust, clean)
    assert sentences[0].startswith("- darht-low-transfer pgd20 accuracy 0.500 is lower than darht-high-transfer")
    assert any("within the seed spread" in s for s in sentences)  # equal clean accuracy
    (unconverged,) = comparison_sentences(summary, "pgd20_acc", {"darht-low-transfer"})
    assert "did not converge" in unconverged


def test_claim_sentence_for_a_smoke_test_and_for_a_real_study():
    small = claim_summary_sentence({"verdict": "not tested", "statement": "x", "n_sets": 1, "n_students": 1})
    assert small.count("not tested") == 0 and "1 teacher set (" in small and "1 converged DARHT student" in small
    assert "experiments/configs/fashion-mnist.yaml" in small and "smoke test" in small
    real = json.loads((STUDY / "claim.json").read_text())
    big = claim_summary_sentence(real)
    assert big.startswith(f"**Verdict: {real['verdict']}.**")
    assert plural(1, "set") == "1 set" and plural(18, "teacher set") == "18 teacher sets"
