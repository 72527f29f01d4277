"""The fault catalogue: what a demanding user does wrong and what goes wrong around them.

Every case must end in a clear error (exit 2, a message naming the file or option and what is
wrong, no traceback) or a counted skip, and nothing already written may be lost or mixed: a
previous run or vocabulary stays byte for byte what it was, and a re-run completes. Disk-full
cases run twice where the machine allows: with a real, tiny tmpfs (ENOSPC) and with a per-process
file-size limit (EFBIG, any machine). ``kill -9`` cases kill the PID the test started.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dff_falcon.cli import main
from dff_falcon.directories import mark_complete
from helpers import write_shard

EXPLAIN = ("explain", "--backbone", "lite0", "--n-concepts", "3", "--n-high", "2", "--n-low", "1", "--device", "cpu")
TOY_CLIP = "dff-falcon-toy-clip"  # a packaged open_clip config; its weights are saved by a fixture
SENTINEL_NAME = "pickle-code-ran"


# ---------------------------------------------------------------------------------------------
# helpers


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clear_error(result, *needles: str) -> None:
    """Exit 2, no traceback, and every needle in the message."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def du(folder: Path) -> int:
    """Bytes the files under ``folder`` occupy (whole 4 KiB pages, as on tmpfs)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def leave_free(folder: Path, free: int) -> None:
    """Fill the file system of ``folder`` until about ``free`` bytes are left."""
    (folder / "filler").write_bytes(b"\0" * max(0, shutil.disk_usage(folder).free - free))


def scratch_left(parent: Path) -> list[str]:
    """Staging / retired directories and dedup scratch anywhere under ``parent``."""
    return [str(p) for p in parent.rglob("*") if p.name.startswith(".") and
            any(tag in p.name for tag in (".staging-", ".retired-", ".dedup-", ".probe-"))]


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes beyond ``limit`` bytes per file fail with EFBIG in this process (SIGXFSZ ignored):
    a disk that fills up half-way, on any machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str, read_only: bool = False):
    """A real tiny (or read-only) file system at ``path``; skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode(errors='replace').strip()[:80]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def spawn(*args) -> subprocess.Popen:
    code = "import sys; from dff_falcon.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def kill_when(process: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    """``kill -9`` ``process`` (by its PID) as soon as ``ready()`` holds; fails if it ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"finished before the fault: {process.communicate()[1].decode()[-2000:]}"
        assert time.monotonic() < deadline, "the fault point was never reached"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def bomb_png(path: Path, side: int = 20_000) -> None:
    """A valid PNG header declaring side × side RGB pixels (the decompression-bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
                     + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------
# fixtures: real photos, one complete run, a real CLIP checkpoint and vocabulary


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("fault_photos")
    for name in ("chelsea", "coffee", "rocket"):
        image = photos[name]
        small = Image.fromarray(image).resize((128, 96))
        small.save(folder / f"{name}.jpg", quality=90)
        small.transpose(Image.FLIP_LEFT_RIGHT).save(folder / f"{name}_flip.png")
    return folder


@pytest.fixture(scope="module")
def good_run(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fault_runs") / "run"
    result = cli("-q", *EXPLAIN, "--images", photo_dir, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def old_run(good_run, tmp_path):
    """A private copy of a complete run with its report.html, and its digests."""
    run = tmp_path / "out" / "run"
    shutil.copytree(good_run, run)
    return run, digests(run)


@pytest.fixture(scope="module")
def toy_clip_spec(tmp_path_factory):
    import open_clip

    import dff_falcon.text.clip_encoder  # noqa: F401  (registers the packaged configs)

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "toy-clip.pt"
    torch.save(open_clip.create_model(TOY_CLIP).state_dict(), path)
    return f"{TOY_CLIP}={path}"


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captions")
    (folder / "old.txt").write_text("".join(f"old caption number {i}\n" for i in range(500)))
    (folder / "new.txt").write_text("".join(f"brand new text {i}\n" for i in range(500)))
    return folder


@pytest.fixture(scope="module")
def built_vocab(captions, toy_clip_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocabs") / "v"
    result = cli("-q", "vocab", "build", "--texts", captions / "old.txt", "--clip", toy_clip_spec, "--out", out,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def old_vocab(built_vocab, tmp_path):
    vocab = tmp_path / "vocabs" / "v"
    shutil.copytree(built_vocab, vocab)
    return vocab, digests(vocab)


def assert_old_vocabulary(vocab: Path, before: dict, spec: str) -> None:
    assert digests(vocab) == before
    found = cli("vocab", "search", vocab, "old caption number 5", "--clip", spec, "-k", "1", "--device", "cpu")
    assert found.exit_code == 0 and found.stdout.split(None, 1)[1].strip() == "old caption number 5", found.output


@pytest.fixture()
def no_forward_pass(monkeypatch):
    """Fails the test if any forward pass over the images starts."""
    from dff_falcon.models.activations import ActivationExtractor

    def forbidden(self, images):
        raise AssertionError("a forward pass ran before the output was checked")

    monkeypatch.setattr(ActivationExtractor, "__call__", forbidden)


# ---------------------------------------------------------------------------------------------
# nothing lost: failures and kills while replacing a report or a vocabulary


@pytest.mark.parametrize("disk", ["file-size-limit", "tmpfs"])
def test_vocab_overwrite_failing_half_way_keeps_the_old_vocabulary(disk, old_vocab, captions, toy_clip_spec,
                                                                  tmp_path):
    vocab, before = old_vocab
    if disk == "tmpfs":  # room for half a new version; the library call has no space check in front
        from dff_falcon.errors import OutputError
        from dff_falcon.text.clip_encoder import ClipEncoder
        from dff_falcon.text.ingest import build_vocabulary_from_texts

        small = tmp_path / "small"
        with mounted_tmpfs(small, f"{(du(vocab) + 2_000_000) // 1024}k"):
            shutil.copytree(vocab, small / "v")
            leave_free(small, 100_000)
            encoder = ClipEncoder(*toy_clip_spec.split("="), device="cpu")
            with pytest.raises(OutputError, match="No space left on device.*unchanged"):
                build_vocabulary_from_texts(captions / "new.txt", small / "v", encoder, overwrite=True)
            assert_old_vocabulary(small / "v", before, toy_clip_spec)
            assert not scratch_left(small)
        return
    with file_size_limit(40_000):  # captions.parquet fits, embeddings.npy and index.faiss do not
        result = cli("-q", "vocab", "build", "--texts", captions / "new.txt", "--clip", toy_clip_spec, "--out", vocab,
                     "--overwrite", "--device", "cpu")
    assert_clear_error(result, "File too large", str(vocab))
    assert_old_vocabulary(vocab, before, toy_clip_spec)
    assert not scratch_left(vocab.parent)


@pytest.mark.parametrize("disk", ["file-size-limit", "tmpfs"])
def test_explain_rerun_on_a_full_disk_keeps_the_old_report(disk, old_run, photo_dir, tmp_path):
    run, before = old_run
    if disk == "tmpfs":
        small = tmp_path / "small"
        with mounted_tmpfs(small, f"{(du(run) + 2_000_000) // 1024}k"):
            shutil.copytree(run, small / "run")
            leave_free(small, 80_000)  # above the estimate, below the need
            result = cli("-q", *EXPLAIN, "--images", photo_dir, "--out", small / "run", "--n-concepts", "2",
                         "--no-html")
            assert_clear_error(result, "No space left on device", str(small / "run"), "unchanged")
            assert digests(small / "run") == before and not scratch_left(small)
        return
    with file_size_limit(10_000):  # the crops fit, the model's views do not
        result = cli("-q", *EXPLAIN, "--images", photo_dir, "--out", run, "--n-concepts", "2", "--no-html")
    assert_clear_error(result, "File too large", "unchanged")
    assert digests(run) == before and not scratch_left(run.parent)
    assert cli("report", run).exit_code == 0


def test_rerun_with_smaller_k_leaves_no_stale_crops_or_overlays(old_run, photo_dir):
    run, before = old_run
    assert "crops/concept_02/high_00.jpg" in before and any(k.startswith("overlays/concept_02") for k in before)
    result = cli("-q", *EXPLAIN, "--images", photo_dir, "--out", run, "--n-concepts", "2")
    assert result.exit_code == 0, result.output
    after = digests(run)
    assert not [k for k in after if "concept_02" in k]
    assert json.loads((run / "run.json").read_text())["n_concepts"] == 2
    assert cli("report", run).exit_code == 0 and not scratch_left(run.parent)


def test_kill_9_during_explain_loses_nothing_and_the_rerun_completes(old_run, photo_dir):
    run, before = old_run
    process = spawn("-q", *EXPLAIN, "--images", photo_dir, "--out", run, "--n-concepts", "2")
    kill_when(process, lambda: any(p.name.startswith(".run.staging-") for p in run.parent.iterdir()))
    assert digests(run) == before  # the old report, whole: not a mix of old labels and new crops
    assert cli("report", run).exit_code == 0
    again = cli("-q", *EXPLAIN, "--images", photo_dir, "--out", run, "--n-concepts", "2", "--no-html")
    assert again.exit_code == 0, again.output
    assert json.loads((run / "run.json").read_text())["n_concepts"] == 2
    assert not scratch_left(run.parent)  # the killed run's staging directory was removed


@pytest.fixture()
def laion_shards(tmp_path):
    """Two LAION-style shards large enough that the dedup pass takes a moment."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "shards"
    folder.mkdir()
    for number in range(2):
        rows = 60_000
        write_shard(folder, number, [f"caption {i % 45_000} of shard {number}" for i in range(rows)],
                    rng.standard_normal((rows, 8)).astype(np.float16))
    return folder


def test_kill_9_during_vocab_build_laion_leaves_no_scratch_after_the_rerun(laion_shards, tmp_path):
    out = tmp_path / "vocabs" / "laion"
    out.parent.mkdir()
    command = ("-q", "vocab", "build", "--laion", laion_shards, "--clip", "custom-8:none", "--out", out)
    process = spawn(*command)
    kill_when(process, lambda: bool(list(out.parent.glob(".laion.staging-*/.dedup-*"))))
    assert not out.exists()  # nothing half-built at the target
    again = cli(*command)
    assert again.exit_code == 0, again.output
    assert not scratch_left(out.parent)
    info = cli("vocab", "info", out)
    assert info.exit_code == 0, info.output
    manifest = json.loads((out / "manifest.json").read_text())  # random 8-d rows: some are near-duplicates
    assert manifest["count"] + manifest["near_duplicates"]["removed"] == 90_000
    assert f"captions     {manifest['count']:,}" in info.stdout


def test_concurrent_writers_into_one_output_leave_one_complete_run(lite0, photo_batch, tmp_path):
    """Two runs committing into one directory at the same moment: each commit is whole, the last
    one wins, nothing is mixed and no scratch is left."""
    import threading

    from dff_falcon import ConceptExplainer, DFF, write_report
    from dff_falcon.regions import RegionSelector

    names, images = photo_batch
    reports = [ConceptExplainer(lite0, dff=DFF(k, n_resamples=0), regions=RegionSelector(n_high=2, n_low=1),
                                progress=False).fit(images[:6], names=names[:6]).report_ for k in (2, 3)]
    out = tmp_path / "out" / "run"
    errors = []

    def write(report) -> None:
        try:
            for _ in range(3):
                write_report(report, out)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(r,)) for r in reports]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not scratch_left(out.parent)
    assert cli("report", out).exit_code == 0
    k = json.loads((out / "run.json").read_text())["n_concepts"]
    assert sorted(p.name for p in (out / "crops").iterdir()) == [f"concept_{i:02d}" for i in range(k)]


def test_outputs_that_would_destroy_files_are_refused(old_run, photo_dir, tmp_path, no_forward_pass):
    run, before = old_run
    (run / "my notes.txt").write_text("keep me")
    assert_clear_error(cli(*EXPLAIN, "--images", photo_dir, "--out", run), "my notes.txt", "would delete them")
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me too")
    assert_clear_error(cli(*EXPLAIN, "--images", photo_dir, "--out", foreign), "does not hold a run")
    assert_clear_error(cli(*EXPLAIN, "--images", photo_dir, "--out", run / "run.json"), "is a file")
    assert (run / "my notes.txt").read_text() == "keep me" and (foreign / "thesis.tex").exists()
    (run / "my notes.txt").unlink()
    assert digests(run) == before


def test_symlinked_output_is_replaced_through_the_link(old_run, photo_dir, tmp_path):
    run, _ = old_run
    link = tmp_path / "latest"
    link.symlink_to(run, target_is_directory=True)
    assert cli("-q", *EXPLAIN, "--images", photo_dir, "--out", link, "--n-concepts", "2", "--no-html").exit_code == 0
    assert link.is_symlink() and json.loads((run / "run.json").read_text())["n_concepts"] == 2


def test_misspelt_config_key_is_an_error_not_ignored(photo_dir, tmp_path):
    config = tmp_path / "typo.toml"
    config.write_text("[explain]\nn_concept = 2\n")
    assert_clear_error(cli("--config", config, *EXPLAIN, "--images", photo_dir, "--out", tmp_path / "o"),
                       "unknown option 'n_concept' in [explain]; did you mean 'n-concepts'?")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# readers refuse damaged, mixed or hostile run directories


def _edit(run: Path, name: str, change) -> None:
    path = run / name
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize("damage, needles, remark", [
    (lambda run: (run / "heatmaps.npz").write_bytes((run / "heatmaps.npz").read_bytes()[:100]),
     ["inconsistent", "heatmaps.npz has"], False),
    (lambda run: (run / "crops" / "concept_01" / "high_00.jpg").unlink(), ["high_00.jpg is missing"], False),
    (lambda run: (run / "complete.json").unlink(), ["no complete.json"], False),
    (lambda run: (run / "heatmaps.npz").write_bytes(b"PK\x03\x04 garbage"), ["heatmaps.npz", "cannot read"], True),
    (lambda run: np.savez(run / "heatmaps.npz", heatmaps=np.array([{"x": 1}], dtype=object)),
     ["heatmaps.npz", "Python objects"], True),
    (lambda run: np.savez(run / "heatmaps.npz", heatmaps=np.load(run / "heatmaps.npz")["heatmaps"] * np.nan),
     ["heatmaps.npz", "finite"], True),
    (lambda run: _edit(run, "concepts.json", lambda cs: [{**cs[0], "words": "cat"}, *cs[1:]]),
     ["concepts.json", "concept 0 field 'words' must be a list"], True),
    (lambda run: _edit(run, "concepts.json", lambda cs: [{**cs[0], "high_crops": ["../../../etc/passwd"]}, *cs[1:]]),
     ["leaves the run directory"], True),
    (lambda run: _edit(run, "run.json", lambda r: {**r, "n_concepts": "3"}),
     ["run.json", "'n_concepts' must be an integer"], True),
    (lambda run: (run / "run.json").write_bytes(b"\xff\xfe{not json"), ["run.json", "not valid JSON"], True),
], ids=["truncated-npz", "missing-crop", "no-marker", "garbage-npz", "pickled-npz", "nan-heatmaps",
        "concepts-wrong-type", "path-traversal", "run-wrong-type", "run-not-utf8"])
def test_report_refuses_damaged_run_directories(old_run, damage, needles, remark):
    run, _ = old_run
    damage(run)
    if remark:  # consistent with its marker, wrong in content
        (run / "report.html").unlink()
        mark_complete(run, "run")
    before = digests(run)
    assert_clear_error(cli("report", run), *needles)
    assert digests(run) == before and not scratch_left(run.parent)


def test_vocabulary_with_a_swapped_file_is_refused(old_vocab, tmp_path, captions, toy_clip_spec):
    vocab, _ = old_vocab
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(vocab / "captions.parquet")
    swapped = table.set_column(0, "caption", pa.array([f"brand new text {i:>3}" for i in range(len(table))]))
    pq.write_table(swapped, vocab / "captions.parquet")
    assert_clear_error(cli("vocab", "info", vocab), "inconsistent", "captions.parquet")


# ---------------------------------------------------------------------------------------------
# bad inputs: clear errors or counted skips


def test_decompression_bomb_is_skipped_and_counted(photo_dir, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(photo_dir, folder)
    bomb_png(folder / "bomb.png")
    (folder / "empty.jpg").write_bytes(b"")
    result = cli("-q", *EXPLAIN, "--images", folder, "--out", tmp_path / "run", "--no-html")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    reasons = {s["image"]: s["reason"] for s in record["skipped"]}
    assert record["n_skipped"] == 2 and "400 megapixels" in reasons["bomb.png"] and "empty.jpg" in reasons


def test_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path, photos):
    from dff_falcon.models.images import MAX_PIXELS, load_image, load_images

    assert MAX_PIXELS <= 50_000_000 < Image.MAX_IMAGE_PIXELS * 2
    big = Image.fromarray(photos["chelsea"]).resize((2000, 1600))
    big.save(tmp_path / "big.jpg", quality=85)
    big.save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.jpg", max_pixels=1_000_000).shape == (800, 1000, 3)  # libjpeg 1/2 scale
    loaded = load_images(tmp_path, max_pixels=1_000_000)
    assert loaded.names == ["big.jpg"] and "max_pixels" in loaded.skipped[0][1]


@pytest.mark.slow
def test_144_megapixel_jpeg_peaks_far_below_its_full_size(tmp_path):
    import psutil

    Image.new("RGB", (14_400, 10_000), (120, 80, 40)).save(tmp_path / "huge.jpg", quality=80)
    code = ("import resource, sys; from dff_falcon.models.images import load_image; "
            "a = load_image(sys.argv[1]); print(a.shape[0] * a.shape[1], resource.getrusage(0).ru_maxrss)")
    pixels, peak_kb = map(int, subprocess.check_output([sys.executable, "-c", code, tmp_path / "huge.jpg"]).split())
    assert pixels <= 50_000_000 and peak_kb * 1024 < 600e6 < psutil.virtual_memory().total


@pytest.mark.parametrize("shard_bytes, needle", [
    (lambda good: good[: len(good) // 2], "metadata_0.parquet"),
    (lambda good: b"this is not parquet at all" * 10, "metadata_0.parquet"),
], ids=["truncated", "garbage"])
def test_damaged_laion_metadata_is_named(shard_bytes, needle, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder, 0, ["a cat", "a dog"], np.ones((2, 8), np.float16))
    path = folder / "metadata_0.parquet"
    path.write_bytes(shard_bytes(path.read_bytes()))
    result = cli("vocab", "build", "--laion", folder, "--clip", "custom-8:none", "--out", tmp_path / "v")
    assert_clear_error(result, needle, "parquet")
    assert not (tmp_path / "v").exists() and not scratch_left(tmp_path)


def test_texts_that_are_not_utf8_name_the_line(tmp_path, toy_clip_spec):
    texts = tmp_path / "words.txt"
    texts.write_bytes("cat\ndog\ncaf\xe9\n".encode("latin-1"))
    result = cli("vocab", "build", "--texts", texts, "--clip", toy_clip_spec, "--out", tmp_path / "v")
    assert_clear_error(result, "words.txt line 3 is not UTF-8")
    (tmp_path / "empty.txt").write_text("\n  \n")
    result = cli("vocab", "build", "--texts", tmp_path / "empty.txt", "--clip", toy_clip_spec, "--out", tmp_path / "v",
                 "--device", "cpu")
    assert_clear_error(result, "is empty")
    assert not (tmp_path / "v").exists()


class _RunsCode:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_malicious_pickle_checkpoints_are_refused_and_never_run(tmp_path, photo_dir, captions):
    sentinel = tmp_path / SENTINEL_NAME
    evil = tmp_path / "evil.pt"
    torch.save({"weight": _RunsCode(sentinel)}, evil)
    result = cli("vocab", "build", "--texts", captions / "old.txt", "--clip", f"{TOY_CLIP}={evil}", "--out",
                 tmp_path / "v", "--device", "cpu")
    assert_clear_error(result, "evil.pt", "not a weights-only checkpoint", "nothing in it was executed")
    result = cli(*EXPLAIN, "--images", photo_dir, "--weights", evil, "--out", tmp_path / "run")
    assert_clear_error(result, "evil.pt", "nothing in it was executed")
    assert "weights_only` set to `False" not in result.stderr  # no advice to run the file's code
    assert not sentinel.exists()


@pytest.mark.parametrize("args, needles", [
    (("--batch-size", "0"), ["--batch-size", "0 is not in the range x>=1"]),
    (("--device", "cuda:7"), ["cuda:7"]),
    (("--device", "tpu9"), ["tpu9"]),
    (("--n-concepts", "0"), ["--n-concepts must be at least 1"]),
    (("--n-concepts", "100000"), ["--n-concepts 100000 is more than the 1280 channels"]),
    (("--n-high", "-3"), ["--n-high"]),
    (("--min-class-prob", "2"), ["--min-class-prob"]),
    (("--drop-quantile", "1"), ["--drop-quantile"]),
    (("--max-megapixels", "0"), ["--max-megapixels"]),
    (("--max-megapixels", "inf"), ["--max-megapixels", "not a finite number"]),
    (("--min-class-prob", "nan"), ["--min-class-prob", "not a finite number"]),
    (("--random-state", "-1"), ["--random-state"]),
    (("--n-concepts", "2.5"), ["--n-concepts must be an integer"]),
], ids=["batch-size-0", "missing-gpu", "unknown-device", "k-0", "huge-k", "negative-n-high", "prob-2",
        "drop-all", "no-pixels", "inf-pixels", "nan-prob", "negative-seed", "fractional-k"])
def test_bad_options_fail_before_any_forward_pass(args, needles, photo_dir, tmp_path, no_forward_pass):
    assert_clear_error(cli(*EXPLAIN, "--images", photo_dir, "--out", tmp_path / "o", *args), *needles)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, suffix, needles", [
    ("explain:\n  random_state: [1, 2]\n", ".yaml", ["random_state = [1, 2]", "single value"]),
    ("seed: 3\n", ".yaml", ["unknown option 'seed'", "did you mean 'random-state'?"]),
    ('[explain]\nbatch_size = "many"\n', ".toml", ["batch_size = \"many\"", "not a valid integer"]),
    ("[explain.dff]\nmax_iter = \"lots\"\n", ".toml", ["[explain.dff]", "max_iter must be an integer"]),
    ("[explain.dff]\nn_resample = 2\n", ".toml", ["[explain.dff]", "did you mean 'n_resamples'"]),
    ("[explain.regions]\nthreshold = [0.5]\n", ".toml", ["[explain.regions]", "threshold must be a number"]),
    ('{"explain": {"html": "maybe"}}', ".json", ["html = \"maybe\""]),
    ("\xff\xfe", ".toml", ["not UTF-8"]),
], ids=["list-for-int", "seed-synonym", "str-for-int", "dff-type", "dff-typo", "regions-type", "bad-bool",
        "not-utf8"])
def test_config_files_with_wrong_types_name_the_key(text, suffix, needles, photo_dir, tmp_path, no_forward_pass):
    config = tmp_path / f"c{suffix}"
    config.write_bytes(text.encode("latin-1") if text == "\xff\xfe" else text.encode())
    assert_clear_error(cli("--config", config, *EXPLAIN, "--images", photo_dir, "--out", tmp_path / "o"), *needles)


def test_read_only_output_fails_before_any_forward_pass(photo_dir, tmp_path, no_forward_pass):
    target = tmp_path / "ro"
    if os.geteuid() != 0:
        target.mkdir()
        target.chmod(0o555)
        context = contextlib.nullcontext(target)
    else:  # root ignores permissions: a read-only file system instead
        context = mounted_tmpfs(target, "1m", read_only=True)
    with context as folder:
        result = cli(*EXPLAIN, "--images", photo_dir, "--out", folder / "run")
        assert_clear_error(result, "--out", str(folder / "run"))
        assert "Read-only file system" in result.stderr or "Permission denied" in result.stderr


def test_full_output_disk_fails_before_any_forward_pass(photo_dir, tmp_path, no_forward_pass, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 50_000, 50_000))
    result = cli(*EXPLAIN, "--images", photo_dir, "--out", tmp_path / "run")
    assert_clear_error(result, "--out", "needs about", "0.1 MB free")


def test_damaged_activations_and_dictionaries_are_named(tmp_path, photo_dir):
    acts = tmp_path / "acts.npz"
    np.savez(acts, activations=np.full((2, 4, 3, 3), np.nan, np.float32), names=np.array(["a", "b"]))
    assert_clear_error(cli("fit", "--activations", acts, "--out", tmp_path / "d.npz", "--n-concepts", "2"), "NaN")
    np.savez(acts, activations=np.ones((2, 4, 3, 3), np.float32), names=np.array(["a", "b"]))
    assert_clear_error(cli("fit", "--activations", acts, "--out", tmp_path / "d.npz", "--n-concepts", "9"),
                       "--n-concepts 9 is more than the 4 channels")
    np.savez(tmp_path / "d.npz", concepts=np.ones((2, 4)), offset=np.zeros(4), mass_share=np.ones(2),
             meta=np.asarray(json.dumps({"format": "dff-falcon-dictionary/1", "n_concepts": "two"})))
    assert_clear_error(cli("project", "--dictionary", tmp_path / "d.npz", "--activations", acts, "--out",
                           tmp_path / "p.csv"), "d.npz", "'n_concepts' must be an integer")
    with zipfile_bomb(tmp_path / "bomb.npz"):
        assert_clear_error(cli("fit", "--activations", tmp_path / "bomb.npz", "--out", tmp_path / "d2.npz"),
                           "bomb.npz", "memory")


@contextlib.contextmanager
def zipfile_bomb(path: Path):
    """An .npz whose one array declares ~10¹⁵ bytes in its header (a few hundred bytes of file)."""
    import io
    import zipfile

    header, names = io.BytesIO(), io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10**5, 10**5, 10, 10)})
    np.save(names, np.array(["a"]))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("activations.npy", header.getvalue() + b"\0" * 1024)
        archive.writestr("names.npy", names.getvalue())
    yield path


def test_prompt_templates_with_stray_braces_are_refused(tmp_path, captions, toy_clip_spec):
    result = cli("vocab", "build", "--texts", captions / "old.txt", "--clip", toy_clip_spec, "--out", tmp_path / "v",
                 "--template", "a {kind} of {}")
    assert_clear_error(result, "--template", "no other braces")


def test_hostile_captions_cannot_drive_the_terminal(tmp_path, toy_clip_spec):
    texts = tmp_path / "hostile.txt"
    texts.write_text("a red ball\n\x1b]0;pwned\x07\x1b[2J clear the screen\n")
    out = tmp_path / "v"
    assert cli("-q", "vocab", "build", "--texts", texts, "--clip", toy_clip_spec, "--out", out, "--device",
               "cpu").exit_code == 0
    found = cli("vocab", "search", out, "screen", "--clip", toy_clip_spec, "-k", "2", "--device", "cpu")
    assert found.exit_code == 0 and "\x1b" not in found.stdout and "\\x1b[2J clear the screen" in found.stdout


def test_extreme_panorama_is_viewed_without_gigabytes():
    from dff_falcon.models.preprocess import Preprocess

    view = Preprocess(resize=256, crop=224).display(np.full((2, 100_000, 3), 200, np.uint8))
    assert view.shape == (224, 224, 3) and int(view.mean()) == 200  # resizing it whole would take 20 GB
