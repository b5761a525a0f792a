"""The sampling / eval CLIs and the training entry points, on tiny models and the real digits."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from distill import sample as sample_cli
from distill.checkpoint import load_state
from distill.data import to_uint8
from distill.digits.data import load_digits_split
from distill.errors import UserError
from distill.eval import rate as eval_cli
from distill.teachers import load_teacher


def run_cli(main, argv, capsys):
    """Run a CLI main; return (exit code, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_sample_writes_npz_and_grid(tiny_pixel_dir, tmp_path, capsys):
    out = tmp_path / "s.npz"
    code, err = run_cli(sample_cli.main, ["--model", str(tiny_pixel_dir), "--sampler", "ddim", "--nfe", "2",
                                          "--n", "7", "--seed", "3", "--out", str(out)], capsys)
    assert code == 0, err
    data = np.load(out)
    assert data["images"].shape == (7, 8, 8, 1) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert out.with_suffix(".png").exists()
    assert data["images"].std() > 0


def test_samples_do_not_depend_on_batch_size(tiny_pixel_dir):
    teacher = load_teacher(tiny_pixel_dir)
    labels = torch.tensor([0, 1, 2, 1, 0])
    a = sample_cli.sample_teacher(teacher, "dpmpp-2m", 3, 5, labels, seed=1, batch_size=2, progress=False)
    b = sample_cli.sample_teacher(teacher, "dpmpp-2m", 3, 5, labels, seed=1, batch_size=5, progress=False)
    c = sample_cli.sample_teacher(teacher, "dpmpp-2m", 3, 5, labels, seed=2, batch_size=5, progress=False)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_labels_syntax():
    assert sample_cli.parse_labels("cycle", 12, 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert sample_cli.parse_labels("3,5", 5, 10).tolist() == [3, 5, 3, 5, 3]
    assert sample_cli.parse_labels(None, 3, None) is None


@pytest.mark.parametrize("argv,message", [
    (["--model", "{missing}"], "does not exist"),
    (["--model", "{empty}"], "holds no loadable teacher"),
    (["--model", "{teacher}", "--nfe", "0"], "--nfe 0"),
    (["--model", "{teacher}", "--sampler", "heun", "--nfe", "4"], "must be odd"),
    (["--model", "{teacher}", "--labels", "7"], "class label 7 is out of range"),
    (["--model", "{teacher}", "--labels", "a,b"], "--labels must be"),
    (["--model", "{teacher}", "--sampler", "plms"], "invalid choice"),
])
def test_bad_input_is_one_clear_line(argv, message, tiny_pixel_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "teacher": tiny_pixel_dir}
    argv = [a.format(**paths) for a in argv] + ["--n", "2", "--out", str(tmp_path / "o.npz")]
    code, err = run_cli(sample_cli.main, argv, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(("error:", "usage:", "python -m")) or "error:" in err


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distill.sample", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: model path {tmp_path / 'missing'} does not exist"


def test_eval_on_real_heldout_samples(tmp_path, capsys):
    x, y = load_digits_split("heldout")
    npz = tmp_path / "real.npz"
    np.savez(npz, images=to_uint8(x).numpy(), labels=y.numpy())
    code, err = run_cli(eval_cli.main, ["--samples", str(npz), "--out", str(tmp_path / "ev")], capsys)
    assert code == 0, err
    records = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert len(records) == 1 and records[0]["n"] == 360
    assert records[0]["accuracy"] >= 0.97 and records[0]["fd"] < 0.5
    # the held-out split against itself: FD 0 there, not against the training split
    assert records[0]["fd_heldout"] < 1e-4 < 0.01 < records[0]["fd"]
    assert (tmp_path / "ev" / records[0]["grid"].split("/")[-1]).exists()


def test_eval_rejects_both_or_neither(tmp_path, capsys):
    code, err = run_cli(eval_cli.main, ["--out", str(tmp_path)], capsys)
    assert code == 2 and "exactly one of --model" in err


def test_teacher_training_resumes_exactly(tmp_path, monkeypatch):
    """Interrupted after the first checkpoint and re-run, training ends with the same weights."""
    from distill.digits import teacher as teacher_mod

    cfg = teacher_mod.TeacherConfig(steps=4, batch_size=4, checkpoint_every=2, warmup=2)
    straight = teacher_mod.train_teacher(cfg, tmp_path / "a", tmp_path / "a" / "teacher")

    real_save = teacher_mod.save_state

    def save_then_crash(path, state):
        real_save(path, state)
        raise KeyboardInterrupt  # stands in for a kill right after the step-2 checkpoint

    monkeypatch.setattr(teacher_mod, "save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        teacher_mod.train_teacher(cfg, tmp_path / "b", tmp_path / "b" / "teacher")
    assert load_state(tmp_path / "b" / "state.safetensors")["step"] == 2
    monkeypatch.setattr(teacher_mod, "save_state", real_save)
    resumed = teacher_mod.train_teacher(cfg, tmp_path / "b", tmp_path / "b" / "teacher")

    assert load_state(tmp_path / "b" / "state.safetensors")["step"] == 4
    a, b = load_teacher(straight), load_teacher(resumed)
    for (k, va), vb in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values()):
        assert torch.equal(va, vb), k
    meta = json.loads((resumed / "fewstep_teacher.json").read_text())
    assert meta["num_classes"] == 10 and meta["null_class"] == 10
    # A different config in the same folder is refused rather than silently mixed.
    with pytest.raises(Exception, match="different config"):
        teacher_mod.train_teacher(teacher_mod.TeacherConfig(steps=5, batch_size=4), tmp_path / "b", tmp_path / "c")


def test_classifier_training_smoke(tmp_path):
    from distill.eval.classifier import ClassifierConfig, load_classifier, train_classifier

    acc = train_classifier(ClassifierConfig(epochs=1, batch_size=64), tmp_path / "clf")
    model = load_classifier(tmp_path / "clf")
    x, y = load_digits_split("heldout")
    with torch.no_grad():
        assert model.features(x[:5]).shape == (5, 64)
        recomputed = (model(x).argmax(1) == y).float().mean().item()
    assert recomputed == pytest.approx(acc)
    assert acc > 0.2  # one epoch already beats chance (0.1)


def test_compare_students_summary_and_bad_input(tmp_path, capsys):
    """Mean and spread over seeds, and seed-for-seed wins against the first model; a folder that is not a
    student bundle is one error line."""
    from benchmarks import compare_students

    def model(name, fds, heldouts):
        return {"name": name, "nfe": 1, "scores": [{"fd": a, "fd_heldout": b, "accuracy": 1.0}
                                                   for a, b in zip(fds, heldouts)]}

    rows = compare_students.summary([model("a", [0.10, 0.20, 0.30], [0.5, 0.5, 0.5]),
                                     model("b", [0.05, 0.25, 0.25], [0.6, 0.4, 0.6])])
    assert rows[1]["fd"] == pytest.approx(0.55 / 3) and rows[1]["fd_sd"] == pytest.approx(np.std([0.05, 0.25, 0.25],
                                                                                                  ddof=1))
    assert (rows[1]["fd_wins"], rows[1]["fd_heldout_wins"], rows[0]["fd_wins"]) == (2, 1, 0)
    assert "| b | 1 | 0.1833 ± 0.1155 |" in compare_students.table(rows, [1, 2, 3], 10)
    code, err = run_cli(compare_students.main, [str(tmp_path / "nothing")], capsys)
    assert code == 2 and "is not a student bundle folder" in err and "Traceback" not in err


def test_compare_students_reads_the_runs_ratings_over_training(tmp_path):
    """rating_curves: the (steps done, rating) pairs a run logged beside its bundle, in order, skipping records
    without a rating and a torn last line; a bundle whose run logged none is left out."""
    from benchmarks import compare_students

    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    lines = [{"step": 98, "loss_fake": 0.1}, {"step": 99, "selection_score": 0.5}, {"step": 199, "loss_fake": 0.1},
             {"step": 199, "selection_score": 0.25}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 2')
    (tmp_path / "bare" / "student").mkdir(parents=True)
    curves = compare_students.rating_curves([run / "student", tmp_path / "bare" / "student"])
    assert curves == {str(run / "student"): [(100, 0.5), (200, 0.25)]}
    compare_students.curves_picture(curves, {str(run / "student"): 4}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_compare_students_reuses_what_its_out_file_holds(tmp_path):
    """Measurements already in OUT.json (same model, NFE, sample count and seed) are reused, not sampled again;
    a file that is not a result is a clear error."""
    from benchmarks import compare_students

    name = "teacher, DPM-Solver++(2M) 50 steps"
    old = [{"name": name, "nfe": 50, "n": 10, "seeds": [1, 2], "scores": [{"fd": 0.5, "fd_heldout": 0.6,
                                                                           "accuracy": 1.0}] * 2}]
    out = tmp_path / "cmp.json"
    out.write_text(json.dumps({"summary": [], "models": old}))
    done = compare_students.measured(out)
    assert set(done) == {(name, 50, 10, 1), (name, 50, 10, 2)}
    # 50 guided steps of 10 samples per seed would take seconds; reused, nothing is sampled
    models = compare_students.compare([], [1, 2], n=10, teacher_nfe=50, progress=False, done=done)
    assert models[0]["scores"] == old[0]["scores"]
    out.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a compare_students result"):
        compare_students.measured(out)
