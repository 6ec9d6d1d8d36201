"""The ecosystem's conventions: experiment trackers, logs when nobody watches, hub-ready model cards,
a report each task reads well in, and the LM task's out-of-domain evaluation."""

from __future__ import annotations

import json

import pytest
import yaml

from potstill.cli import main
from potstill.distill import distill
from potstill.model_card import hub_name
from potstill.progress import LineProgress
from potstill.recipes import load_recipe
from tests.test_teacher_cache import TINY_LM


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """One tiny LM run (trained teacher, scratch, student) with TensorBoard and evaluation every 2 steps."""
    run_dir = tmp_path_factory.mktemp("lm") / "run"
    recipe = load_recipe("tiny-lm", [*[o for o in TINY_LM if o != "baseline=false"], "train.epochs=2",
                                     "train.eval_every=2", "train.report_to=[tensorboard]"])
    return distill(recipe, run_dir, progress=False)


def test_every_logged_row_and_the_final_metrics_reach_tensorboard(lm_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((lm_run.run_dir / "trackers").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in the run directory"
    scalars: dict[str, list[float]] = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    history = json.loads((lm_run.run_dir / "student" / "history.json").read_text())
    logged = [row["loss"] for row in history if "loss" in row]
    assert scalars["student/loss"] == pytest.approx(logged)
    assert scalars["student/eval_bits_per_byte"]
    final = lm_run.metrics["models"]["student"]["bits_per_byte"]
    assert scalars["final/student/bits_per_byte"] == pytest.approx([final])


def test_unknown_trackers_are_named():
    from potstill.config import RecipeError

    with pytest.raises(RecipeError, match=r"unknown tracker 'tensorbord'.*did you mean 'tensorboard'"):
        load_recipe("mnist", ["train.report_to=[tensorbord]"])


def test_evaluation_every_n_steps_reports_kl_and_agreement_next_to_the_quality_metric(lm_run):
    rows = json.loads((lm_run.run_dir / "student" / "history.json").read_text())
    evals = [r for r in rows if "eval_bits_per_byte" in r]
    steps = [r["step"] for r in evals]
    assert len(evals) >= 3 and 2 in steps and 4 in steps  # every 2 steps, and at each epoch's end
    assert all({"eval_kl_to_teacher", "eval_agreement", "eval_bits_per_byte_out_of_domain"} <= r.keys()
               for r in evals)
    # the last evaluation saw the finished student: the final comparison's numbers
    final = lm_run.metrics["models"]["student"]
    assert evals[-1]["eval_kl_to_teacher"] == pytest.approx(final["kl_to_teacher"], rel=1e-6)
    assert evals[-1]["eval_agreement"] == pytest.approx(final["agreement"], rel=1e-6)


def test_the_lm_task_reports_an_out_of_domain_held_out_set(lm_run):
    metrics = lm_run.metrics
    assert "bits_per_byte_out_of_domain" in metrics["headline"]
    for name in ("teacher", "scratch", "student"):
        entry = metrics["models"][name]
        assert entry["bits_per_byte_out_of_domain"] > 0 and entry["bits_per_byte"] > 0
        # a different text: a different score (the same number would mean the same text was scored)
        assert entry["bits_per_byte_out_of_domain"] != pytest.approx(entry["bits_per_byte"], rel=1e-3)
    assert "kl_to_teacher_out_of_domain" in metrics["models"]["student"]


def test_exported_models_carry_a_hub_model_card(lm_run):
    for name in ("teacher", "scratch", "student"):
        text = (lm_run.run_dir / name / "README.md").read_text()
        _, front, body = text.split("---\n", 2)
        meta = yaml.safe_load(front)
        assert meta["library_name"] == "transformers" and meta["tags"] == ["distillation", "potstill"]
        assert "base_model" not in meta  # the teacher was trained here: it has no hub name
        assert f"{lm_run.metrics['models'][name]['bits_per_byte']:.4f}" in body and f"**{name}** (this model)" in body
        assert name == "teacher" or f"{lm_run.metrics['models']['teacher']['bits_per_byte']:.4f}" in body
        assert "potstill distill recipe.yaml" in body and "task: causal-lm" in body
    assert hub_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_name("openai/whisper-small") == "openai/whisper-small"
    assert hub_name("runs/tiny-lm/teacher") is None and hub_name("./x/y") is None


def test_the_report_draws_the_panels_the_run_has_data_for(lm_run):
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from potstill.report import panels

    rows = list(csv.DictReader((lm_run.run_dir / "log.csv").open()))
    drawn = panels(rows, lm_run.metrics)
    fig, axes = plt.subplots(1, len(drawn))
    for ax, draw in zip(axes, drawn, strict=True):
        draw(ax)
    titles = [ax.get_title() for ax in axes]
    assert titles[0] == "hard-label cross-entropy (training)"
    # each panel draws its own column (a late-bound closure once drew the last panel's data everywhere)
    student_ce = [float(r["cross_entropy"]) for r in rows if r["stage"] == "student" and r.get("cross_entropy")]
    lines = {line.get_label(): list(line.get_ydata()) for line in axes[0].get_lines()}
    assert lines["student"] == pytest.approx(student_ce)
    assert "distillation terms (training)" in titles and "bits_per_byte during training" in titles
    assert not any("soft targets" in t for t in titles)  # the softening panel is the classifier's
    bars = axes[titles.index("teacher vs students: bits_per_byte")]
    values = [m["bits_per_byte"] for m in lm_run.metrics["models"].values()]
    low, high = bars.get_ylim()
    assert min(values) > low > 0 and max(values) < high  # zoomed on the differences, not from zero
    plt.close(fig)
    assert (lm_run.run_dir / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_progress_in_a_log_is_a_line_now_and_then_not_a_bar(capsys):
    bar = LineProgress(total=100, desc="student epoch 1/1", every=0.0)
    for _ in range(100):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 101
    assert err.splitlines()[-1].startswith("[student epoch 1/1] 100/100")
    quiet = LineProgress(total=100, desc="x")  # the default: a line every 30 s, so none in a short run
    for _ in range(100):
        quiet.update(1)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_no_progress_silences_the_libraries_bars_too(tmp_path):
    import datasets
    import transformers

    main(["distill", "mnist", "--no-progress", "--output-dir", str(tmp_path / "x"), "--set", "train.epochs=0"])
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert not datasets.is_progress_bar_enabled()
    transformers.utils.logging.enable_progress_bar()
    datasets.enable_progress_bars()
