"""The main job: ``python -m bilevel demo`` (bilevel/demo/, bilevel/__main__.py).

Oracle: the baseline's own validation loss. Default task (mlp): the per-weight
decays start at the baseline's best global decay, with the same initialization,
minibatches and number of Adam steps, and hypergradient steps must take the
validation loss below the baseline's. Task logreg: the inner problem is solved
exactly and the tuned decays must beat the baseline likewise. The numbers come
from the result dicts (or the --json file), not from parsing text.
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

from bilevel import demo  # noqa: E402
from bilevel.demo import data as demo_data, report as demo_report  # noqa: E402
from bilevel.demo.tasks import logreg, mlp  # noqa: E402
from bilevel.__main__ import build_parser, main  # noqa: E402

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- mlp (default task)
def _check_mlp_result(res: dict) -> None:
    base, tuned, cfg = res["baseline"], res["tuned"], res["config"]
    assert res["task"] == "mlp"
    assert tuned["val_loss"] < base["val_loss"], (tuned["val_loss"], base["val_loss"])
    for part in (base, tuned):
        for key in ("val_loss", "test_loss", "val_acc", "test_acc", "wall_s"):
            assert math.isfinite(part[key])
        assert 0.8 < part["test_acc"] <= 1.0
    # The baseline is the best of its grid, on the same training budget.
    assert base["val_loss"] == min(r["val_loss"] for r in base["grid"])
    assert len(base["grid"]) == len(cfg["grid"])
    assert tuned["curve"]["step"][-1] == base["curve"]["step"][-1] == cfg["inner_steps"]
    assert tuned["hyper_steps"] == cfg["inner_steps"] // cfg["hyper_every"]
    assert 0 <= tuned["skipped_hyper_steps"] <= tuned["hyper_steps"] // 2
    ds = tuned["decay_stats"]
    assert sum(sum(h) for h in ds["hist"].values()) == res["n_hparams"]
    assert 0 < ds["min"] < ds["max"] and ds["min"] < base["decay"] < ds["max"]   # the decays moved apart
    # Step 0: the same initialization in both runs.
    assert tuned["curve"]["val_loss"][0] == pytest.approx(base["curve"]["val_loss"][0], rel=1e-6)


def test_default_config_has_over_100k_hyperparameters() -> None:
    cfg = mlp.MLPConfig().resolved()
    assert cfg.layer_sizes == [64, 512, 256, 10]
    assert cfg.n_hparams == 64 * 512 + 512 * 256 + 256 * 10 == 166_400
    assert cfg.inner_steps == 1000 and len(cfg.grid) == 9
    model = mlp.make_mlp(cfg)
    import bilevel as bl

    hp, _ = bl.hparams.weight_decay(model, per="parameter", exclude=("bias",))
    assert sum(v.numel() for v in hp.values()) == cfg.n_hparams
    # --quick keeps the network (so the same number of hyperparameters) and shortens the run.
    q = mlp.MLPConfig(quick=True).resolved()
    assert q.n_hparams == cfg.n_hparams and q.inner_steps < cfg.inner_steps and len(q.grid) < len(cfg.grid)


def test_main_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_json = tmp_path / "result.json"
    rc = main(["demo", "--quick", "--out", tmp_path, "--json", out_json])
    assert rc == 0
    captured = capsys.readouterr()
    assert "baseline" in captured.out and "tuned" in captured.out
    assert "166,400" in captured.out and "skipped" in captured.out
    assert "tuned step" in captured.err and "baseline step" in captured.err  # progress on stderr (line mode)
    pngs = sorted(tmp_path.glob("*.png"))
    if HAS_MPL:
        assert [p.name for p in pngs] == ["demo_mlp_seed0_curves.png", "demo_mlp_seed0_decays.png"]
        for p in pngs:
            assert p.stat().st_size > 10_000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not pngs and "plot skipped" in captured.out
    res = json.loads(out_json.read_text())
    assert res["n_hparams"] >= 100_000
    _check_mlp_result(res)


def test_mlp_plot_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_mpl(result: dict, out_dir: str) -> list:
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(demo_report, "save_mlp_plots", no_mpl)
    res = demo.run(task="mlp", progress=False, out_dir=str(tmp_path), hidden=(16,), inner_steps=20,
                    hyper_every=5, grid=(1e-3, 1e-2))
    assert res["plots"] == [] and "pip install matplotlib" in res["plot_skipped"]
    assert res["n_hparams"] == 64 * 16 + 16 * 10
    assert "plot skipped" in demo.format_report(res)


def test_mlp_cg_solver_runs() -> None:
    res = mlp.run(solver="cg", progress=False, hidden=(32,), inner_steps=30, hyper_every=5, grid=(1e-3,))
    assert res["tuned"]["hyper_steps"] == 6 and "bl.CG" in res["solver_repr"]
    assert all(math.isfinite(h["hypergrad_norm"]) for h in res["tuned"]["hyper"] if not h["skipped"])


# --------------------------------------------------------------------------- logreg task
def _check_logreg_result(res: dict) -> None:
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


def test_main_demo_logreg_quick(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_json = tmp_path / "result.json"
    rc = main(["demo", "--task", "logreg", "--quick", "--out", tmp_path, "--json", out_json])
    assert rc == 0
    captured = capsys.readouterr()
    assert "baseline" in captured.out and "tuned" in captured.out
    assert "outer step" in captured.err
    pngs = list(tmp_path.glob("*.png"))
    if HAS_MPL:
        assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000
    res = json.loads(out_json.read_text())
    assert res["task"] == "logreg" and res["dataset"] == "breast_cancer" and res["solver"] == "cg"
    _check_logreg_result(res)


@pytest.mark.parametrize("solver", ["neumann", "nystrom"])
def test_logreg_quick_beats_baseline(solver: str) -> None:
    res = demo.run(task="logreg", solver=solver, quick=True, progress=False)
    _check_logreg_result(res)
    assert res["plot"] is None  # no out_dir: no plot


def test_logreg_digits_quick() -> None:
    res = logreg.run(dataset="digits", quick=True, outer_steps=3, progress=False)
    assert res["n_hparams"] == 64 * 10 and res["n_classes"] == 10
    _check_logreg_result(res)


def test_logreg_plot_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_mpl(result: dict, out_dir: str) -> str:
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(demo_report, "save_logreg_plot", no_mpl)
    res = demo.run(task="logreg", quick=True, outer_steps=2, progress=False, out_dir=str(tmp_path))
    assert res["plot"] is None and "pip install matplotlib" in res["plot_skipped"]
    assert "plot skipped" in demo.format_report(res)


def test_split_is_deterministic_and_standardized() -> None:
    a = demo_data.load_split("breast_cancer", seed=3, n_train=100, n_val=235)
    b = demo_data.load_split("breast_cancer", seed=3, n_train=100, n_val=235)
    c = demo_data.load_split("breast_cancer", seed=4, n_train=100, n_val=235)
    assert (a.X_train == b.X_train).all() and (a.y_test == b.y_test).all()
    assert not (a.X_train == c.X_train).all()
    assert a.X_train.shape == (100, 30) and a.X_val.shape == (235, 30) and a.X_test.shape == (569 - 335, 30)
    assert a.X_train.mean(0).abs().max() < 1e-12
    assert (a.X_train.std(0, unbiased=False) - 1).abs().max() < 1e-12
    d = mlp.load_data(mlp.MLPConfig().resolved())
    assert d.X_train.shape == (300, 64) and d.X_val.shape == (300, 64) and d.X_test.shape == (1797 - 600, 64)


# --------------------------------------------------------------------------- command line
def test_progress_bar_modes() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = demo.Progress(4, stream=tty)
    for i in range(1, 5):
        bar.update(i, "x")
    bar.close()
    assert tty.getvalue().count("\r") == 4 and "4/4" in tty.getvalue()
    pipe = io.StringIO()
    bar = demo.Progress(20, stream=pipe, every=10)
    for i in range(1, 21):
        bar.update(i)
    assert pipe.getvalue().count("\n") == 2
    pipe = io.StringIO()
    bar = demo.Progress(100, stream=pipe, label="tuned step")   # updates that skip steps still print
    for i in range(7, 101, 7):
        bar.update(i)
    bar.update(100)
    assert pipe.getvalue().count("\n") == 10 and "tuned step" in pipe.getvalue()
    off = io.StringIO()
    bar = demo.Progress(3, stream=off, enabled=False)
    bar.update(1)
    bar.close()
    assert off.getvalue() == ""


def test_help_explains_the_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--task", "--quick", "--out", "--seed", "--json", "--solver", "--inner-steps", "--hyper-every",
                "--init-decay", "--dataset", "--outer-steps", "166,400", "logreg"):
        assert opt in text, opt
    args = build_parser().parse_args(["demo"])
    assert args.task == "mlp"


def test_cli_usage_errors(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--dataset", "mnist"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["demo", "--outer-steps", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--task", "svm"])
    # options of the other task are refused, not silently ignored
    assert main(["demo", "--solver", "nystrom"]) == 2
    assert main(["demo", "--dataset", "breast_cancer"]) == 2
    assert main(["demo", "--task", "logreg", "--inner-steps", "5"]) == 2
    assert "belongs to --task mlp" in capsys.readouterr().err
    with pytest.raises(TypeError, match="unknown settings"):
        demo.run(task="logreg", quick=True, progress=False, n_epochs=3)
    with pytest.raises(TypeError, match="unknown settings"):
        demo.run(quick=True, progress=False, outer_steps=3)
    with pytest.raises(ValueError, match="solver"):
        mlp.MLPConfig(solver="nystrom").resolved()


def test_python_m_bilevel_demo_quick(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bilevel", "demo", "--quick", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tuned: 166,400 per-weight decays" in proc.stdout
    if HAS_MPL:
        assert len(list(tmp_path.glob("*.png"))) == 2
