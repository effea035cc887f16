"""The perception axis of eval and sweep: the Frechet distance, the digit classifier that judges, its cache."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ddim_inpaint as di
from test_pipeline import TINY, run_cli

CPU = torch.device("cpu")


def test_the_judge_learns_the_digits_and_is_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(di, "CLASSIFIER_DIR", tmp_path)
    data = di.load_mnist5k()
    judge, record = di.load_judge(data, CPU)  # the real recipe: CLASSIFIER_STEPS on the 4,000 training digits
    assert record["test_accuracy"] >= 95, f"a digit classifier should get 95% of MNIST: {record}"
    assert (record["data"], record["n_train"], record["seed"]) == ("mnist5k", 4000, di.CLASSIFIER_SEED)
    logits, features = judge(data.test[:50])
    assert logits.shape == (50, 10) and features.shape == (50, di.FEATURES) and (features >= 0).all()
    assert "trained the digit classifier" in capsys.readouterr().out

    def no_training(*args):
        raise AssertionError("the cached classifier must be read, not retrained")

    monkeypatch.setattr(di, "train_classifier", no_training)
    judge_again, record_again = di.load_judge(data, CPU)
    assert torch.equal(judge_again(data.test[:50])[0], logits) and record_again == record

    path = Path(record["path"])  # a damaged cache is retrained, never trusted
    path.write_bytes(path.read_bytes()[:100])
    monkeypatch.setattr(di, "train_classifier", lambda data, device: (di.DigitClassifier(), {**record, "steps": -1}))
    assert di.load_judge(data, CPU)[1]["steps"] == -1
    assert "unreadable" in capsys.readouterr().out
    assert torch.load(path, weights_only=True)["record"]["steps"] == -1, "the retrained judge replaces the file"


def test_the_judge_does_not_depend_on_the_thread_count(monkeypatch):
    # How a CPU splits its sums across threads moves the weights' last bits, and with them every Frechet distance.
    monkeypatch.setattr(di, "CLASSIFIER_STEPS", 20)
    data, threads, weights = di.load_mnist5k(), torch.get_num_threads(), []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            weights.append(di.train_classifier(data, CPU)[0].state_dict())
            assert torch.get_num_threads() == n, "training the judge must give the thread count back"
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "1 and 3 threads: another judge"


@pytest.fixture
def quick_judge(tmp_path, monkeypatch):
    """A judge trained for 100 steps (seconds) in a temp cache: enough to tell a digit from a black hole."""
    monkeypatch.setattr(di, "CLASSIFIER_DIR", tmp_path / "classifier")
    monkeypatch.setattr(di, "CLASSIFIER_STEPS", 100)


def test_eval_reports_both_axes_with_the_untouched_digits_as_ceiling(tmp_path, quick_judge, capsys):
    run_cli("train", *TINY, out_dir=tmp_path)
    run_cli("eval", *TINY, "--perception", out_dir=tmp_path)
    result = json.loads((tmp_path / "results" / "inpaint_metrics.json").read_text())
    table, record = result["metrics"], result["perception_judge"]
    assert record["steps"] == 100 and Path(record["path"]).is_file()
    assert all("accuracy" in r and "frechet" in r for r in table.values()), "every method on both axes"
    truth = table["ground truth (ceiling)"]
    data = di.load_mnist5k()
    judge, _ = di.load_judge(data, CPU)
    hand = 100 * (judge(data.test[:20])[0].argmax(1) == data.test_labels[:20]).double().mean().item()
    assert truth["accuracy"] == pytest.approx(hand) and truth["psnr"] == di.PERFECT_FILL_DB
    assert abs(truth["frechet"]) < 1e-6 < min(r["frechet"] for name, r in table.items() if r is not truth)
    each = table["DDIM sample (3 steps)"]["frechet_each_sample"]  # TINY draws 2 samples per digit
    assert len(each) == 2 and each[0] == pytest.approx(table["DDIM sample (3 steps)"]["frechet"]) and each[0] != each[1]
    assert table["zero (black) fill"]["accuracy"] < truth["accuracy"], "a black 16x16 hole hides the digit"
    out = capsys.readouterr().out
    assert "acc %" in out and "FD" in out and "ground truth (ceiling)" in out

    # Your own digits have no labels: no accuracy, but the distance to the untouched digits still.
    np.save(tmp_path / "digits.npy", ((data.test[:6, 0] + 1) * 127.5).round().to(torch.uint8).numpy())
    run_cli("eval", *TINY, "--perception", "--images", str(tmp_path / "digits.npy"), out_dir=tmp_path)
    table = json.loads((tmp_path / "results" / "inpaint_metrics.json").read_text())["metrics"]
    assert all("accuracy" not in r and "frechet" in r for r in table.values())
    assert "no digit labels" in capsys.readouterr().out
