"""Regenerate the comparison figures: run the experiments, then write JSON, PNG plots, RESULTS.md and README blocks.

    python benchmarks/make_results.py                       # everything (about 10 min, 1 thread)
    python benchmarks/make_results.py --only hpo,accuracy   # rerun some parts, keep the others' JSON
    python benchmarks/make_results.py --render-only         # rewrite the Markdown/plots from the JSON
    python benchmarks/make_results.py --smoke --out DIR     # tiny sizes (CI), nothing in the repository touched

Outputs: ``benchmarks/results_baselines.json`` (every measured figure, with machine, date and the
CPU load of other processes), ``benchmarks/plots/*.png``, the block between the
``<!-- generated:baselines begin/end -->`` markers at the end of ``benchmarks/RESULTS.md`` and in
README.md's "Benchmarks" section. Nothing in the Markdown is typed by hand: every number is
read from the JSON of a run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

BEGIN, END = "<!-- generated:baselines begin -->", "<!-- generated:baselines end -->"
PARTS = ("accuracy", "ift_anchor", "unroll_anchor", "cost", "hpo", "repro", "lorraine", "speed")
COMMAND = "python benchmarks/make_results.py"


def run_parts(parts: List[str], smoke: bool) -> Dict[str, Any]:
    import torch

    import baselines
    import lorraine
    import paired_breakdown

    torch.set_num_threads(1)
    fns: Dict[str, Callable[..., Dict[str, Any]]] = {
        "accuracy": baselines.run_accuracy, "ift_anchor": baselines.run_ift_anchor,
        "unroll_anchor": baselines.run_unroll_anchor, "cost": baselines.run_cost, "hpo": baselines.run_hpo,
        "repro": baselines.run_hypertorch_repro, "lorraine": lorraine.run_lorraine,
        "speed": paired_breakdown.run_speed}
    out: Dict[str, Any] = {}
    for p in parts:
        t0 = time.perf_counter()
        res = fns[p](smoke=smoke)
        res["_seconds"] = time.perf_counter() - t0
        res["_date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        res["_load_before"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        out[p] = res
        print(f"[make_results] {p}: {res['_seconds']:.1f} s", flush=True)
    return out


# -- formatting ------------------------------------------------------------------------------------
def f(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def e(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "NaN" if isinstance(x, float) and math.isnan(x) else "–"
    return f"{x:.1e}"


def load_flag(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.2f}" + (" !" if x > 0.1 else "")


def table(header: List[str], rows: List[List[str]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------------
def plots(res: Dict[str, Any], outdir: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    made = []

    def save(fig: Any, name: str) -> str:
        fig.tight_layout()
        fig.savefig(outdir / name, dpi=110)
        plt.close(fig)
        return name

    if "accuracy" in res:
        probs = res["accuracy"]["problems"]
        fig, axes = plt.subplots(1, len(probs), figsize=(5 * len(probs), 4), squeeze=False)
        for ax, p in zip(axes[0], probs):
            methods: Dict[str, List[Any]] = {}
            for r in p["rows"]:
                methods.setdefault(r["method"], []).append(r)
            for m, rs in methods.items():
                xs = [r["hvps"] for r in rs if math.isfinite(r["rel_err"])]
                ys = [max(r["rel_err"], 1e-16) for r in rs if math.isfinite(r["rel_err"])]
                if m == "Identity" and ys:
                    ax.axhline(ys[0], ls=":", color="gray", label="Identity (0 HVPs)")
                elif xs:
                    ax.loglog(xs, ys, marker="o", ms=3, label=m)
            ax.set_title(f"{p['problem']} (κ≈{p['cond']:.0f})")
            ax.set_xlabel("Hessian-vector products")
            ax.set_ylabel("relative error of the hypergradient")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        made.append(save(fig, "accuracy_vs_hvps.png"))
    if "unroll_anchor" in res:
        rows = res["unroll_anchor"]["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for cfg in sorted({r["config"] for r in rows}, key=lambda c: c):
            rs = [r for r in rows if r["config"] == cfg]
            ax.plot([r["T"] for r in rs], [r["peak_mb"] for r in rs], marker="o", label=cfg)
        ift = res["unroll_anchor"]["ift"]
        if ift:
            best = max(r["peak_mb"] for r in ift if math.isfinite(r["peak_mb"])) if any(
                math.isfinite(r["peak_mb"]) for r in ift) else float("nan")
            ax.axhline(best, ls="--", color="k", label="bilevel IFT, CG-1…20 (max)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("unrolled steps T")
        ax.set_ylabel("peak memory of one hypergradient (MB)")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        made.append(save(fig, "unroll_memory.png"))
    if "cost" in res:
        c = res["cost"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].semilogx([r["n_params"] for r in c["by_size"]], [r["ratio"] for r in c["by_size"]], marker="o",
                         label="measured time")
        if all("flop_ratio" in r for r in c["by_size"]):
            axes[0].semilogx([r["n_params"] for r in c["by_size"]], [r["flop_ratio"] for r in c["by_size"]],
                             marker="s", ls=":", label="matmul FLOPs (floor on any hardware)")
        axes[0].axhline(16, ls="--", color="r", label="target 16")
        axes[0].set_xlabel("model parameters")
        axes[0].set_ylabel("one hypergradient (CG-10) in gradients")
        axes[0].legend()
        axes[1].semilogx([r["n_hparams"] for r in c["by_groups"]], [r["ratio"] for r in c["by_groups"]], marker="o")
        axes[1].set_xlabel("hyperparameters (weight-decay groups), 1.07M-weight MLP")
        axes[1].set_ylabel("one hypergradient (CG-10) in gradients")
        axes[1].set_ylim(bottom=0)
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
        made.append(save(fig, "cost_scaling.png"))
    if "hpo" in res:
        by_task = _hpo_by_task(res["hpo"])
        fig, axes = plt.subplots(1, len(by_task), figsize=(5.5 * len(by_task), 4), squeeze=False)
        for ax, (name, runs) in zip(axes[0], by_task.items()):
            colors: Dict[str, Any] = {}
            for t in runs:
                for r in t["rows"]:
                    key = r.get("key", r["method"])
                    if r["seconds"] <= 0:
                        continue
                    first = key not in colors
                    sc = ax.scatter(r["seconds"], r["val_ce"], color=colors.get(key),
                                    label=HPO_LABELS.get(key, r["method"][:52]) if first else None)
                    colors.setdefault(key, sc.get_facecolor()[0])
            base = [next(r for r in t["rows"] if r["method"].startswith("baseline"))["val_ce"] for t in runs]
            ax.axhline(sum(base) / len(base), ls=":", color="gray", label="baseline (all decays 1e-2), mean")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # a narrow range: labels overlap
            ax.set_xlabel("wall time (s)")
            ax.set_ylabel("validation CE after refit")
            ax.set_title(f"{name} ({runs[0]['n_hparams']} decays, {len(runs)} splits)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=6)
        made.append(save(fig, "hpo_quality.png"))
    if "lorraine" in res:
        import lorraine

        made += lorraine.plot_lorraine(res["lorraine"], outdir)
    return made


# -- Markdown --------------------------------------------------------------------------------------
def _ift_rows(p: Dict[str, Any]) -> List[List[str]]:
    out = []
    for r in p["rows"]:
        out.append([r["name"], e(r["rel_err"]), f(r["ratio"], 1), f(r.get("ours_speedup_paired")),
                    f(r.get("plain_speedup_paired")), load_flag(r["other_load"])])
    return out


HPO_LABELS = {"sgd": "HyperOptimizer, SGD inner", "lbfgs": "HyperOptimizer, L-BFGS inner 1e-4, warm CG-10",
              "lbfgs_tight": "HyperOptimizer, L-BFGS inner 1e-6, CG-20",
              "lbfgs_warm": "HyperOptimizer, L-BFGS inner, warm CG-5",
              "implicit": "implicit_hypergrad + L-BFGS, 60 steps", "implicit20": "implicit_hypergrad + L-BFGS, 20 steps",
              "tpe": "Optuna TPE, 100 trials", "random": "random search, 100 trials"}
HPO_HEADLINE = (("lbfgs", "HyperOptimizer (L-BFGS inner, warm-started CG-10)"),
                ("lbfgs_tight", "HyperOptimizer (L-BFGS inner to 1e-6, CG-20)"),
                ("lbfgs_warm", "HyperOptimizer (L-BFGS inner, warm-started CG-5)"), ("sgd", "HyperOptimizer (SGD inner)"),
                ("implicit", "implicit_hypergrad + L-BFGS, 60 outer steps"),
                ("implicit20", "implicit_hypergrad + L-BFGS, 20 outer steps"))


def _hpo_load(h: Dict[str, Any]) -> str:
    """The range of the load averages of the machine (all processes, ours included) seen during the HPO
    run, at its start and after each (task, split); "" where none was recorded."""
    seen = [x for x in [h.get("load_avg_start"), *(t.get("load_avg") for t in h["tasks"])]
            if isinstance(x, (int, float))]
    return f"{f(min(seen), 1)}–{f(max(seen), 1)}" if seen else ""


def _hpo_load_note(h: Dict[str, Any]) -> str:
    if not _hpo_load(h):
        return ""
    return (f"Load average (1 min, all processes on the 2 cores, this run included) seen during the run: "
            f"{_hpo_load(h)}. Where it is above 2, other jobs shared the cores: wall "
            f"times are inflated by an amount that varies during the run (the methods of one split run one "
            f"after the other, seconds to a minute apart), and the CPU-time columns (this process's own CPU "
            f"time) are the steadier comparison.")


def _hpo_key(r: Dict[str, Any]) -> str:
    if "key" in r:
        return r["key"]
    m = r["method"]  # results written before rows carried keys
    return ("baseline" if m.startswith("baseline") else "tpe" if "TPE" in m else "random" if "random" in m else
            "sgd" if "SGD inner" in m else "lbfgs" if "L-BFGS inner" in m else "implicit20" if "20 Adam" in m
            else "implicit")


def _hpo_by_task(h: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    out: Dict[str, List[Dict[str, Any]]] = {}
    for t in h["tasks"]:
        out.setdefault(t["task"], []).append(t)
    return out


def _hpo_vs_tpe(runs: List[Dict[str, Any]], key: str) -> Optional[Dict[str, Any]]:
    """Method ``key`` against TPE over the splits of one task: wins on validation CE, wall-time ratios,
    and ``cpu_speedup`` (TPE's process CPU time over ours, min–max, "" where not recorded)."""
    pairs = []
    for t in runs:
        by = {_hpo_key(r): r for r in t["rows"]}
        if key in by and "tpe" in by:
            pairs.append((by[key], by["tpe"]))
    if not pairs:
        return None
    sp = [tp["seconds"] / ours["seconds"] for ours, tp in pairs]
    cpu = [tp["cpu_seconds"] / ours["cpu_seconds"] for ours, tp in pairs
           if "cpu_seconds" in ours and "cpu_seconds" in tp]
    return {"wins": sum(ours["val_ce"] < tp["val_ce"] for ours, tp in pairs), "n": len(pairs),
            "min_speedup": min(sp), "max_speedup": max(sp),
            "cpu_speedup": f"{f(min(cpu), 1)}–{f(max(cpu), 1)}×" if cpu else "",
            "mean_val": sum(o["val_ce"] for o, _ in pairs) / len(pairs),
            "mean_val_tpe": sum(tp["val_ce"] for _, tp in pairs) / len(pairs),
            "tpe_evaluations": pairs[0][1]["evaluations"]}


def headline(res: Dict[str, Any], brief: bool = False) -> List[List[str]]:
    """The results table: one line per target (``brief``: the README's, HPO by the high-level API only)."""
    rows: List[List[str]] = []
    if "ift_anchor" in res:
        for p in res["ift_anchor"]["problems"]:
            for r in p["rows"]:
                if r["name"].startswith("TorchOpt custom_root, solve_cg"):
                    rows.append([f"IFT CG-{p['k']} vs TorchOpt `custom_root` + `solve_cg` ({p['problem']}, "
                                 f"{p['n_params']:,} params)", f"{f(r['ours_speedup_paired'])}× faster",
                                 "≥ 1.1×", "met" if r["ours_speedup_paired"] >= 1.1 else "missed"])
                if "default solve_normal_cg, maxiter" in r["name"]:
                    rows.append([f"IFT CG-{p['k']} vs TorchOpt default solver (normal CG, same {p['k']} iterations; "
                                 f"{p['problem']})", f"{f(r['ours_speedup_paired'])}× faster", "≥ 1.5×",
                                 "met" if r["ours_speedup_paired"] >= 1.5 else "missed"])
    if "unroll_anchor" in res:
        u = res["unroll_anchor"]
        T = u["ift_unit_T"]
        h = next((r for r in u["rows"] if r["config"] == "higher SGD" and r["T"] == T), None)
        if h is not None:
            ok = [r for r in u["ift"] if r["rel_err"] <= h["rel_err"]]
            if ok:
                best = min(ok, key=lambda r: r["k"])
                frac = best["peak_mb"] / h["peak_mb"]
                rows.append([f"IFT memory at equal accuracy vs higher, T={T} (IFT CG-{best['k']}: error "
                             f"{e(best['rel_err'])} ≤ higher's {e(h['rel_err'])})",
                             f"{f(best['peak_mb'])} MB vs {f(h['peak_mb'])} MB (1/{1 / frac:.0f})", "≤ 1/10",
                             "met" if frac <= 0.1 else "missed"])
    if "cost" in res:
        for r in res["cost"]["by_size"]:
            floor = r.get("flop_ratio")
            status = "met" if r["ratio"] <= 16 else "missed"
            if floor is not None and r["ratio"] > 16 and floor > 16:
                status += " (above the target: unreachable with exact products)"
            measured, target = f"{f(r['ratio'], 1)} gradients", "≤ 16"
            if floor is not None:
                x = r["ratio"] / floor
                measured += f", {f(x, 2)}× its matmul FLOP floor of {f(floor, 1)}"
                target += ", ≤ 1.15× floor"
                status = f"≤ 16: {status}; ≤ 1.15× floor: {'met' if x <= 1.15 else 'missed'}"
            k = r.get("products", 10)
            if k < 10:
                measured += f" ({k} products: converged)"
            rows.append([f"one hypergradient, CG ≤ 10 products, MLP {r['n_params']:,} params", measured, target, status])
    if "cost" in res and len(res["cost"]["by_groups"]) > 1:
        g = res["cost"]["by_groups"]
        rs = [r["ratio"] for r in g]
        mem = [r.get("peak_mb_hypergrad") for r in g if r.get("peak_mb_hypergrad") is not None]
        xs = [r["ratio"] / r["flop_ratio"] for r in g if r.get("flop_ratio")]
        rows.append([f"cost vs number of hyperparameters, {g[0]['n_hparams']:,} → {g[-1]['n_hparams']:,} "
                     f"(MLP {g[0]['n_params']:,} params)",
                     f"{f(min(rs), 1)}–{f(max(rs), 1)} gradients" + (f", {f(min(mem), 0)}–{f(max(mem), 0)} MB"
                                                                   if mem else "")
                     + (f", {f(min(xs), 2)}–{f(max(xs), 2)}× the matmul FLOP floor" if xs else ""),
                     "flat", "met" if max(rs) <= 1.25 * min(rs) else "not flat"])
    if "speed" in res:
        sp = res["speed"]
        rows.append([f"one Gauss–Newton product (MLP {sp['n_params']:,} params)", f"{f(sp['ggn_product'])} gradients "
                     f"(matmul FLOP floor {f(sp['ggn_product_floor'])})", "≤ 1.3",
                     "met" if sp["ggn_product"] <= 1.3 else "missed"])
        x = sp["ggn_cg10"] / sp["ggn_cg10_floor"]
        rows.append([f"one hypergradient, Gauss–Newton CG-10, penalty= (MLP {sp['n_params']:,} params)",
                     f"{f(sp['ggn_cg10'], 1)} gradients, {f(x, 3)}× its matmul FLOP floor of {f(sp['ggn_cg10_floor'], 1)}",
                     "≤ 15, ≤ 1.15× floor", "met" if sp["ggn_cg10"] <= 15 and x <= 1.15 else
                     f"≤ 15: {'met' if sp['ggn_cg10'] <= 15 else 'missed'}; ≤ 1.15× floor: {'met' if x <= 1.15 else 'missed'}"])
        for r, target in zip(sp["inner_step"], (1.05, 1.02)):
            rows.append([f"HyperOptimizer.inner_step vs plain torch step (MLP {'-'.join(map(str, r['sizes']))}, "
                         f"batch {r['batch']})", f"{f(r['ratio'])}×", f"≤ {target}", "met" if r["ratio"] <= target else "missed"])
    starts = HERE / "results_starts.json"
    if starts.exists():
        st = json.loads(starts.read_text(encoding="utf-8"))
        ok = [r for r in st["rows"] if r["reached"]]
        miss = [r for r in st["rows"] if not r["reached"]]
        tv = [r["time_vs_grid"] for r in st["rows"]]
        rows.append([f"demo: tuned run from each start decay in {sorted({r['start'] for r in st['rows']})} vs the 9-point "
                     f"grid's best test loss ({len(st['seeds'])} seeds; `benchmarks/compare_starts.py`)",
                     f"reached on {len(ok)}/{len(st['rows'])}, at {f(min(tv))}–{f(max(tv))} of the grid's wall time"
                     + "".join(f"; seed {r['seed']} from {r['start']:g}: +{r['test_loss_minus_grid_best']:.4f}" for r in miss),
                     "every start, less time", "met" if not miss and max(tv) < 1 else
                     f"missed on {len(miss)}/{len(st['rows'])} (RESULTS.md explains)"])
    if "hpo" in res:
        for name, runs in _hpo_by_task(res["hpo"]).items():
            for key, label in HPO_HEADLINE[:1] if brief else HPO_HEADLINE:
                cmp = _hpo_vs_tpe(runs, key)
                if cmp is None:
                    continue
                n, wins, fast = len(runs), cmp["wins"], cmp["min_speedup"] >= 10
                status = ("met" if wins == n and fast else
                          f"lower loss {wins}/{n}: {'met' if wins == n else 'missed'}; "
                          f"time ≤ 1/10 of TPE's on every split: {'met' if fast else 'missed'}")
                rows.append([f"HPO {name} ({runs[0]['n_hparams']} decays, {n} splits): {label} vs "
                             f"TPE-{cmp['tpe_evaluations']}",
                             f"val CE lower on {wins}/{n} splits (mean {f(cmp['mean_val'], 3)} vs "
                             f"{f(cmp['mean_val_tpe'], 3)}); {f(cmp['min_speedup'], 1)}–{f(cmp['max_speedup'], 1)}× "
                             f"less wall time" + (f" ({cmp['cpu_speedup']} less CPU time)"
                                                  if cmp["cpu_speedup"] else ""),
                             "lower, ≤ 1/10 time", status])
    if "repro" in res:
        r = res["repro"]
        rows.append(["hypertorch logistic regression (n=1000, d=20, T=100, K=10)",
                     f"val BCE {f(r['val_bce_final'], 3)} after {r['outer_steps']} outer steps",
                     f"≈ {r['their_val_bce']}", "reproduced" if abs(r["val_bce_final"] - r["their_val_bce"]) < 0.02
                     else "differs"])
    if "lorraine" in res:
        import lorraine

        c = lorraine.compare_counts(res["lorraine"], "Neumann (auto α)")
        rows.append(["Lorraine et al. 2020, Neumann vs CG, per-weight decay (digits softmax, "
                     f"{res['lorraine']['problem']['n_hparams']} decays)",
                     f"Neumann's ℓ2 distance larger at {c['larger_l2']}/{c['pairs']} (setting, k) pairs, its "
                     f"cosine higher at {c['higher_cosine']}/{c['pairs']}",
                     "their finding (recalled, unverified): Neumann often higher cosine, larger ℓ2",
                     ("ℓ2: agrees; " if 2 * c["larger_l2"] >= c["pairs"] else "ℓ2: differs; ")
                     + ("cosine: agrees" if 2 * c["higher_cosine"] >= c["pairs"] else "cosine: differs")])
    return rows


def _nystrom_sentence(problems: List[Dict[str, Any]]) -> str:
    """Nyström's default ρ = "auto" against the former fixed ρ = 1e-3, from the accuracy rows."""
    parts = []
    for p in problems:
        n = p["n_params"]
        by = {m: [r["rel_err"] for r in p["rows"] if r["method"] == m and r["k"] < n and math.isfinite(r["rel_err"])]
              for m in ("Nyström", "Nyström (ρ = 1e-3)")}
        if all(by.values()):
            parts.append(f"{p['problem'].split(' (')[0]} {e(min(by['Nyström']))}–{e(max(by['Nyström']))} vs "
                         f"{e(min(by['Nyström (ρ = 1e-3)']))}–{e(max(by['Nyström (ρ = 1e-3)']))}")
    if not parts:
        return ""
    return ("Nyström: relative error below full rank with the default `rho=\"auto\"` (the captured subspace "
            "inverted exactly, the rest of the spectrum taken to be Â's smallest eigenvalue) against the "
            "former default ρ = 1e-3, whose (Â + ρI)⁻¹ scales every direction outside the sketch by 1/ρ: "
            + "; ".join(parts) + ".")


def render_results(res: Dict[str, Any], meta: Dict[str, Any]) -> str:
    m = meta.get("machine", {})
    L: List[str] = [BEGIN, "",
                    "## Against TorchOpt, higher and Optuna", "",
                    "_This section is generated by `benchmarks/make_results.py` from "
                    "`benchmarks/results_baselines.json`; do not edit it by hand._", "",
                    f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}, "
                    f"Python {m.get('python', '?')}; every experiment runs with `torch.set_num_threads(1)` "
                    f"(others share this VM). Command: `{COMMAND}` (parts: `--only "
                    f"{','.join(PARTS)}`). Dates (UTC) per part below.", "",
                    "Timings are **paired ratios**: the median over back-to-back pairs of time(X)/time(unit), "
                    "each pair a few ms apart (benchmarks/RESULTS.md explains why). *Other load* is the CPU "
                    "(cores) that other processes used during the measurement; `!` marks more than 0.1 core: "
                    "those figures were taken on a busy machine and are less reliable (the ratios are paired, "
                    "so drift cancels to first order, but not contention).", "",
                    "The same experiments run under pytest-benchmark (ratios in the session's table, "
                    "figures in `extra_info`): `python -m pytest benchmarks/bench_accuracy.py "
                    "benchmarks/bench_anchors.py benchmarks/bench_scaling.py benchmarks/bench_hpo.py "
                    "benchmarks/bench_repro.py --benchmark-only` (these use torch's default 2 threads, "
                    "like the other suites). `tests/test_benchmarks_smoke.py` runs every experiment and "
                    "the generator at tiny sizes in the default test run, and checks that the blocks in "
                    "this file and README.md are exactly what the generator renders from the JSON.", "",
                    f"Other load during the timed parts of this run: {other_load_range(res)} cores.", "",
                    "### Summary against the targets", "",
                    table(["what", "measured", "target", "status"], headline(res)), ""]
    if "accuracy" in res:
        a = res["accuracy"]
        L += ["### 1. Hypergradient accuracy vs cost", "",
              f"Run {a['_date']}. Relative error ‖ĝ − g‖/‖g‖ against the exact hypergradient (dense float64 "
              "solve at the exact inner solution) vs the number of Hessian-vector products (HVPs). "
              "Neumann's count includes its 20 power iterations (α = 1/λ_max chosen automatically); "
              "Nyström's includes one residual product. Unrolled: gradient descent with step 1/λ_max(H(w*)), "
              "*full* = k steps from w₀ = 0 all differentiated, *truncated* = 400 steps of which the last k "
              "are differentiated (its error includes the inner problem's non-convergence, like full unrolling's).",
              "", "![accuracy](plots/accuracy_vs_hvps.png)", ""]
        for p in a["problems"]:
            ks = sorted({r["k"] for r in p["rows"] if r["k"] > 0})
            show = [k for k in ks if k in (1, 5, 10, 20, 50)] or ks
            methods: List[str] = []
            for r in p["rows"]:
                if r["method"] not in methods:
                    methods.append(r["method"])
            hdr = ["method"] + [f"k={k}" for k in show]
            rows = []
            for mth in methods:
                rs = {r["k"]: r for r in p["rows"] if r["method"] == mth}
                if mth == "Identity":
                    rows.append([mth + " (0 HVPs)"] + [e(rs[0]["rel_err"])] * len(show))
                    continue
                rows.append([mth] + [(e(rs[k]["rel_err"]) + f" ({rs[k]['hvps']})") if k in rs else "–"
                                     for k in show])
            L += [f"**{p['problem']}**: {p['n_params']} inner variables, {p['n_hparams']} hyperparameters, "
                  f"κ(H) ≈ {p['cond']:.0f}. Cells: relative error (HVPs).", "", table(hdr, rows), ""]
        rows = []
        names: List[str] = []
        for p in a["problems"]:
            for r in p["rows"]:
                if r["method"] not in names and r["method"] != "Identity":
                    names.append(r["method"])
        for mth in names:
            cells = []
            for p in a["problems"]:
                for tol in (1e-2, 1e-4):
                    ok = [r["hvps"] for r in p["rows"] if r["method"] == mth and r["rel_err"] <= tol]
                    cells.append(str(min(ok)) if ok else f"> {max(r['hvps'] for r in p['rows'] if r['method'] == mth)}")
            rows.append([mth] + cells)
        hdr = ["method"] + [f"{p['problem'].split(' (')[0]}, ≤ {t:g}" for p in a["problems"] for t in (1e-2, 1e-4)]
        L += ["Hessian-vector products needed to reach a relative error of 1e-2 and 1e-4 (fewest over the "
              "k tried; `> n`: not reached with up to n products):", "", table(hdr, rows), "",
              _nystrom_sentence(a["problems"]), ""]
    if "ift_anchor" in res:
        a = res["ift_anchor"]
        L += ["### 2a. IFT vs TorchOpt `custom_root`", "",
              f"Run {a['_date']}. Same problem, same point w* (computed beforehand), same budget of k CG "
              "iterations, in one process. TorchOpt's optimality function is `torch.func.grad` of the inner "
              "loss; its default solver is `solve_normal_cg` (CG on HᵀH: two products per iteration), "
              "shown with the same 10 iterations and as shipped (rtol 1e-5, up to 10·P iterations). "
              "Our *fastest config* is the declared structure: `bl.losses.Logistic` (closed-form HVP) + "
              "`penalty=` for the logistic problem, `penalty=` with autograd HVPs for the MLP. "
              "`× gradient` = paired ratio to one gradient of the inner loss; `speed-up` = paired "
              "time(TorchOpt)/time(ours) measured directly against each other.", ""]
        for p in a["problems"]:
            L += [f"**{p['problem']}** ({p['n_params']:,} parameters, {p['n_hparams']:,} hyperparameters, k={p['k']}):",
                  "", table(["configuration", "rel. error vs exact", "× gradient", "speed-up of ours (fastest)",
                             "speed-up of ours (penalty in loss)", "other load"], _ift_rows(p)), ""]
    if "unroll_anchor" in res:
        u = res["unroll_anchor"]
        L += ["### 2b. Unrolled differentiation vs higher and TorchOpt; IFT memory", "",
              f"Run {u['_date']}. bench_unroll.py's MLP 100-256-10 ({u['n_params']:,} weights, one log-decay per "
              f"tensor: {u['n_hparams']} hyperparameters), batch 64. SGD rows (lr 0.05, momentum 0.9) start "
              "at w* and are compared with the exact IFT hypergradient there (float64 CG to 1e-10); Adam "
              "rows (lr 1e-3) start at the random initialisation (at w* Adam's g/(√v+ε) makes the unrolled "
              "hypergradient pure rounding noise) and are compared with each other. Time: paired ratio to "
              "higher SGD at the same T. Memory: peak RSS growth of one hypergradient in a fresh process.", "",
              "![memory](plots/unroll_memory.png)", ""]
        rows = []
        for r in u["rows"]:
            acc = e(r["rel_err"]) if "SGD" in r["config"] else \
                f"{e(r['rel_diff_to_higher'])} / {e(r['rel_diff_to_torchopt'])}"
            rows.append([r["config"], str(r["T"]), f(r["ratio"]), f(r["peak_mb"], 1), acc, load_flag(r["other_load"])])
        L += [table(["configuration", "T", "time × higher SGD", "peak MB", "error vs IFT-exact (SGD) / "
                     "diff. to higher / to TorchOpt (Adam)", "other load"], rows), ""]
        rows = [[r["config"], e(r["rel_err"]), f(r["ratio"], 3), f(r["peak_mb"], 2), load_flag(r["other_load"])]
                for r in u["ift"]]
        L += [f"IFT at w* (no unrolling; `penalty=`), time as a paired ratio to higher SGD with T={u['ift_unit_T']}:",
              "", table(["configuration", "error vs IFT-exact", f"time × higher (T={u['ift_unit_T']})", "peak MB",
                         "other load"], rows), ""]
    if "cost" in res:
        c = res["cost"]
        L += ["### 2c/3. Cost of one hypergradient vs model size and vs number of hyperparameters", "",
              f"Run {c['_date']}. MLPs (tanh) on batches of 256, conftest.py's recipe (50 Adam steps on the "
              "decayed loss), one IFT hypergradient with at most 10 CG products (`CG(maxiter=10, tol=0, "
              "damping=1.0)`: the damping keeps CG from stopping on the negative curvature left after 50 "
              "Adam steps; with it CG reaches its float32 rounding floor, 8·eps·‖b‖, after 5–7 products, "
              "where it stops (column `products`; runs before 2026-12-06 took 10 products), so the "
              "fixed part of a hypergradient (outer gradient, operator build, mixed product) weighs more "
              "against the FLOP floor than at 10), decays declared as `penalty=`. Unit: one gradient of "
              "the batch loss, paired. Peak memory: fresh process. FLOPs: matmul floating-point operations "
              "counted by `torch.utils.flop_counter` over one hypergradient and one gradient; their ratio "
              "is the floor of the time ratio on any hardware. An exact Hessian-vector product "
              "(Pearlmutter's R-pass, or our double backward) takes 2u₁ + 6u₂ + … matmul units against the "
              "gradient's 2u₁ + 3u₂ + … (u_l = 2·batch·|W_l|; the input layer needs no input cotangent), so "
              "a product costs 1 gradient when the input layer dominates and up to 2 when hidden layers "
              "do.", "", "![cost](plots/cost_scaling.png)", ""]
        rows = [[" - ".join(map(str, r["layers"])), f"{r['n_params']:,}", f(r["ratio"], 1),
                 f"{f(r['ratio_lo'], 1)}–{f(r['ratio_hi'], 1)}", f(r.get("flop_ratio"), 1),
                 f(r.get("peak_mb_hypergrad"), 1), f(r.get("peak_mb_gradient"), 1), str(r.get("products", 10)),
                 load_flag(r["other_load"])]
                for r in c["by_size"]]
        L += ["**vs model size** (one decay per weight):", "",
              table(["layers", "parameters", "× gradient (median)", "quartiles", "× gradient in FLOPs",
                     "peak MB hypergradient", "peak MB gradient", "products", "other load"], rows), ""]
        rows = [[f"{r['n_hparams']:,}", f(r["ratio"], 1), f"{f(r['ratio_lo'], 1)}–{f(r['ratio_hi'], 1)}",
                 f(r.get("peak_mb_hypergrad"), 1), load_flag(r["other_load"])] for r in c["by_groups"]]
        L += [f"**vs number of hyperparameters** (MLP with {c['by_groups'][0]['n_params']:,} weights; weight i "
              "uses decay i mod G; the last row is one decay per weight):", "",
              table(["hyperparameters", "× gradient (median)", "quartiles", "peak MB hypergradient", "other load"],
                    rows), ""]
    if "hpo" in res:
        h = res["hpo"]
        L += ["### 4. HPO quality: hypergradients vs Optuna TPE and random search", "",
              f"Run {h['_date']}. Same split for every method; every method's final hyperparameters are scored "
              "the same way (L-BFGS refit from zero to ‖∇‖∞ ≤ 1e-6 or at most 100 iterations, scikit-learn's "
              "default cap; then validation CE and test accuracy); wall time includes "
              "that refit for ours and all 100 refits for the black-box searches (Optuna "
              f"{meta.get('optuna', '?')}, TPE and random samplers, log-decays in [ln 1e-5, ln 1e2] "
              "for every method). HyperOptimizer: full-batch SGD (lr 0.1, momentum 0.9), 200 warm-up steps, "
              "then a hyper step (IFT, CG-10, Adam lr 0.1 on the log-decays) every 20 inner steps, 150 hyper "
              "steps. The core-API variant: warm-started L-BFGS inner solves + `implicit_hypergrad` (CG-20), "
              "60 Adam steps (lr 0.1), and the same with 20 larger steps (lr 0.3). HyperOptimizer (L-BFGS "
              "inner, the headline row): `torch.optim.LBFGS` as the inner optimizer and `hyper_every=1`, "
              "20 hyper steps (Adam lr 0.3); each inner solve runs to ‖∇‖∞ ≤ 1e-4, warm-started from the "
              "previous weights and from L-BFGS's curvature history, which the HyperOptimizer keeps across "
              "a hyper step except the one pair straddling the change of hyperparameters; the hypergradient "
              "by CG-10 warm-started from the previous adjoint (`bl.Implicit(warm_start=True)`). "
              "HyperOptimizer (L-BFGS inner to 1e-6, CG-20): the core API's 20-step configuration through "
              "the high-level API (every solve tight, CG cold). Every method ran once on a tiny task before "
              "the timed runs, so one-time costs (imports, first passes) are charged to none of them. "
              + _hpo_load_note(h), "",
              "![hpo](plots/hpo_quality.png)", ""]
        for name, runs in _hpo_by_task(h).items():
            keys = [_hpo_key(r) for r in runs[0]["rows"]]
            rows = []
            for key in keys:
                rs = [next(r for r in t["rows"] if _hpo_key(r) == key) for t in runs]
                cmp = _hpo_vs_tpe(runs, key) if key not in ("tpe", "baseline") else None
                secs = sorted(r["seconds"] for r in rs)
                cpu = sorted(r["cpu_seconds"] for r in rs if "cpu_seconds" in r)
                rows.append([rs[0]["method"], " / ".join(f(r["val_ce"], 4) for r in rs),
                             f(sum(r["test_ce"] for r in rs) / len(rs), 4),
                             f(100 * sum(r["test_acc"] for r in rs) / len(rs), 1), f(secs[len(secs) // 2], 2),
                             f(cpu[len(cpu) // 2], 2) if cpu and key != "baseline" else "",
                             cmp["cpu_speedup"] if cmp else "",
                             f"{f(cmp['min_speedup'], 1)}–{f(cmp['max_speedup'], 1)}×" if cmp else "",
                             f"{cmp['wins']}/{cmp['n']}" if cmp else ""])
            t0 = runs[0]
            L += [f"**{name}** ({t0['n_hparams']} decays; {t0['n_train']} train / {t0['n_val']} val / "
                  f"{t0['n_test']} test; split seeds {', '.join(str(t['seed']) for t in runs)}, which also seed "
                  "the samplers):", "",
                  table(["method", "val CE per split", "test CE (mean)", "test acc % (mean)", "wall s (median)",
                         "CPU s (median)", "TPE's CPU time / ours", "TPE's time / ours", "val CE < TPE's"], rows), ""]
    if "repro" in res:
        r = res["repro"]
        L += ["### 5. Reproductions", "",
              f"Run {r['_date']}. **hypertorch, logistic regression** (their `examples/logistic_regression.ipynb`: "
              "seed 1, n = 1000, d = 20, labels 1[x·w + 0.1ε > 0], half for validation, per-feature L2 λ "
              "starting at 1, T = 100 GD steps of lr 0.1 from zero, reverse-mode through the last K = 10): "
              f"validation BCE **{f(r['val_bce_first'], 3)} → {f(r['val_bce_final'], 3)}** after "
              f"{r['outer_steps']} outer steps ({f(r['seconds'], 1)} s), theirs ≈ {r['their_val_bce']}. "
              "Our outer optimizer (Adam, lr 0.05, λ ≥ 0) is our choice: the notebook's outer-loop cell "
              "could not be read offline.", "",
              ]
    if "lorraine" in res:
        import lorraine

        body = lorraine.render_lorraine(res["lorraine"]).replace("## Neumann series", "#### Neumann series", 1)
        L += [body, f"_Run {res['lorraine']['_date']}._", "", "![lorraine](plots/lorraine_neumann_vs_cg.png)", ""]
    L += [END]
    return "\n".join(L) + "\n"


def other_load_range(res: Dict[str, Any]) -> str:
    """Range of the other-load figures recorded in the timed rows (cores)."""
    vals: List[float] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            v = x.get("other_load")
            if isinstance(v, float) and math.isfinite(v):
                vals.append(v)
            for y in x.values():
                walk(y)
        elif isinstance(x, list):
            for y in x:
                walk(y)
    walk({k: v for k, v in res.items() if k in ("ift_anchor", "unroll_anchor", "cost")})
    return f"{min(vals):.2f}–{max(vals):.2f}" if vals else "–"


def render_readme(res: Dict[str, Any], meta: Dict[str, Any]) -> str:
    m = meta.get("machine", {})
    return "\n".join([
        BEGIN, "",
        f"Measured by `{COMMAND}` on {m.get('cpu', '?')} ({m.get('cores', '?')} cores, torch "
        f"{m.get('torch', '?')}, 1 thread), {meta.get('date', '?')}; details, other load and every "
        "configuration in [`benchmarks/RESULTS.md`](benchmarks/RESULTS.md). Generated, not typed. "
        f"Time ratios are paired (back-to-back) and were taken while other jobs used "
        f"{other_load_range(res)} of the 2 cores." + (
            f" The HPO rows ran at a load average of {_hpo_load(res['hpo'])} (all processes; wall and CPU "
            f"times of every method inflated by other jobs, RESULTS.md section 4)."
            if "hpo" in res and _hpo_load(res["hpo"]) else ""), "",
        table(["what", "measured", "target", "status"], headline(res, brief=True)), "",
        "See RESULTS.md for the other HPO configurations (SGD inner optimizer, the core API).", "",
        "![accuracy vs cost](benchmarks/plots/accuracy_vs_hvps.png)", "", END, ""])


def replace_block(text: str, block: str, anchor: Optional[str] = None) -> str:
    if BEGIN in text and END in text:
        i, j = text.index(BEGIN), text.index(END) + len(END)
        tail = text[j:]
        if tail.startswith("\n"):
            tail = tail[1:]
        return text[:i] + block + tail
    if anchor is not None and anchor in text:
        i = text.index(anchor) + len(anchor)
        return text[:i] + "\n\n" + block + text[i:]
    return text.rstrip("\n") + "\n\n" + block


def write_all(res: Dict[str, Any], meta: Dict[str, Any], results_md: Path, readme: Path, plotdir: Path) -> None:
    plots(res, plotdir)
    results_md.write_text(replace_block(results_md.read_text(encoding="utf-8"), render_results(res, meta)),
                          encoding="utf-8")
    text = readme.read_text(encoding="utf-8")
    anchor = "python -m pytest benchmarks -q --benchmark-only\n```"
    readme.write_text(replace_block(text, render_readme(res, meta), anchor=anchor), encoding="utf-8")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; write only under --out")
    ap.add_argument("--render-only", action="store_true", help="no experiments: re-render from the JSON")
    ap.add_argument("--out", default=None, help="folder for JSON, Markdown and plots (default: the repository)")
    a = ap.parse_args(argv)
    parts = [p for p in a.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if a.smoke and a.out is None:
        ap.error("--smoke writes only under --out DIR (the repository's figures come from full runs)")
    out = Path(a.out) if a.out else None
    json_path = (out / "results_baselines.json") if out else HERE / "results_baselines.json"
    results_md = (out / "RESULTS.md") if out else HERE / "RESULTS.md"
    readme = (out / "README.md") if out else ROOT / "README.md"
    plotdir = (out / "plots") if out else HERE / "plots"
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for p, src in ((results_md, HERE / "RESULTS.md"), (readme, ROOT / "README.md")):
            if not p.exists():
                p.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    data: Dict[str, Any] = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else {}
    res = data.get("results", {})
    if not a.render_only:
        res.update(run_parts(parts, a.smoke))
    import torch

    import baselines

    meta = {"machine": {**baselines.machine(), "torch_threads": 1},
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__}
    try:
        import optuna
        meta["optuna"] = optuna.__version__
    except ImportError:
        pass
    data = {"meta": meta, "results": res}
    json_path.write_text(json.dumps(data, indent=1, default=float) + "\n", encoding="utf-8")
    write_all(res, meta, results_md, readme, plotdir)
    return data


if __name__ == "__main__":
    main()
