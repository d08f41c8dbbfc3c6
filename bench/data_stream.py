"""Benchmark: ShardStream samples/s vs a raw pyarrow.dataset scan of the same shards (the limit).

Both read every training row of a prepared dataset, local disk and S3 (a moto server on
127.0.0.1 started here), interleaved and repeated; the ratio is taken per repeat and the
median reported. The stream does everything the trainer needs (manifest, sha256 check of
every shard, seeded shard order + 1024-row shuffle buffer, per-rank slicing, resume cursor,
prefetch threads) and yields row objects; the raw scan only decodes Arrow batches. A third
number adds ``collate`` into batches of 16 (the cost a training step pays on top).

    python bench/data_stream.py                      # prepares MovieLens-100k into a temp dir
    python bench/data_stream.py --url runs/data/ml-100k --repeats 5 --no-s3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on loopback; sets the AWS_* environment for this process."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1",
                      AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    return proc, endpoint


def raw_scan(paths: list[str], filesystem) -> int:
    """Rows of a plain pyarrow.dataset scan over the shard files (all columns decoded)."""
    import pyarrow.dataset as ds

    return sum(b.num_rows for b in ds.dataset(paths, format="parquet", filesystem=filesystem).to_batches())


def stream_scan(url: str, prefetch: int, batch: int = 0) -> int:
    """Rows yielded by ShardStream (rank 0 of 1, shuffle buffer 1024); collated when ``batch`` > 0."""
    from ckf_dist.data.collate import collate
    from ckf_dist.data.stream import ShardStream

    s = ShardStream(url, "train", 0, 1, seed=0, shuffle_buffer=1024, prefetch=prefetch)
    n, buf = 0, []
    pad = s.manifest["tokenizer"]["pad_id"]
    for row in s:
        n += 1
        if batch:
            buf.append(row)
            if len(buf) == batch:
                collate(buf, pad)
                buf = []
    return n


def timed(fn, *args) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t, n


def bench_location(name: str, url: str, paths: list[str], filesystem, repeats: int, prefetch: int) -> dict:
    raw_scan(paths, filesystem)                 # warm-up: imports, page cache, connections
    stream_scan(url, prefetch)
    runs = []
    for _ in range(repeats):
        t_raw, n_raw = timed(raw_scan, paths, filesystem)
        t_str, n_str = timed(stream_scan, url, prefetch)
        t_col, _ = timed(stream_scan, url, prefetch, 16)
        assert n_raw == n_str, (n_raw, n_str)
        runs.append({"raw_rows_per_s": n_raw / t_raw, "stream_rows_per_s": n_str / t_str,
                     "stream_collate_rows_per_s": n_str / t_col, "ratio": t_raw / t_str, "ratio_with_collate": t_raw / t_col})
        print(f"  {name:5s} raw {runs[-1]['raw_rows_per_s']:10,.0f}/s  stream {runs[-1]['stream_rows_per_s']:10,.0f}/s  "
              f"ratio {runs[-1]['ratio']:.2f}  (+collate {runs[-1]['stream_collate_rows_per_s']:9,.0f}/s, "
              f"ratio {runs[-1]['ratio_with_collate']:.2f})", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"rows": n_raw, "runs": runs, "median": med}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="", help="a prepared dataset on local disk (default: prepare MovieLens-100k into a temp dir)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefetch", type=int, default=8, help="shards decoded ahead (ShardStream's default)")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_stream.json"))
    args = ap.parse_args()

    import fsspec
    import pyarrow.fs as pafs

    tmp = tempfile.mkdtemp(prefix="ckf-bench-")
    url = args.url
    if not url:
        from ckf_dist.config import load_config
        from ckf_dist.stages.prepare import run_prepare

        url = f"{tmp}/ml-100k"
        print(f"preparing MovieLens-100k into {url} ...", flush=True)
        run_prepare(load_config(None, [f"data.output={url}"]), progress=False)
    manifest = json.loads(Path(url, "manifest.json").read_text())
    shards = [s for s in manifest["shards"] if s["split"] == "train"]
    size = sum(s["bytes"] for s in shards)
    print(f"{len(shards)} train shards, {sum(s['rows'] for s in shards):,} rows, {size / 1e6:.1f} MB "
          f"(median of {args.repeats}; prefetch {args.prefetch})", flush=True)
    results = {"local": bench_location("local", url, [str(Path(url, s["path"]).resolve()) for s in shards],
                                       pafs.LocalFileSystem(), args.repeats, args.prefetch)}
    proc = None
    if not args.no_s3:
        proc, endpoint = start_moto()
        try:
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            fs = fsspec.filesystem("s3")
            fs.put(url.rstrip("/") + "/", "bench/ds/", recursive=True)
            s3 = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                                   access_key="testing", secret_key="testing")
            results["s3"] = bench_location("s3", "s3://bench/ds", [f"bench/ds/{s['path']}" for s in shards], s3,
                                           args.repeats, args.prefetch)
        finally:
            proc.terminate()
            proc.wait()
    out = {
        "benchmark": "data_stream", "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.platform(),
        "cpus": os.cpu_count(), "dataset": manifest["source"]["kind"], "train_rows": sum(s["rows"] for s in shards),
        "bytes": size, "shards": len(shards), "prefetch": args.prefetch, "shuffle_buffer": 1024, "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("\nmedian ratios (stream / raw pyarrow.dataset scan; target >= 0.8):")
    for where, r in results.items():
        m = r["median"]
        print(f"  {where:5s} stream {m['ratio']:.2f}   stream+collate(16) {m['ratio_with_collate']:.2f}   "
              f"[raw {m['raw_rows_per_s']:,.0f} rows/s, stream {m['stream_rows_per_s']:,.0f} rows/s]")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
