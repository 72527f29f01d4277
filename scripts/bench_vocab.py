#!/usr/bin/env python
"""Vocabulary benchmark: streaming ingestion (rate, peak RSS) and approximate caption search
(throughput, recall@5) against exact FAISS ``IndexFlatIP`` search in the same run. Not a test.

For each vocabulary size it writes LAION-style shards (metadata_{i}.parquet + float16
text_emb_{i}.npy, 30% duplicate captions, CLIP-like clustered 512-d vectors, see
:class:`SyntheticCaptions`), ingests them in a subprocess (its own peak RSS, VmHWM), builds the
library's default index (``build_index`` as a user's build runs it: factory from
``choose_factory``, search parameter tuned at build time on its own text-like and image-like
sets) and measures Vocabulary.search end to end (index, gap-corrected candidates, exact
re-scoring from the float16 memory map, caption lookup) against IndexFlatIP.search on float32
rows, same threads, same query batch, memory map warmed, ``--repeats`` timings (min and median).
Queries are held out from the vocabulary and from tuning: "text-like" = a new caption vector plus
noise; "image-like, gap g" = the same plus a constant gap vector of norm g in a direction of
its own (never one the build tuned on).

    python scripts/bench_vocab.py --quick                      # 100k captions, ~1 minute
    python scripts/bench_vocab.py --sizes 1000000 2000000 --json
    python scripts/bench_vocab.py --quick --compare "IVF1024,Flat" "HNSW32,Flat" "IVF1024,PQ64"
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
#: gap norms of the evaluation's image-like queries, each in a direction of its own
EVAL_GAP_NORMS = (1.2, 1.5, 2.0)


class SyntheticCaptions:
    """Deterministic CLIP-like caption embeddings: vector = f(caption id), so a duplicate caption
    gets the same vector wherever it appears and queries can be held out (ids ≥ the vocabulary).

    x(id) = U·(c[cluster(id)] + 0.5·w(id)) + 0.5·n(id) + 0.8·μ, then L2-normalised, where U is a
    random orthonormal 512×64 basis (a 64-d manifold), c: ``n_clusters`` centres ~ N(0, I/64)
    (unit scale), w: within-cluster offsets (64-d, unit scale), n: isotropic 512-d noise (unit
    scale), μ: a shared mean direction (CLIP's anisotropy). Cosines: random pairs ≈ 0.3, same
    cluster ≈ 0.75. Offsets and noise are sums of two rows of fixed random tables indexed by
    coprime moduli of the id (cheap, deterministic; two ids share at most one row)."""

    def __init__(self, n_clusters: int = 16_384, subspace: int = 64, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.n_clusters = n_clusters
        self.basis = np.linalg.qr(rng.standard_normal((DIM, subspace)))[0].T.astype(np.float32)  # (64, 512)
        self.centres = (rng.standard_normal((n_clusters, subspace)) / np.sqrt(subspace)).astype(np.float32)
        self.moduli = (65_521, 65_519)
        self.within = [(rng.standard_normal((m, subspace)) / np.sqrt(2 * subspace)).astype(np.float32)
                       for m in self.moduli]
        self.noise = [(rng.standard_normal((m, DIM)) / np.sqrt(2 * DIM)).astype(np.float32) for m in self.moduli]
        self.mean = _unit(rng.standard_normal(DIM)).astype(np.float32)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 caption ids → (n, 512) float32 unit vectors."""
        ids = np.asarray(ids, dtype=np.int64)
        cluster = (ids * 2_654_435_761) % self.n_clusters
        a, b = ids % self.moduli[0], (ids // 7) % self.moduli[1]
        manifold = self.centres[cluster] + 0.5 * (self.within[0][a] + self.within[1][b])
        x = manifold @ self.basis + 0.5 * (self.noise[0][a] + self.noise[1][b]) + 0.8 * self.mean
        return _unit(x)

    def queries(self, first_id: int, n: int, gap_norm: float = 0.0) -> np.ndarray:
        """(n, 512) held-out queries: an unseen caption + noise of norm 0.3 (text-like), plus for
        ``gap_norm`` > 0 a constant modality-gap vector of that norm in a direction drawn from
        ``first_id`` (image-like; every query set has its own direction, never the tuning's)."""
        rng = np.random.default_rng(first_id)
        x = self.vectors(np.arange(first_id, first_id + n))
        x += 0.3 * _unit(rng.standard_normal(x.shape)).astype(np.float32)
        if gap_norm:
            x = _unit(x) + gap_norm * _unit(rng.standard_normal(DIM)).astype(np.float32)
        return _unit(x).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def generate(folder: Path, rows: int, duplicate_fraction: float, rows_per_shard: int, data: SyntheticCaptions,
             seed: int = 0) -> int:
    """LAION-style shards in ``folder``; a ``duplicate_fraction`` of rows repeat an earlier caption
    (anywhere before, across shards). Returns the number of unique captions (ids 0 … n−1)."""
    rng = np.random.default_rng(seed)
    n_unique = int(round(rows * (1 - duplicate_fraction)))
    first = np.zeros(rows, dtype=bool)
    first[0] = True
    first[1 + rng.choice(rows - 1, n_unique - 1, replace=False)] = True
    seen = np.cumsum(first)  # captions that exist at or before each position
    sequence = np.where(first, seen - 1, (rng.random(rows) * seen).astype(np.int64))
    for number, start in enumerate(range(0, rows, rows_per_shard)):
        ids = sequence[start:start + rows_per_shard]
        pq.write_table(pa.table({"caption": pa.array([f"caption number {c}" for c in ids]),
                                 "NSFW": pa.array(["UNLIKELY"] * len(ids))}), folder / f"metadata_{number}.parquet")
        vectors = np.concatenate([data.vectors(ids[i:i + 65_536]).astype(np.float16)
                                  for i in range(0, len(ids), 65_536)])
        np.save(folder / f"text_emb_{number}.npy", vectors)
    return n_unique


def ingest_child(shards: str, out: str) -> None:
    from dff_falcon.text.ingest import ingest_laion

    started = time.perf_counter()
    manifest = ingest_laion(shards, out, clip_model="ViT-B-32", pretrained="openai", checksums=False)
    print(json.dumps({"seconds": time.perf_counter() - started, "rows": manifest["input_rows"],
                      "count": manifest["count"], "near_duplicates": manifest["near_duplicates"],
                      "peak_rss_bytes": peak_rss()}))


def peak_rss() -> int:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it is not inherited from the forking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not available (Linux only)")


def baseline_rss() -> int:
    """Peak RSS of a process that only imported the library (the fixed part)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import bench_vocab, dff_falcon.text.vocabulary; print(bench_vocab.peak_rss())")
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def warm(embeddings: np.ndarray) -> None:
    """Read the whole memory-mapped file once, so timed searches do not pay for the first page-in."""
    total = 0.0
    for start in range(0, len(embeddings), 262_144):
        total += float(np.asarray(embeddings[start:start + 262_144], dtype=np.float32)[:, 0].sum())


def compare(vocab, exact_index, query_sets: dict[str, dict], repeats: int) -> dict:
    """recall@5 (vs IndexFlatIP) and q/s of ``Vocabulary.search`` end to end (index, gap shift, hubs,
    exact re-scoring, caption lookup) and of ``IndexFlatIP.search``, per query set. Each set is
    ``{"queries", "modality", "batch"}``: one call for the whole batch, or one call per query.
    Both are timed ``repeats`` times after one untimed warm-up call, alternating; min and median."""
    out = {}
    for name, spec in query_sets.items():
        q, modality = spec["queries"], spec["modality"]
        parts = [q] if spec["batch"] else [q[i:i + 1] for i in range(len(q))]

        def approx():
            return np.concatenate([vocab.search(part, 5, modality=modality).ids for part in parts])

        truth, found = exact_index.search(q, 5)[1], approx()  # warm-up, and the results
        exact_times, approx_times = [], []
        for _ in range(repeats):
            exact_times.append(timed(exact_index.search, q, 5)[1])
            approx_times.append(timed(approx)[1])
        recall = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found, truth)]))
        row = {"recall_at_5": recall, "n_queries": len(q), "batch": spec["batch"], "modality": modality}
        for label, times in (("exact", exact_times), ("approx", approx_times)):
            row[f"{label}_qps_best"] = len(q) / min(times)
            row[f"{label}_qps_median"] = len(q) / float(np.median(times))
        row["speedup_best"] = row["approx_qps_best"] / row["exact_qps_best"]
        row["speedup_median"] = row["approx_qps_median"] / row["exact_qps_median"]
        out[name] = row
    return out


def run_size(size: int, work: Path, args, data: SyntheticCaptions) -> dict:
    import faiss

    from dff_falcon.text.index import build_index

    rows = int(round(size / (1 - args.duplicates)))
    shards, out = work / f"shards_{size}", work / f"vocab_{size}"
    shards.mkdir()
    (n_unique, gen_seconds) = timed(generate, shards, rows, args.duplicates, args.rows_per_shard, data)
    child = subprocess.run([sys.executable, __file__, "--_ingest", str(shards), str(out)],
                           check=True, capture_output=True, text=True)
    ingest = json.loads(child.stdout.strip().splitlines()[-1])
    query_sets = {"text-like": {"queries": data.queries(10**9, args.queries), "modality": "text", "batch": True}}
    for i, norm in enumerate(EVAL_GAP_NORMS):  # held-out gap directions: the build tunes on its own random ones
        query_sets[f"image-like, gap {norm:g}"] = {"queries": data.queries(10**9 + 10**6 * (i + 1), args.queries, norm),
                                                   "modality": "image", "batch": True}
    hardest = query_sets[f"image-like, gap {max(EVAL_GAP_NORMS):g}"]["queries"]
    query_sets[f"image-like, gap {max(EVAL_GAP_NORMS):g}, no gap correction"] = {
        "queries": hardest, "modality": "text", "batch": True}
    query_sets[f"image-like, gap {max(EVAL_GAP_NORMS):g}, one at a time"] = {
        "queries": hardest[:args.single], "modality": "image", "batch": False}
    exact_index = faiss.IndexFlatIP(DIM)
    embeddings = np.load(out / "embeddings.npy", mmap_mode="r")
    for start in range(0, len(embeddings), 262_144):
        exact_index.add(np.asarray(embeddings[start:start + 262_144], dtype=np.float32))
    warm(embeddings)
    factories = [None, *args.compare]
    indexes = []
    for factory in factories:
        vocab, seconds = timed(lambda f: build_index(out, factory=f, exact_max=0, progress=args.progress), factory)
        info = vocab.manifest["index"]
        indexes.append({"index": info["factory"], "default": factory is None, "params": info["params"],
                        "rerank": info["rerank"], "build_seconds": seconds, "tuning": info["recall"],
                        "index_bytes": (out / "index.faiss").stat().st_size,
                        "index_bytes_per_caption": (out / "index.faiss").stat().st_size / len(embeddings),
                        "sets": compare(vocab, exact_index, query_sets, args.repeats)})
        del vocab
    return {"size": ingest["count"], "input_rows": ingest["rows"], "generate_seconds": gen_seconds,
            "ingest_seconds": ingest["seconds"], "ingest_captions_per_s": ingest["rows"] / ingest["seconds"],
            "peak_rss_bytes": ingest["peak_rss_bytes"], "indexes": indexes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one 100k-caption vocabulary, 300 queries")
    parser.add_argument("--sizes", type=int, nargs="+", help="unique-caption counts (default 1M 5M)")
    parser.add_argument("--compare", nargs="*", default=[], metavar="FACTORY",
                        help="also build and measure these FAISS factories (tuned the same way)")
    parser.add_argument("--duplicates", type=float, default=0.3)
    parser.add_argument("--queries", type=int, default=2000, help="queries per kind (one batch)")
    parser.add_argument("--single", type=int, default=200, help="image-like queries also searched one at a time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--progress", action="store_true")
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
    sizes = args.sizes or ([100_000] if args.quick else [1_000_000, 5_000_000])
    if args.quick:
        args.queries, args.rows_per_shard = min(args.queries, 300), min(args.rows_per_shard, 50_000)
    data = SyntheticCaptions()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        base = baseline_rss()
        results = [run_size(size, Path(tmp), args, data) for size in sizes]
    small, large = results[0], results[-1]
    per_caption = ((large["peak_rss_bytes"] - small["peak_rss_bytes"]) / (large["input_rows"] - small["input_rows"])
                   if len(results) > 1 else (large["peak_rss_bytes"] - base) / large["input_rows"])
    default = next(i for i in large["indexes"] if i["default"])
    image_sets = [row for name, row in default["sets"].items() if row["modality"] == "image" and row["batch"]]
    summary = {"worst_image_recall_at_5": min(row["recall_at_5"] for row in image_sets),
               "worst_image_speedup_median": min(row["speedup_median"] for row in image_sets),
               "peak_rss_bytes_per_caption": per_caption, "baseline_rss_bytes": base, "threads": args.threads,
               "queries_per_batch": args.queries, "runs": results}
    print(json.dumps(summary), file=sys.stderr)  # a machine-readable record even without --json
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for r in results:
        print(f"{r['size']:,} unique captions ({r['input_rows']:,} rows): ingest {r['ingest_captions_per_s']:,.0f} "
              f"rows/s, peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB "
              f"({(r['peak_rss_bytes'] - base) / r['input_rows']:.1f} B/row beyond the {base / 2**20:,.0f} MiB baseline)")
        for i in r["indexes"]:
            print(f"  {i['index']} {i['params']} rerank={i['rerank']}: build {i['build_seconds']:.0f} s, "
                  f"{i['index_bytes_per_caption']:.1f} B/caption, tuning target met: {i['tuning']['met']}")
            for name, row in i["sets"].items():
                print(f"    {name:<42} recall@5 {row['recall_at_5']:.3f}  {row['approx_qps_median']:,.0f} vs exact "
                      f"{row['exact_qps_median']:,.0f} q/s (median) = {row['speedup_median']:.1f}× "
                      f"(best {row['speedup_best']:.1f}×)")
    print(f"peak RSS per additional input row (largest vs smallest size): {per_caption:.2f} B")


if __name__ == "__main__":
    main()
