"""The demo's tuned run against its grid search, from four starts and three seeds.

    python benchmarks/compare_starts.py                      # 3 seeds x 4 starts (about 15 min at 1 thread, idle)
    python benchmarks/compare_starts.py --render-only        # print the Markdown table from the JSON
    # or one process per seed, then one JSON:
    python benchmarks/compare_starts.py --seeds 0 --out /tmp/s0   # (and 1, 2, at the same time)
    python benchmarks/compare_starts.py --merge /tmp/s0 /tmp/s1 /tmp/s2
    python benchmarks/compare_starts.py --smoke --out DIR    # tiny sizes (CI); nothing in the repository touched

For each seed, ``python -m bilevel demo --compare-starts --seed S`` (:func:`bilevel.demo.run`) trains
the 9-point grid of global decays (1e-5 .. 1e-1, half-decades) and the tuned run (166,400 per-weight
decays, a shared log-decay per layer) from each of the global decays 1e-6, 1e-4, 1e-2 and 1e-1.
A tuned run *reached* the grid when its test loss is at most the lowest test loss of the 9 grid
runs (not only the grid point chosen by validation), and its time is compared with the whole
grid's (both include the same periodic evaluations). Writes ``benchmarks/results_starts.json``
with the machine, the date and the load average of the machine before and after each seed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bilevel.demo.tasks import mlp  # noqa: E402

SEEDS = (0, 1, 2)


def _load() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run(seeds=SEEDS, starts=mlp.COMPARE_STARTS, *, smoke: bool = False, progress: bool = False) -> Dict[str, Any]:
    """Run the demo with ``starts`` for every seed; return the JSON-ready figures.

    ``smoke``: a 16-unit hidden layer, 40 inner steps, a 3-point grid (seconds; CI).
    """
    sizes: Dict[str, Any] = (dict(hidden=(16,), inner_steps=40, hyper_every=5, early_steps=10, grid=(1e-4, 1e-3, 1e-2))
                             if smoke else {})
    rows: List[Dict[str, Any]] = []
    per_seed: List[Dict[str, Any]] = []
    for seed in seeds:
        load_before = _load()
        t0 = time.perf_counter()
        res = mlp.run(seed=seed, starts=tuple(starts), progress=progress, **sizes)
        st = res["starts"]
        per_seed.append({"seed": seed, "grid": res["baseline"]["grid"], "grid_wall_s": st["grid_wall_s"],
                         "grid_best_test_loss": st["grid_best_test_loss"],
                         "grid_selected_decay": res["baseline"]["decay"],
                         "grid_selected_test_loss": st["grid_selected_test_loss"],
                         "seconds": time.perf_counter() - t0, "load_before": load_before, "load_after": _load()})
        for r in st["runs"]:
            rows.append({"seed": seed, **r, "grid_best_test_loss": st["grid_best_test_loss"],
                         "grid_wall_s": st["grid_wall_s"]})
        if progress:
            print(render_table({"rows": [r for r in rows if r["seed"] == seed]}), file=sys.stderr, flush=True)
    cfg = mlp.MLPConfig(**sizes).resolved()
    return {
        "command": "python benchmarks/compare_starts.py" + (" --smoke" if smoke else ""),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"Python {platform.python_version()}, {cfg.threads} torch thread",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "seeds": per_seed,
        "rows": rows,
        "reached": sum(r["reached"] for r in rows),
        "runs": len(rows),
    }


def merge(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One result from runs of the same configuration on different seeds (processes run side by side)."""
    configs = {json.dumps(p["config"], sort_keys=True) for p in parts}
    if len(configs) != 1:
        raise ValueError("compare_starts.merge: expected runs of one configuration, got different configs.")
    rows = [r for p in parts for r in p["rows"]]
    return {**parts[0], "command": parts[0]["command"] + f" (one process per seed, {len(parts)} side by side; --merge)",
            "date": " / ".join(p["date"] for p in parts), "seeds": [s for p in parts for s in p["seeds"]],
            "rows": rows, "reached": sum(r["reached"] for r in rows), "runs": len(rows)}


def render_table(res: Dict[str, Any]) -> str:
    """The Markdown table: seed, start, tuned test loss, grid best test loss, reached?, time tuned / grid."""
    lines = ["| seed | start | tuned test loss | grid best test loss | reached? | tuned − grid best | "
             "time tuned / time grid (s) | median learned decay |",
             "|---:|---:|---:|---:|:---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['seed']} | {r['start']:.0e} | {r['test_loss']:.4f} | {r['grid_best_test_loss']:.4f} | "
                     f"{'yes' if r['reached'] else '**no**'} | {r['test_loss_minus_grid_best']:+.4f} | "
                     f"{r['time_vs_grid']:.2f} ({r['wall_s']:.1f} / {r['grid_wall_s']:.1f}) | {r['median_decay']:.1e} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI); writes only under --out")
    ap.add_argument("--out", default=None, help="folder of the JSON (default: benchmarks/)")
    ap.add_argument("--render-only", action="store_true", help="print the table from the JSON, run nothing")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="join the results_starts.json of these folders (runs of one seed each) into --out's")
    args = ap.parse_args(argv)
    if args.smoke and args.out is None:
        ap.error("--smoke writes only under --out DIR (so that the committed JSON is never overwritten)")
    path = Path(args.out or HERE) / "results_starts.json"
    if args.merge:
        parts = [json.loads((Path(d) / "results_starts.json").read_text()) for d in args.merge]
        res = merge(parts)
        path.write_text(json.dumps(res, indent=1) + "\n")
    elif args.render_only:
        res = json.loads(path.read_text())
    else:
        torch.set_num_threads(1)
        res = run(args.seeds, smoke=args.smoke, progress=not args.smoke)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1) + "\n")
    print(render_table(res))
    print(f"\nreached: {res['reached']}/{res['runs']}; load before/after each seed: "
          + ", ".join(f"{s['load_before']:.1f}/{s['load_after']:.1f}" for s in res["seeds"]
                      if s["load_before"] is not None and s["load_after"] is not None))
    return res


if __name__ == "__main__":
    main()
