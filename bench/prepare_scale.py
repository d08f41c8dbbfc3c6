"""Benchmark: wall time and peak memory of ``ckf prepare`` as the log grows.

Synthetic Amazon-2018-format logs (2,000 items, 30 interactions per user; the writer itself
streams, one block of users at a time) of each size are written once under ``--work``,
then prepared, each size in a fresh Python process that reports its own peak RSS
and the per-stage times and memory from the manifest. Peak RSS is the larger of the process's
``ru_maxrss`` and the peak of its RSS plus every descendant's, sampled every 0.2 s: with the
Ray engine (``rayN``: N row-building actors) that is the whole local cluster (GCS, raylet, the
parsing and sampling task workers, the actors). Printed: a table per engine with the cost per interaction and its growth factor from
the previous size.

    python bench/prepare_scale.py                          # 60k and 600k, local engine
    python bench/prepare_scale.py --sizes 60k,600k,6M      # the full table (6M: ~1 GB of gzip, long)
    python bench/prepare_scale.py --engines local,ray1,ray2
    python bench/prepare_scale.py --cpu-smoke              # 6k interactions, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

N_ITEMS, PER_USER = 2000, 30
# The CF stage runs a fixed 5 epochs at every size (patience above the epoch count), so every
# size does the same work per interaction, with cf.optimizer: sparse-adam, whose epoch is linear
# in the interactions. The default dense Adam moves every row at every step: an epoch costs
# O(interactions x users) (measured: 1.2 s per epoch at 600k, 45 s at 6M on these logs).
CF_YAML = "cf:\n  epochs: 5\n  patience: 10\n  optimizer: sparse-adam\n"

CHILD = textwrap.dedent("""
    import json, resource, sys, threading, time
    import psutil
    from ckf_dist.config import load_config
    from ckf_dist.stages.prepare import run_prepare
    cfg = load_config(sys.argv[1], [])
    me, peak_tree, done = psutil.Process(), [0], threading.Event()

    def sample():       # this process and every descendant (a local Ray cluster: GCS, raylet, workers)
        while not done.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak_tree[0] = max(peak_tree[0], total)
            done.wait(0.2)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    manifest = run_prepare(cfg, overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    done.set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"wall_s": wall, "peak_rss": max(peak, peak_tree[0]), "driver_peak_rss": peak,
                                  "interactions": manifest["source"]["interactions"],
                                  "stages": manifest.get("stages", {}), "rows": sum(s["rows"] for s in manifest["shards"])}))
""")



def parse_size(text: str) -> int:
    text = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * mult)


def write_log(folder: Path, n: int) -> float:
    """The synthetic log of ``n`` interactions in ``folder`` (kept between runs); seconds spent writing."""
    if (folder / "reviews_Synthetic.json.gz").exists():
        return 0.0
    from ckf_dist.data.sources.synthetic import write_synthetic

    t0 = time.perf_counter()
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    write_synthetic(str(tmp), n_users=max(3, n // PER_USER), n_items=N_ITEMS, per_user=PER_USER, seed=0)
    tmp.rename(folder)
    return time.perf_counter() - t0


def config(path: Path, log: Path, out: Path, engine: str) -> Path:
    path.write_text(textwrap.dedent(f"""
        seed: 0
        data:
          source: amazon2018
          path: {log}
          output: {out}
          kcore: 5
          max_length: 256
          shard_rows: 4096
    """) + _engine_yaml(engine) + CF_YAML)
    return path


def _engine_yaml(engine: str) -> str:
    """``local``, or ``rayN``: the Ray engine with N row-building workers."""
    if engine == "local":
        return ""
    if not engine.startswith("ray") or not engine[3:].isdigit():
        raise SystemExit(f"--engines: 'local' or 'rayN' (N workers), got {engine!r}")
    return f"  engine: ray\n  ray_workers: {int(engine[3:])}\n"


def run_one(cfg: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cfg)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({cfg}):\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="60k,600k", help="interaction counts, comma-separated (k, M suffixes)")
    ap.add_argument("--engines", default="local", help="comma-separated: local, ray1, ray2 (Ray engine, N workers)")
    ap.add_argument("--work", default="runs/bench/prepare", help="folder for the logs and prepared datasets")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--cpu-smoke", action="store_true", help="one 6k-interaction log: checks the script runs")
    args = ap.parse_args()
    sizes = [6000] if args.cpu_smoke else [parse_size(s) for s in args.sizes.split(",")]
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"# ckf prepare scaling ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}); synthetic amazon2018 logs, {N_ITEMS} items, {PER_USER}/user", flush=True)
    results = []
    for engine in args.engines.split(","):
        prev = None
        print(f"\n## engine: {engine}\n")
        print("| interactions | wall s | peak RSS GB | us / interaction | KB RSS / interaction | wall growth | RSS growth |")
        print("|---|---|---|---|---|---|---|", flush=True)
        for n in sizes:
            log = work / f"log-{n}"
            write_s = write_log(log, n)
            cfg = config(work / f"prepare-{engine}-{n}.yaml", log, work / f"data-{engine}-{n}", engine)
            r = run_one(cfg)
            r.update(engine=engine, size=n, write_log_s=write_s)
            results.append(r)
            per_us = r["wall_s"] / r["interactions"] * 1e6
            per_kb = r["peak_rss"] / r["interactions"] / 1024
            growth = ("", "") if prev is None else (f"{r['wall_s'] / prev['wall_s']:.2f}x",
                                                    f"{r['peak_rss'] / prev['peak_rss']:.2f}x")
            print(f"| {r['interactions']:,} | {r['wall_s']:.1f} | {r['peak_rss'] / 2**30:.2f} | {per_us:.0f} | "
                  f"{per_kb:.2f} | {growth[0]} | {growth[1]} |", flush=True)
            if r.get("stages"):
                print("|   stages: " + ", ".join(f"{k} {v['s']:.1f}s / {v['rss_gb']:.2f} GB"
                                              for k, v in r["stages"].items()) + " | | | | | | |", flush=True)
            prev = r
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
