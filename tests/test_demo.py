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
    early = cfg["early_steps"]
    assert tuned["hyper_steps"] == (early // cfg["early_hyper_every"] + cfg["inner_steps"] // cfg["hyper_every"]
                                    - early // cfg["hyper_every"])
    assert 0 <= tuned["skipped_hyper_steps"] <= tuned["hyper_steps"] // 2
    ds = tuned["decay_stats"]
    assert sum(sum(h) for h in ds["hist"].values()) == res["n_hparams"]
    # from one start fixed in advance (not the grid's choice) the decays moved, and apart
    assert tuned["decay"] == cfg["init_decay"] and 0 < ds["min"] and ds["max"] > 2 * ds["min"]
    assert abs(math.log(ds["median"] / tuned["decay"])) > 0.1
    _check_starts(res)
    # Step 0: the same initialization in both runs.
    assert tuned["curve"]["val_loss"][0] == pytest.approx(base["curve"]["val_loss"][0], rel=1e-6)


def _check_starts(res: dict) -> None:
    """The tuned runs against the grid: reached means a test loss no higher than the lowest of the grid's."""
    st, grid = res["starts"], res["baseline"]["grid"]
    assert st["grid_best_test_loss"] == min(r["test_loss"] for r in grid)
    assert st["grid_wall_s"] == res["baseline"]["grid_wall_s"] > 0
    starts = res["config"]["starts"] or [res["config"]["init_decay"]]
    assert [r["start"] for r in st["runs"]] == starts
    for r in st["runs"]:
        assert r["reached"] == (r["test_loss"] <= st["grid_best_test_loss"])
        assert r["time_vs_grid"] == pytest.approx(r["wall_s"] / st["grid_wall_s"])
        assert math.isfinite(r["test_loss"]) and r["median_decay"] > 0
        assert len(r["final_global_decays"]) == (len(res["layers"]) - 1 if res["config"]["shared"] == "module" else 1)
    for r in st["runs"]:
        if r["start"] == res["tuned"]["decay"]:          # the main tuned run is reused, not run twice
            assert r["test_loss"] == res["tuned"]["test_loss"]


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
    # the tuned run starts at a fixed decay (not the grid's choice); 100 early hyper steps every 2, then every 10
    assert cfg.init_decay == mlp.DEFAULT_START == 1e-4 and cfg.shared == "model" and cfg.outer_eps == 1e-12
    assert mlp.n_hyper_steps(cfg) == 100 // 2 + 90


def test_mlp_from_several_starts_against_the_grid() -> None:
    res = mlp.run(progress=False, hidden=(16,), inner_steps=40, hyper_every=5, early_steps=10, grid=(1e-3, 1e-2),
                  starts=(1e-6, 1e-3, 1e-1), shared="module")
    _check_starts(res)
    assert len(res["starts"]["runs"]) == 3 and res["tuned"]["decay"] == 1e-4     # the default start runs too
    assert res["tuned"]["hyper_steps"] == 10 // 2 + 40 // 5 - 10 // 5
    assert "tuned run vs the grid of 2 global decays" in demo.format_report(res)
    # the start equal to a grid point reuses nothing: a tuned run is not a grid run
    assert res["starts"]["runs"][1]["hyper_steps"] == res["tuned"]["hyper_steps"]


def test_shared_log_decays_move_all_decays_of_a_layer() -> None:
    """From a far start (1e-6) the layers' globals leave it: Adam's eps=1e-12 lets tiny hypergradients through."""
    cfg = mlp.MLPConfig(hidden=(16,), inner_steps=40, hyper_every=5, early_steps=0, shared="module").resolved()
    data = mlp.load_data(cfg)
    run = mlp.train_run(cfg, data, decay=1e-6, tune=True)
    moved = [abs(math.log(g / 1e-6)) for g in run["hyper"][-1]["global_decays"]]
    assert len(moved) == 2 and min(moved) > 0.5 * cfg.global_lr * 2      # at least a couple of steps' worth


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
    res = mlp.run(solver="cg", progress=False, hidden=(32,), inner_steps=30, hyper_every=5, early_steps=0, grid=(1e-3,))
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
                "--init-decay", "--starts", "--compare-starts", "--dataset", "--outer-steps", "166,400", "logreg"):
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
    assert main(["demo", "--task", "logreg", "--compare-starts"]) == 2
    assert "belongs to --task mlp" in capsys.readouterr().err
    assert main(["demo", "--starts", "1e-3", "--compare-starts"]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--starts", "0"])
    with pytest.raises(TypeError, match="unknown settings"):
        demo.run(task="logreg", quick=True, progress=False, n_epochs=3)
    with pytest.raises(TypeError, match="unknown settings"):
        demo.run(quick=True, progress=False, outer_steps=3)
    with pytest.raises(ValueError, match="solver"):
        mlp.MLPConfig(solver="nystrom").resolved()


# --------------------------------------------------------------------------- output locations
def _no_training(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace the run by a recorder: a test passes only if the command stops before training."""
    calls: list = []

    def record(*args: object, **kwargs: object) -> dict:
        calls.append(kwargs)
        raise AssertionError("the demo trained although its output location cannot be written")

    monkeypatch.setattr(demo, "run", record)
    return calls


def test_out_folder_that_cannot_be_created_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    calls = _no_training(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["demo", "--quick", "--out", blocker / "plots"]) == 2
    err = capsys.readouterr().err
    assert "cannot create the folder" in err and str(blocker / "plots") in err and "Fix:" in err
    assert main(["demo", "--quick", "--out", blocker]) == 2          # a file where the folder should be
    assert "a file is in the way" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", tmp_path, "--json", blocker / "sub" / "r.json"]) == 2
    assert "cannot create the folder" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", tmp_path, "--json", tmp_path]) == 2   # --json names a folder
    assert "expects a file name" in capsys.readouterr().err
    assert calls == []


def test_unwritable_output_folder_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    """A folder where no file can be created (EACCES from the kernel) is refused before the run.

    NOTE: the tests may run as root, for whom a chmod-ed folder stays writable; the refusal is
    simulated at the one call that creates files (test_read_only_folder checks the real thing).
    """
    import errno
    import tempfile

    calls = _no_training(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args: object, dir: object = None, **kwargs: object) -> tuple:
        if dir is not None and Path(str(dir)) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert main(["demo", "--quick", "--out", locked]) == 2
    err = capsys.readouterr().err
    assert "cannot write files in" in err and "Permission denied" in err and str(locked) in err
    assert main(["demo", "--quick", "--out", tmp_path, "--json", locked / "r.json"]) == 2
    assert "cannot write files in" in capsys.readouterr().err
    assert calls == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders; test_unwritable_output_folder covers the path")
def test_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    calls = _no_training(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "old.json").write_text("{}")
    (ro / "old.json").chmod(0o444)
    ro.chmod(0o555)
    try:
        assert main(["demo", "--quick", "--out", ro]) == 2
        assert "cannot write files in" in capsys.readouterr().err
        assert main(["demo", "--quick", "--out", ro / "new"]) == 2
        assert "cannot create the folder" in capsys.readouterr().err
        assert main(["demo", "--quick", "--out", tmp_path, "--json", ro / "old.json"]) == 2
        assert "read-only" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)
    assert calls == []


def test_starts_options_reach_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list = []

    def record(**kwargs: object) -> dict:
        seen.append(kwargs)
        raise demo.DemoError("stopped by the test")

    monkeypatch.setattr(demo, "run", record)
    assert main(["demo", "--compare-starts", "--no-progress"]) == 2
    assert main(["demo", "--starts", "1e-5", "0.3", "--no-progress"]) == 2
    assert main(["demo", "--no-progress"]) == 2
    assert seen[0]["starts"] == mlp.COMPARE_STARTS == (1e-6, 1e-4, 1e-2, 1e-1)
    assert seen[1]["starts"] == (1e-5, 0.3) and "starts" not in seen[2]


def test_missing_output_folders_are_created_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    def stop(*args: object, **kwargs: object) -> dict:
        raise demo.DemoError("stopped by the test after the output checks")

    monkeypatch.setattr(demo, "run", stop)
    out, js = tmp_path / "plots" / "deep", tmp_path / "results" / "r.json"
    assert main(["demo", "--quick", "--out", out, "--json", js]) == 2
    err = capsys.readouterr().err
    assert out.is_dir() and js.parent.is_dir() and not js.exists()
    assert f"created folder {out} for the plots" in err
    assert f"created folder {js.parent} for the JSON file" in err
    assert main(["demo", "--quick", "--out", out, "--json", js]) == 2   # folders exist now: nothing to say
    assert "created folder" not in capsys.readouterr().err


def _logreg_cli_with_saver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                           outcome: object) -> tuple:
    """Run a short ``--task logreg`` command whose plot saver records what was already out when it
    was called (stdout, the JSON file), then returns ``outcome`` or raises it if it is an exception."""
    out_json = tmp_path / "result.json"
    seen: dict = {}

    def save(result: dict, out_dir: str) -> object:
        seen["stdout"] = capsys.readouterr().out
        seen["json"] = json.loads(out_json.read_text()) if out_json.exists() else None
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(demo_report, "save_logreg_plot", save)
    rc = main(["demo", "--task", "logreg", "--quick", "--outer-steps", "2", "--no-progress",
               "--out", tmp_path / "plots", "--json", out_json])
    return rc, seen, json.loads(out_json.read_text()), capsys.readouterr()


def test_plot_failure_loses_neither_table_nor_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    rc, seen, res, captured = _logreg_cli_with_saver(tmp_path, monkeypatch, capsys,
                                                     OSError(28, "No space left on device"))
    assert rc == 1
    assert "tuned: 30 per-weight decays" in seen["stdout"] and "total wall time" in seen["stdout"]
    assert seen["json"]["tuned"]["val_loss"] == res["tuned"]["val_loss"]
    assert res["tuned"]["val_loss"] < res["baseline"]["val_loss"] and res["plot"] is None
    assert "No space left on device" in res["plot_skipped"]
    assert "plot skipped: saving the plots" in captured.out
    assert "could not save the plots" in captured.err and "No space left on device" in captured.err
    assert not list((tmp_path / "plots").glob("*.png"))


def test_table_and_json_are_out_before_the_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    png = str(tmp_path / "plots" / "fake.png")
    rc, seen, res, captured = _logreg_cli_with_saver(tmp_path, monkeypatch, capsys, png)
    assert rc == 0
    assert "tuned: 30 per-weight decays" in seen["stdout"] and "plot:" not in seen["stdout"]
    assert seen["json"] is not None and seen["json"]["plot"] is None
    assert captured.out == f"  plot: {png}\n"
    assert res["plot"] == png and res["plot_skipped"] is None and res["tuned"] == seen["json"]["tuned"]


def test_python_m_bilevel_demo_quick(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bilevel", "demo", "--quick", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tuned: 166,400 per-weight decays" in proc.stdout
    if HAS_MPL:
        assert len(list(tmp_path.glob("*.png"))) == 2
