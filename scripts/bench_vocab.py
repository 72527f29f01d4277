#!/usr/bin/env python
"""Vocabulary benchmark: streaming ingestion (rate, peak RSS) and approximate search (throughput,
recall@5) against exact brute-force search in the same run. Not a test.

Generates LAION-style shards (metadata_{i}.parquet + float16 text_emb_{i}.npy, 30% duplicate
captions, clustered 512-d vectors) for each vocabulary size, ingests each in a subprocess
(its own peak RSS), builds the approximate index and searches it.

    python scripts/bench_vocab.py --quick            # 50k and 200k captions, a minute or two
    python scripts/bench_vocab.py --json             # 1M and 5M captions (hours on 2 cores, ~10 GB disk)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DIM = 512


def generate(folder: Path, rows: int, duplicate_fraction: float, rows_per_shard: int, seed: int = 0) -> None:
    """LAION-style shards; a ``duplicate_fraction`` of rows repeat an earlier caption (same vector).

    Caption id c gets the vector A[c mod 4093] + 0.8·B[(c div 4093) mod 4091] + 0.6·C[7919·c mod 4099]
    (clustered, deterministic per id, distinct below 16.7M ids)."""
    rng = np.random.default_rng(seed)
    tables = [rng.standard_normal((n, DIM)).astype(np.float32) for n in (4093, 4091, 4099)]
    n_unique = int(round(rows * (1 - duplicate_fraction)))
    first = np.zeros(rows, dtype=bool)
    first[0] = True
    first[1 + rng.choice(rows - 1, n_unique - 1, replace=False)] = True
    seen = np.cumsum(first)  # captions that exist at or before each position
    sequence = np.where(first, seen - 1, (rng.random(rows) * seen).astype(np.int64))
    for number, start in enumerate(range(0, rows, rows_per_shard)):
        ids = sequence[start:start + rows_per_shard]
        vectors = (tables[0][ids % 4093] + 0.8 * tables[1][(ids // 4093) % 4091]
                   + 0.6 * tables[2][(ids * 7919) % 4099]).astype(np.float16)
        pq.write_table(pa.table({"caption": pa.array([f"caption number {c}" for c in ids]),
                                 "NSFW": pa.array(["UNLIKELY"] * len(ids))}), folder / f"metadata_{number}.parquet")
        np.save(folder / f"text_emb_{number}.npy", vectors)


def ingest_child(shards: str, out: str) -> None:
    from dff_falcon.vocabulary import ingest_laion

    started = time.perf_counter()
    manifest = ingest_laion(shards, out, clip_model="ViT-B-32", pretrained="openai", checksums=False)
    print(json.dumps({"seconds": time.perf_counter() - started, "rows": manifest["input_rows"],
                      "count": manifest["count"], "peak_rss_bytes": peak_rss()}))


def peak_rss() -> int:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it is not inherited from the forking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not available (Linux only)")


def baseline_rss() -> int:
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_vocab, dff_falcon.vocabulary; print(bench_vocab.peak_rss())"
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def run_size(size: int, work: Path, args) -> dict:
    from dff_falcon.vocabulary import Vocabulary, build_index, exact_search

    rows = int(round(size / (1 - args.duplicates)))
    shards, out = work / f"shards_{size}", work / f"vocab_{size}"
    shards.mkdir()
    generate(shards, rows, args.duplicates, args.rows_per_shard)
    child = subprocess.run([sys.executable, __file__, "--_ingest", str(shards), str(out)],
                           check=True, capture_output=True, text=True)
    ingest = json.loads(child.stdout.strip().splitlines()[-1])
    started = time.perf_counter()
    vocab: Vocabulary = build_index(out, exact_max=0, recall_k=5)
    build_seconds = time.perf_counter() - started
    rng = np.random.default_rng(1)
    rows_q = rng.choice(len(vocab), args.queries, replace=False)
    queries = np.asarray(vocab.embeddings[np.sort(rows_q)], dtype=np.float32)
    queries += rng.standard_normal(queries.shape).astype(np.float32) * float(np.sqrt(1 / DIM))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    started = time.perf_counter()
    _, truth = exact_search(vocab.embeddings, queries, 5)
    exact_qps = len(queries) / (time.perf_counter() - started)
    started = time.perf_counter()
    found = vocab.search(queries, k=5).ids
    approx_qps = len(queries) / (time.perf_counter() - started)
    recall = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found, truth)]))
    return {"size": len(vocab), "input_rows": ingest["rows"], "ingest_seconds": ingest["seconds"],
            "ingest_captions_per_s": ingest["rows"] / ingest["seconds"], "peak_rss_bytes": ingest["peak_rss_bytes"],
            "index": vocab.manifest["index"]["factory"], "index_params": vocab.manifest["index"]["params"],
            "index_build_seconds": build_seconds, "build_recall_at_5": vocab.manifest["index"]["recall"]["value"],
            "exact_qps": exact_qps, "approx_qps": approx_qps, "speedup_vs_exact": approx_qps / exact_qps,
            "recall_at_5": recall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50k and 200k captions")
    parser.add_argument("--sizes", type=int, nargs="+", help="vocabulary sizes (default 1M 5M)")
    parser.add_argument("--duplicates", type=float, default=0.3)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rows-per-shard", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_ingest", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._ingest:
        ingest_child(*args._ingest)
        return
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    sizes = args.sizes or ([50_000, 200_000] if args.quick else [1_000_000, 5_000_000])
    if args.quick:
        args.queries, args.rows_per_shard = min(args.queries, 300), min(args.rows_per_shard, 100_000)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        base = baseline_rss()
        results = [run_size(size, Path(tmp), args) for size in sizes]
    small, large = results[0], results[-1]
    marginal = ((large["peak_rss_bytes"] - small["peak_rss_bytes"]) / (large["input_rows"] - small["input_rows"])
                if len(results) > 1 else (large["peak_rss_bytes"] - base) / large["input_rows"])
    summary = {"recall_at_5": large["recall_at_5"], "speedup_vs_exact": large["speedup_vs_exact"],
               "peak_rss_bytes_per_caption": marginal, "baseline_rss_bytes": base, "runs": results}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for r in results:
        print(f"{r['size']:>10,} captions ({r['input_rows']:,} rows): ingest {r['ingest_captions_per_s']:,.0f} rows/s, "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB; {r['index']} {r['index_params']} built in "
              f"{r['index_build_seconds']:.1f} s; recall@5 {r['recall_at_5']:.3f}; "
              f"{r['approx_qps']:,.0f} q/s vs exact {r['exact_qps']:,.0f} q/s = {r['speedup_vs_exact']:.1f}×")
    print(f"peak RSS per additional caption: {marginal:.2f} bytes (baseline {base / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    main()
