"""The main job: ``python -m bilevel demo`` (bilevel/_demo.py, bilevel/__main__.py).

Oracle: the baseline's own validation loss. The tuned per-weight decays start at
the baseline's best global decay and follow exact-enough hypergradients, so the
validation loss must go below the baseline's; the numbers come from the result
dict of ``_demo.run``, not from parsing text.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the demo's datasets ship with scikit-learn")

from bilevel import _demo  # noqa: E402
from bilevel.__main__ import main  # noqa: E402

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
REPO = Path(__file__).resolve().parents[1]


def _check_result(res: dict) -> None:
    base, tuned = res["baseline"], res["tuned"]
    assert tuned["val_loss"] < base["val_loss"], (tuned["val_loss"], base["val_loss"])
    for part in (base, tuned):
        for key in ("val_loss", "test_loss", "test_acc", "wall_s"):
            assert math.isfinite(part[key])
        assert 0.5 < part["test_acc"] <= 1.0
    hist = tuned["history"]
    assert len(hist) == res["config"]["outer_steps"]
    assert len(tuned["decays"]) == res["n_hparams"]
    assert all(d > 0 for d in tuned["decays"])
    for rec in hist:
        # The inner problem is solved to high accuracy: the IFT's premise holds.
        assert rec["inner_grad_norm"] < 1e-6
        assert rec["solver_iters"] is not None and rec["solver_iters"] >= 1
        assert math.isfinite(rec["hypergrad_norm"])
    # Step 0 is evaluated at the baseline's decay: the same model as the baseline.
    assert hist[0]["val_loss"] == pytest.approx(base["val_loss"], rel=1e-6)


def test_main_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_json = tmp_path / "result.json"
    rc = main(["demo", "--quick", "--out", tmp_path, "--json", out_json])
    assert rc == 0
    captured = capsys.readouterr()
    assert "baseline" in captured.out and "tuned" in captured.out
    assert "outer step" in captured.err  # progress on stderr (not a TTY here: line mode)
    pngs = list(tmp_path.glob("*.png"))
    if HAS_MPL:
        assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000
        assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not pngs and "plot skipped" in captured.out
    res = json.loads(out_json.read_text())
    assert res["dataset"] == "breast_cancer" and res["solver"] == "cg"
    _check_result(res)


@pytest.mark.parametrize("solver", ["cg", "neumann", "nystrom"])
def test_run_quick_beats_baseline(solver: str) -> None:
    res = _demo.run(dataset="breast_cancer", solver=solver, quick=True, progress=False)
    _check_result(res)
    assert res["plot"] is None  # no out_dir: no plot


def test_run_digits_quick() -> None:
    res = _demo.run(dataset="digits", quick=True, outer_steps=3, progress=False)
    assert res["n_hparams"] == 64 * 10 and res["n_classes"] == 10
    _check_result(res)


def test_split_is_deterministic_and_standardized() -> None:
    a = _demo.load_split("breast_cancer", seed=3, n_train=100, n_val=235)
    b = _demo.load_split("breast_cancer", seed=3, n_train=100, n_val=235)
    c = _demo.load_split("breast_cancer", seed=4, n_train=100, n_val=235)
    assert (a.X_train == b.X_train).all() and (a.y_test == b.y_test).all()
    assert not (a.X_train == c.X_train).all()
    assert a.X_train.shape == (100, 30) and a.X_val.shape == (235, 30) and a.X_test.shape == (569 - 335, 30)
    assert a.X_train.mean(0).abs().max() < 1e-12
    assert (a.X_train.std(0, unbiased=False) - 1).abs().max() < 1e-12


def test_progress_bar_modes() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = _demo.Progress(4, stream=tty)
    for i in range(1, 5):
        bar.update(i, "x")
    bar.close()
    assert tty.getvalue().count("\r") == 4 and "4/4" in tty.getvalue()
    pipe = io.StringIO()
    bar = _demo.Progress(20, stream=pipe, every=10)
    for i in range(1, 21):
        bar.update(i)
    assert pipe.getvalue().count("\n") == 2
    off = io.StringIO()
    bar = _demo.Progress(3, stream=off, enabled=False)
    bar.update(1)
    bar.close()
    assert off.getvalue() == ""


def test_plot_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_mpl(result: dict, out_dir: str) -> str:
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(_demo, "save_plot", no_mpl)
    res = _demo.run(quick=True, outer_steps=2, progress=False, out_dir=str(tmp_path))
    assert res["plot"] is None and "pip install matplotlib" in res["plot_skipped"]
    assert "plot skipped" in _demo.format_report(res)


def test_cli_usage_errors(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--dataset", "mnist"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["demo", "--outer-steps", "0"])
    with pytest.raises(TypeError, match="unknown settings"):
        _demo.run(quick=True, progress=False, n_epochs=3)


def test_python_m_bilevel_demo_quick(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bilevel", "demo", "--quick", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tuned" in proc.stdout
    if HAS_MPL:
        assert list(tmp_path.glob("*.png"))
