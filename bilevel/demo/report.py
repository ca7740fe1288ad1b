"""What the demo shows: the progress bar, the results table, the JSON file and the PNG plots.

Everything here reads a task's result dict (a plain JSON-serializable dict, see
:func:`bilevel.demo.run`); nothing trains. The command line
(:func:`bilevel.demo.main`) checks the output locations with
:func:`prepare_outputs` before any training, then prints the table and writes
the JSON before it draws the plots, so a plot that fails to save loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from ..plot import diagnostics_panel
from .settings import DemoError

__all__ = ["MPL_MISSING", "Progress", "format_report", "format_logreg_report", "format_mlp_report", "plot_lines",
           "save_plots", "save_logreg_plot", "save_mlp_plots", "add_plots", "write_json", "prepare_outputs"]

#: what ``plot_skipped`` says when matplotlib cannot be imported
MPL_MISSING = ("matplotlib is not installed; "
               "install it with `pip install matplotlib` (or `pip install 'bilevel[examples]'`)")


# --------------------------------------------------------------------------- progress
class Progress:
    """A tiny progress bar on a text stream (no dependency).

    On a terminal it redraws one line; otherwise (a pipe, a CI log) it prints a
    line every ``every`` steps and at the end, so logs stay readable.

    Args:
        total: number of steps.
        stream: where to write (``sys.stderr`` by default).
        enabled: ``False`` writes nothing.
        every: in line mode, print every this many steps (default: a tenth of ``total``).
        width: characters of the bar on a terminal.
        label: names the steps in line mode (``"  {label} 10/100 ..."``).
    """

    def __init__(self, total: int, *, stream: Optional[TextIO] = None, enabled: bool = True,
                 every: Optional[int] = None, width: int = 24, label: str = "outer step") -> None:
        self.total = max(int(total), 1)
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.every = every or max(1, self.total // 10)
        self.width = width
        self.label = label
        self.t0 = time.perf_counter()
        self._len = 0
        self._last_line = 0

    def update(self, step: int, text: str = "") -> None:
        """Report that ``step`` of ``total`` steps are done, with a short status ``text``."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            done = int(self.width * step / self.total)
            line = f"\r[{'#' * done}{'.' * (self.width - done)}] {step}/{self.total} {elapsed:5.1f}s {text}"
            pad = max(0, self._len - len(line))
            self.stream.write(line + " " * pad)
            self._len = len(line)
            self.stream.flush()
        elif step // self.every > self._last_line // self.every or step == self.total:
            # (callers may skip steps: print whenever a multiple of `every` was crossed)
            self._last_line = step
            self.stream.write(f"  {self.label} {step:>4}/{self.total}  {elapsed:6.1f}s  {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- the results table
def format_report(result: Dict[str, Any]) -> str:
    """The text summary of a result dict, whichever task made it (``result["task"]``)."""
    if result.get("task", "logreg") == "mlp":
        return format_mlp_report(result)
    return format_logreg_report(result)


def _baseline_vs_tuned(baseline: Dict[str, Any], tuned: Dict[str, Any], labels: Tuple[str, str], width: int,
                       columns: Sequence[Tuple[str, str, int, str]]) -> List[str]:
    """The two-row table baseline vs tuned: a header, a rule, one row each.

    ``columns``: ``(title, key, width, format spec)`` per column; ``labels``: the rows' names,
    left-aligned in ``width`` characters.
    """
    head = f"  {'':<{width}}" + "".join(f" {title:>{w}}" for title, _, w, _ in columns)
    rows = [head, "  " + "-" * (len(head) - 2)]
    for label, fig in zip(labels, (baseline, tuned)):
        rows.append(f"  {label:<{width}}" + "".join(f" {format(fig[key], spec):>{w}}" for _, key, w, spec in columns))
    return rows


def plot_lines(result: Dict[str, Any]) -> List[str]:
    """The report's last lines: the PNGs written (``plot`` / ``plots``), or why none was."""
    paths = result.get("plots") or ([result["plot"]] if result.get("plot") else [])
    if paths:
        return [f"  plot: {p}" for p in paths]
    if result.get("plot_skipped"):
        return [f"  plot skipped: {result['plot_skipped']}"]
    return []


def format_logreg_report(result: Dict[str, Any], *, max_rows: int = 40) -> str:
    """The ``logreg`` summary printed on stdout: setup, per-step diagnostics (subsampled), and baseline vs tuned."""
    b, t = result["baseline"], result["tuned"]
    hist = t["history"]
    lines = []
    lines.append(f"bilevel demo: {result['dataset']}  (train {result['n_train']} / val {result['n_val']} / "
                 f"test {result['n_test']}, {result['n_features']} features, {result['n_classes']} classes, seed {result['seed']})")
    lines.append(f"  inner: logistic regression, {result['n_params']} params, L-BFGS (strong Wolfe), float64")
    lines.append(f"  outer: Adam(lr={result['config']['outer_lr']}) on {result['n_hparams']} log-decays, "
                 f"{len(hist)} steps, hypergradient solver {result['solver_repr']}")
    lines.append("")
    if hist:
        n = len(hist)
        stride = max(1, math.ceil(n / max_rows))
        idx = sorted(set(range(0, n, stride)) | {n - 1})
        lines.append("  per outer step (every %d):" % stride if stride > 1 else "  per outer step:")
        lines.append(f"  {'step':>5} {'val loss':>10} {'test loss':>10} {'|grad L_T|':>11} {'solver it':>9} "
                     f"{'HVPs':>5} {'rel. resid':>10} {'|hypergrad|':>11}")
        for i in idx:
            r = hist[i]
            rr = r["relative_residual"]
            lines.append(f"  {r['step']:>5} {r['val_loss']:>10.5f} {r['test_loss']:>10.5f} {r['inner_grad_norm']:>11.2e} "
                         f"{str(r['solver_iters']):>9} {str(r['matvecs']):>5} "
                         f"{(f'{rr:.1e}' if rr is not None and math.isfinite(rr) else '-'):>10} {r['hypergrad_norm']:>11.2e}")
        gn = [r["inner_grad_norm"] for r in hist]
        its = [r["solver_iters"] for r in hist if r["solver_iters"] is not None]
        lines.append(f"  inner gradient norm: max {max(gn):.1e}, median {float(np.median(gn)):.1e};  "
                     f"solver iterations: mean {np.mean(its):.1f}, max {max(its)}" if its else "")
        lines.append("")
    dec = np.asarray(t["decays"])
    lines += _baseline_vs_tuned(b, t, ("baseline: global decay %.2e" % b["decay"], "tuned: %d per-weight decays" % dec.size),
                                34, (("val loss", "val_loss", 9, ".4f"), ("test loss", "test_loss", 9, ".4f"),
                                     ("test acc", "test_acc", 9, ".2%"), ("wall s", "wall_s", 8, ".2f")))
    dv = t["val_loss"] - b["val_loss"]
    dt = t["test_loss"] - b["test_loss"]
    lines.append(f"  change vs baseline: val loss {dv:+.4f} ({dv / b['val_loss']:+.1%}), "
                 f"test loss {dt:+.4f} ({dt / b['test_loss']:+.1%}), test acc {t['test_acc'] - b['test_acc']:+.2%}")
    lines.append(f"  learned decays: min {dec.min():.2e}, median {np.median(dec):.2e}, max {dec.max():.2e}")
    lines.append("  (the decays were fitted to the validation set, so its loss flatters them: the test set is the "
                 "honest comparison)")
    lines.append(f"  total wall time {result.get('total_wall_s', float('nan')):.2f} s "
                 f"(baseline grid of {len(b['grid'])} fits, then the tuned run starting from its best decay)")
    return "\n".join(lines + plot_lines(result))


def save_logreg_plot(result: Dict[str, Any], out_dir: str) -> str:
    """Write the ``logreg`` PNG: validation/test loss per outer step (baseline as lines) and the learned decays.

    matplotlib is imported here, lazily, through its object API (no pyplot, no
    global backend change). Raises ImportError when it is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    b, t = result["baseline"], result["tuned"]
    hist = t["history"]
    steps = [r["step"] for r in hist] + [len(hist)]
    val = [r["val_loss"] for r in hist] + [t["val_loss"]]
    test = [r["test_loss"] for r in hist] + [t["test_loss"]]

    fig = Figure(figsize=(13, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, width_ratios=[1.2, 1.0, 1.0])
    ax1.plot(steps, val, color="C0", lw=2, label="tuned: validation")
    ax1.plot(steps, test, color="C1", lw=1.2, alpha=0.8, label="tuned: test")
    ax1.axhline(b["val_loss"], color="C0", ls="--", lw=1, label=f"baseline (global decay {b['decay']:.1e}): validation")
    ax1.axhline(b["test_loss"], color="C1", ls=":", lw=1, label="baseline: test")
    ax1.set_xlabel("outer step (Adam on log-decays)")
    ax1.set_ylabel("mean cross-entropy")
    ax1.set_title(f"{result['dataset']}: loss vs outer step")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)

    dec = np.sort(np.asarray(t["decays"]))[::-1]
    ax2.semilogy(np.arange(dec.size), dec, ".-", color="C2", ms=3, lw=1, label="learned (sorted)")
    ax2.axhline(b["decay"], color="k", ls="--", lw=1, label="baseline global decay")
    ax2.set_xlabel("weight (sorted by decay)")
    ax2.set_ylabel("L2 decay  exp(λ)")
    ax2.set_title(f"{dec.size} learned per-weight decays")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, which="both")

    diagnostics_panel(ax3, steps[:-1], [r["inner_grad_norm"] for r in hist], [r["solver_iters"] for r in hist],
                      solver=result["solver"])

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"demo_logreg_{result['dataset']}_{result['solver']}_seed{result['seed']}.png")
    fig.savefig(path, dpi=110)
    return os.path.abspath(path)


def format_mlp_report(result: Dict[str, Any]) -> str:
    """The ``mlp`` summary printed on stdout: set-up, the baseline grid, and baseline vs tuned."""
    b, t, c = result["baseline"], result["tuned"], result["config"]
    ds = t["decay_stats"]
    L = []
    L.append(f"bilevel demo: MLP {'-'.join(map(str, result['layers']))} on digits "
             f"(train {result['n_train']} / val {result['n_val']} / test {result['n_test']}, seed {result['seed']})")
    L.append(f"  hyperparameters: {result['n_hparams']:,} weight decays, one per weight "
             f"(bl.hparams.weight_decay(model, per=\"parameter\"), biases not decayed; {result['n_params']:,} parameters)")
    L.append(f"  training budget (baseline and tuned alike): {c['inner_steps']} Adam(lr={c['inner_lr']}) steps, "
             f"minibatches of {c['batch_size']}, L2 penalty ½ Σ decay·w²")
    early = (f"every {c['early_hyper_every']} inner steps for the first {c['early_steps']}, then "
             if c.get("early_steps") else "")
    shared = {"module": "one shared log-decay per layer + per-weight offsets",
              "model": "one shared log-decay + per-weight offsets"}.get(c.get("shared", ""), "per-weight log-decays")
    L.append(f"  hyper steps: {early}every {c['hyper_every']} inner steps, bl.Implicit({result['solver_repr']}) on the "
             f"training minibatch, {'the whole validation set' if c['val_batch'] <= 0 else str(c['val_batch']) + ' validation images'}; "
             f"Adam on the log-decays ({shared}; lr {c['outer_lr']}"
             + (f", globals {c['global_lr']}" if c.get("shared") else "") + f", eps {c.get('outer_eps', 1e-8):g})")
    L.append(f"  hyper steps taken: {t['hyper_steps']}, skipped: {t['skipped_hyper_steps']} "
             f"(HyperOptimizer(on_error='skip') drops a step whose solve diverges)")
    for e in t.get("skip_errors", [])[:2]:
        L.append(f"    skipped at {e[:160]}")
    L.append("")
    L.append(f"  baseline grid (one global decay, {len(b['grid'])} runs):")
    L.append(f"  {'decay':>9} {'train loss':>10} {'val loss':>9} {'val acc':>8} {'test loss':>9} {'test acc':>8}")
    for r in b["grid"]:
        mark = "  <- best val loss" if r["decay"] == b["decay"] else ""
        L.append(f"  {r['decay']:>9.1e} {r['train_loss']:>10.4f} {r['val_loss']:>9.4f} {r['val_acc']:>8.2%} "
                 f"{r['test_loss']:>9.4f} {r['test_acc']:>8.2%}{mark}")
    L.append("")
    L += _baseline_vs_tuned(b, t, ("baseline: best global decay %.1e" % b["decay"],
                                   "tuned: %s per-weight decays" % format(result["n_hparams"], ",")),
                            36, (("val loss", "val_loss", 9, ".4f"), ("val acc", "val_acc", 8, ".2%"),
                                 ("test loss", "test_loss", 9, ".4f"), ("test acc", "test_acc", 8, ".2%"),
                                 ("wall s", "wall_s", 8, ".2f")))
    dv, dt = t["val_loss"] - b["val_loss"], t["test_loss"] - b["test_loss"]
    L.append(f"  change: val loss {dv:+.4f} ({dv / b['val_loss']:+.0%}), test loss {dt:+.4f} ({dt / b['test_loss']:+.0%}), "
             f"test acc {t['test_acc'] - b['test_acc']:+.2%}")
    verdict = "improved" if dt < 0 else "did NOT improve"
    L.append(f"  The decays were fitted to the validation set, so its figures flatter them; the test set "
             f"(never used) is the honest comparison: test loss {verdict}.")
    L.append(f"  wall s: the baseline's best run ({b['wall_s']:.1f} s; the whole grid {b['grid_wall_s']:.1f} s) vs the "
             f"tuned run, which starts from a fixed decay {t['decay']:.1e}, not from the grid's (its hyper steps: "
             f"{t['hyper_s']:.1f} s).")
    L.append(f"  learned decays: median {ds['median']:.1e}, 5%-95% {ds['q05']:.1e}..{ds['q95']:.1e}, "
             f"range {ds['min']:.1e}..{ds['max']:.1e}; {ds['frac_above_baseline']:.0%} above and "
             f"{ds['frac_below_baseline']:.0%} below their start {t['decay']:.1e}")
    L += _starts_table(result)
    L.append(f"  total wall time {result.get('total_wall_s', float('nan')):.1f} s")
    return "\n".join(L + plot_lines(result))


def _starts_table(result: Dict[str, Any]) -> List[str]:
    """The tuned run from each start against the whole grid: test loss and wall time."""
    st = result.get("starts")
    if not st:
        return []
    n = len(result["baseline"]["grid"])
    L = ["", f"  tuned run vs the grid of {n} global decays (reached: tuned test loss <= the lowest test loss of "
             f"the {n} grid runs, {st['grid_best_test_loss']:.4f}; the grid took {st['grid_wall_s']:.1f} s):",
         f"  {'start':>9} {'test loss':>9} {'- grid best':>11} {'reached':>7} {'wall s':>7} {'time/grid':>9} "
         f"{'median decay':>12}"]
    for r in st["runs"]:
        L.append(f"  {r['start']:>9.1e} {r['test_loss']:>9.4f} {r['test_loss_minus_grid_best']:>+11.4f} "
                 f"{'yes' if r['reached'] else 'NO':>7} {r['wall_s']:>7.1f} {r['time_vs_grid']:>9.2f} "
                 f"{r['median_decay']:>12.1e}")
    return L


def save_mlp_plots(result: Dict[str, Any], out_dir: str) -> List[str]:
    """Write the ``mlp`` task's two PNGs: the loss/accuracy curves of baseline vs tuned, and the learned decays.

    matplotlib is imported here, lazily, through its object API (no pyplot, no global
    backend change). Raises ImportError when it is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    b, t = result["baseline"], result["tuned"]
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"demo_mlp_seed{result['seed']}")
    paths = []

    # -- curves ---------------------------------------------------------------------------------
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    bc, tc = b["curve"], t["curve"]
    lab_b = f"baseline (global decay {b['decay']:.0e})"
    lab_t = f"tuned ({result['n_hparams']:,} decays)"
    for part, ls, lw in (("val", "-", 2.0), ("test", "--", 1.2), ("train", ":", 1.0)):
        ax1.plot(bc["step"], bc[f"{part}_loss"], color="C0", ls=ls, lw=lw, label=f"{lab_b}: {part}")
        ax1.plot(tc["step"], tc[f"{part}_loss"], color="C3", ls=ls, lw=lw, label=f"{lab_t}: {part}")
    ax1.set_yscale("log")
    ax1.set_xlabel("inner step (Adam on the weights)")
    ax1.set_ylabel("mean cross-entropy")
    ax1.set_title("loss during training")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7)
    for part, ls, lw in (("val", "-", 2.0), ("test", "--", 1.2)):
        ax2.plot(bc["step"], bc[f"{part}_acc"], color="C0", ls=ls, lw=lw, label=f"baseline: {part}")
        ax2.plot(tc["step"], tc[f"{part}_acc"], color="C3", ls=ls, lw=lw, label=f"tuned: {part}")
    lo = min(min(bc["test_acc"][len(bc["step"]) // 4:]), min(tc["test_acc"][len(tc["step"]) // 4:]))
    ax2.set_ylim(max(0.0, lo - 0.03), 1.005)
    ax2.set_xlabel("inner step")
    ax2.set_ylabel("accuracy")
    ax2.set_title("accuracy during training")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"digits, MLP {'-'.join(map(str, result['layers']))}, seed {result['seed']}: "
                 f"validation loss {b['val_loss']:.3f} → {t['val_loss']:.3f}, test loss {b['test_loss']:.3f} → "
                 f"{t['test_loss']:.3f}")
    paths.append(stem + "_curves.png")
    fig.savefig(paths[-1], dpi=100)

    # -- learned decays ----------------------------------------------------------------------------
    ds = t["decay_stats"]
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[2.2, 1.0])
    edges = np.asarray(ds["log10_edges"])
    bottom = np.zeros(len(edges) - 1)
    for i, (name, counts) in enumerate(ds["hist"].items()):
        c = np.asarray(counts, dtype=float)
        shape = "x".join(map(str, ds["shapes"][name]))
        ax1.stairs(bottom + c, edges, baseline=bottom, fill=True, alpha=0.8, color=f"C{i}",
                   label=f"layer {i + 1}: {name} ({shape})")
        bottom = bottom + c
    ax1.axvline(math.log10(t["decay"]), color="k", ls="--", lw=1, label=f"start {t['decay']:.0e}")
    ax1.axvline(math.log10(b["decay"]), color="C7", ls=":", lw=1, label=f"grid's best global decay {b['decay']:.0e}")
    ax1.set_yscale("log")
    ax1.set_xlabel("log10 learned decay")
    ax1.set_ylabel("number of weights (stacked by layer)")
    ax1.set_title(f"histogram of the {result['n_hparams']:,} learned per-weight decays")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    pix = np.asarray(ds["pixel_mean_log10"])
    side = int(round(math.sqrt(pix.size)))
    if side * side == pix.size:
        im = ax2.imshow(pix.reshape(side, side), cmap="viridis")
        fig.colorbar(im, ax=ax2, label="mean log10 decay")
        ax2.set_title("input layer: mean decay per pixel")
        ax2.set_xticks([])
        ax2.set_yticks([])
    paths.append(stem + "_decays.png")
    fig.savefig(paths[-1], dpi=100)
    return [os.path.abspath(p) for p in paths]


# --------------------------------------------------------------------------- plots
def save_plots(result: Dict[str, Any], out_dir: str) -> List[str]:
    """Write the PNGs of a result dict into ``out_dir`` (created if missing); returns their absolute paths.

    Raises ImportError when matplotlib is not installed, OSError when a file cannot be written.
    """
    if result.get("task", "logreg") == "mlp":
        return save_mlp_plots(result, out_dir)
    return [save_logreg_plot(result, out_dir)]


def add_plots(result: Dict[str, Any], out_dir: str) -> Dict[str, Any]:
    """Draw the plots of ``result`` into ``out_dir`` and record where (``plots`` for the ``mlp`` task,
    ``plot`` for ``logreg``), or, when matplotlib is missing, why not (``plot_skipped``).

    Other errors (a file that cannot be written) propagate; ``result`` is then unchanged.
    """
    try:
        paths = save_plots(result, out_dir)
    except ImportError:
        result["plot_skipped"] = MPL_MISSING
        return result
    if result.get("task", "logreg") == "mlp":
        result["plots"] = paths
    else:
        result["plot"] = paths[0]
    return result


# --------------------------------------------------------------------------- output files
def write_json(result: Dict[str, Any], path: str) -> None:
    """Write ``result`` as JSON to ``path`` atomically (a temporary file in the same folder, then a
    rename), so that a reader never sees half a file and a failed write leaves the old one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".bilevel-demo-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1)
        # mkstemp makes the file private (0600); give it the mode open(path, "w") would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _writable_folder(folder: str, option: str, what: str, stream: TextIO) -> None:
    """Create ``folder`` if missing (saying so on ``stream``) and check that a file can be written
    there, by writing and removing one; raise :class:`DemoError` naming ``option`` if not."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DemoError(f"bilevel demo: expected a folder for the {what} at {folder}, but a file is in the way. "
                        f"Fix: pass another {option}, or move that file.")
    if not os.path.isdir(folder):
        try:
            os.makedirs(folder)
        except OSError as err:
            raise DemoError(f"bilevel demo: cannot create the folder {folder} for the {what}: "
                            f"{err.strerror or err}. Fix: pass another {option}, or create the folder "
                            f"where you can write.") from err
        stream.write(f"bilevel demo: created folder {folder} for the {what}\n")
        stream.flush()
    try:
        fd, probe = tempfile.mkstemp(prefix=".bilevel-demo-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise DemoError(f"bilevel demo: cannot write files in {folder} for the {what}: "
                        f"{err.strerror or err}. Fix: pass another {option}, or make the folder writable.") from err


def prepare_outputs(out_dir: Optional[str], json_path: Optional[str], *, stream: Optional[TextIO] = None) -> None:
    """Check, before any training, that the plots' folder and the JSON file can be written.

    Missing folders are created (each creation is reported on ``stream``, ``sys.stderr`` by
    default); a folder that cannot be created or written, or a JSON path that names a folder
    or a read-only file, raises :class:`DemoError` at once instead of after a run of minutes.
    """
    out = sys.stderr if stream is None else stream
    path = None if json_path is None else os.path.abspath(json_path)
    # the checks that create nothing come first: a refused --json leaves no new --out folder behind
    if path is not None and os.path.isdir(path):
        raise DemoError(f"bilevel demo: --json expects a file name, got the folder {path}. "
                        f"Fix: name a file, e.g. --json {os.path.join(json_path, 'result.json')}.")
    if path is not None and os.path.exists(path) and not os.access(path, os.W_OK):
        raise DemoError(f"bilevel demo: cannot write the JSON file {path}: it is read-only. "
                        f"Fix: pass another --json, or make the file writable.")
    if out_dir is not None:
        _writable_folder(os.path.abspath(out_dir), "--out", "plots", out)
    if path is not None:
        _writable_folder(os.path.dirname(path), "--json", "JSON file", out)
