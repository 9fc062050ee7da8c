"""mc_eval's plots: accuracy per policy with the 95% Wilson interval of each point's n examples."""
import os
import sys
import json

import pytest

from megacontext.evals import wilson_interval


def test_wilson_interval_values_and_edges():
    lo, hi = wilson_interval(0.5, 40)
    assert lo == pytest.approx(0.352, abs=1e-3) and hi == pytest.approx(0.648, abs=1e-3)
    assert wilson_interval(0.0, 40) == (0.0, pytest.approx(0.0876, abs=1e-3)), "not empty at p = 0"
    assert wilson_interval(1.0, 40) == (pytest.approx(0.9124, abs=1e-3), 1.0)
    a, b = wilson_interval(0.95, 40), wilson_interval(0.95, 400)
    assert a[0] < b[0] < 0.95 < b[1] < a[1], "more examples, a narrower interval around p"
    for bad in ((0.5, 0), (1.5, 40), (-0.1, 40)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_replot_draws_every_task_from_the_results_json(tmp_path, monkeypatch):
    """--replot needs no model: the plots of a results file, bands and single-point bars included."""
    from nanochat.common import main_guard
    from scripts import mc_eval
    acc = {"passkey": {"2048": {"union": 1.0, "recency": 0.25, "full": 0.6}, "8192": {"union": 0.93, "recency": 0.05}},
           "multikey": {"2048": {"union": 0.62, "recency": 0.15}, "8192": {"union": 0.88, "recency": 0.03}}}
    res = {"config": {"W": 512, "n": 40, "H": 64}, "accuracy": acc, "accuracy_train_phrasing": acc,
           "loss_vs_distance": {"union": [[512, 2.2], [1024, 2.6]]}}
    (tmp_path / "mc_eval.json").write_text(json.dumps(res))
    monkeypatch.setattr(sys, "argv", ["mc_eval", "--replot", "--out", str(tmp_path)])
    main_guard(mc_eval.main)
    for name in ("acc_passkey.png", "acc_multikey.png", "loss_vs_distance.png"):
        assert os.path.getsize(tmp_path / name) > 10_000, name


def test_replot_without_results_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from nanochat.common import main_guard
    from scripts import mc_eval
    monkeypatch.setattr(sys, "argv", ["mc_eval", "--replot", "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as e:
        main_guard(mc_eval.main)
    assert e.value.code != 0 and "no results" in capsys.readouterr().err
