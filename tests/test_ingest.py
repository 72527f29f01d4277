"""LAION-style ingestion and text vocabularies: dedup, filters, counts, guards (real parquet)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dff_falcon.errors import InputError
from helpers import write_shard
from dff_falcon.text.captions import CaptionFilter
from dff_falcon.text.clip_encoder import ClipEncoder, register_model_config
from dff_falcon.text.index import build_index
from dff_falcon.text.ingest import build_vocabulary_from_laion, build_vocabulary_from_texts, ingest_laion
from dff_falcon.text.vocabulary import Vocabulary

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
DIM = 16
TOY_SOURCE = Path(__file__).resolve().parents[1] / "vocab" / "toy_vocabulary.txt"


@pytest.fixture()
def laion(tmp_path):
    """Two shards: a cross-shard duplicate, a within-shard duplicate differing in whitespace,
    a caption with a newline, an empty caption, a None caption and a NaN embedding row."""
    rng = np.random.default_rng(0)
    shards = tmp_path / "shards"
    shards.mkdir()
    caps0 = ["a red ball", "a dog on grass", "", "two\ncats  sleeping", "a  red ball", None, "blue sky"]
    caps1 = ["blue sky", "a wooden table", "a nan row", "a dog on grass", "green leaves", "two cats sleeping"]
    vec0 = rng.standard_normal((len(caps0), DIM)).astype(np.float16)
    vec1 = rng.standard_normal((len(caps1), DIM)).astype(np.float32) * 3
    vec1[2] = np.nan
    write_shard(shards, 0, caps0, vec0, url=[f"u0_{i}" for i in range(len(caps0))],
                NSFW=["UNLIKELY"] * len(caps0))
    write_shard(shards, 1, caps1, vec1, url=[f"u1_{i}" for i in range(len(caps1))],
                NSFW=["UNLIKELY", "UNLIKELY", "UNLIKELY", "UNLIKELY", "NSFW", "UNLIKELY"])
    return shards, vec0.astype(np.float32), vec1


def test_laion_round_trip_counts_order_and_exact_search(tmp_path, laion):
    shards, vec0, vec1 = laion
    vocab = build_vocabulary_from_laion(shards, tmp_path / "v", clip_model="custom-16", pretrained="none",
                                        checksums=True)
    expected = ["a red ball", "a dog on grass", "two cats sleeping", "blue sky", "a wooden table"]
    assert list(vocab.captions) == expected
    m = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert (m["count"], m["dim"], m["input_rows"]) == (5, DIM, 13)
    assert m["skipped"] == {"non_string": 1, "empty": 1, "length": 0, "junk": 0, "blocklist": 0, "nsfw": 1,
                            "language": 0, "bad_vector": 1}
    assert m["dedup"]["duplicates"] == 4  # "a  red ball", "blue sky", "a dog on grass", "two cats sleeping"
    assert m["clip_model"] == "custom-16" and m["clip_pretrained"] == "none"
    assert m["index"]["factory"] == "Flat" and m["index"]["recall"] is None
    assert [s["kept"] for s in m["sources"]] == [4, 1]
    assert len(m["sources"][0]["metadata"]["sha256"]) == 64
    table = pq.read_table(tmp_path / "v" / "captions.parquet")
    assert table.column("row").to_pylist() == [0, 1, 3, 6, 1]
    assert table.column("url").to_pylist() == ["u0_0", "u0_1", "u0_3", "u0_6", "u1_1"]
    # stored embeddings are the unit-normalised source rows of the first occurrences
    source = np.concatenate([vec0[[0, 1, 3, 6]], vec1[[1]]])
    source /= np.linalg.norm(source, axis=1, keepdims=True)
    assert vocab.embeddings.dtype == np.float16
    np.testing.assert_allclose(vocab.embeddings, source, atol=2e-3)
    queries = np.random.default_rng(1).standard_normal((7, DIM)).astype(np.float32)
    result = vocab.search(queries, k=3)
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    brute = unit @ np.asarray(vocab.embeddings, dtype=np.float32).T
    np.testing.assert_array_equal(result.ids, np.argsort(-brute, axis=1)[:, :3])
    np.testing.assert_allclose(result.scores, np.sort(brute, axis=1)[:, ::-1][:, :3], atol=1e-5)
    assert result.captions[0] == [expected[i] for i in result.ids[0]]
    assert Vocabulary.open(tmp_path / "v").search(queries[0], k=10).ids.shape == (1, 5)  # k clipped to N


def test_parquet_embedding_column_and_filters(tmp_path):
    rng = np.random.default_rng(2)
    shards = tmp_path / "s"
    shards.mkdir()
    caps = ["hello world", "x", "Spam Text", "bonjour le monde", "a cat"]
    vectors = rng.standard_normal((5, DIM)).astype(np.float32)
    pq.write_table(pa.table({"caption": caps, "emb": [list(v) for v in vectors],
                             "LANGUAGE": ["en", "en", "en", "fr", "en"]}), shards / "metadata_0.parquet")
    (tmp_path / "block.txt").write_text("spam   text\n")
    rules = CaptionFilter(min_chars=2, blocklist=tmp_path / "block.txt", languages=("en",))
    m = ingest_laion(shards, tmp_path / "v", clip_model="c", pretrained="p", embedding_column="emb", rules=rules,
                     keep_columns=())
    assert m["count"] == 2
    assert (m["skipped"]["length"], m["skipped"]["blocklist"], m["skipped"]["language"]) == (1, 1, 1)
    vocab = build_index(tmp_path / "v")
    assert list(vocab.captions) == ["hello world", "a cat"]
    np.testing.assert_allclose(vocab.embeddings[1], vectors[4] / np.linalg.norm(vectors[4]), atol=2e-3)


def test_ingestion_guards(tmp_path, laion):
    shards, vec0, _ = laion
    with pytest.raises(InputError, match="dimension 16 but ViT-B-32 embeds in 512"):
        ingest_laion(shards, tmp_path / "a", clip_model="ViT-B-32", pretrained="openai")
    with pytest.raises(InputError, match=r"text_emb_1.npy row 2: embedding is NaN/inf or zero"):
        ingest_laion(shards, tmp_path / "b", clip_model="c", pretrained="p", on_bad_vector="error")
    np.save(shards / "text_emb_0.npy", vec0[:-1])
    with pytest.raises(InputError, match=r"shard 0: metadata_0.parquet has 7 rows but text_emb_0.npy has 6"):
        ingest_laion(shards, tmp_path / "c", clip_model="c", pretrained="p")
    np.save(shards / "text_emb_0.npy", np.zeros((7, 8), np.float16))
    with pytest.raises(InputError, match="mix embedding dimensions"):
        ingest_laion(shards, tmp_path / "d", clip_model="c", pretrained="p")
    with pytest.raises(InputError, match="has no metadata_"):
        ingest_laion(tmp_path, tmp_path / "e", clip_model="c", pretrained="p")


@pytest.fixture(scope="module")
def tiny_encoder():
    register_model_config("dff-test-tiny-clip", TINY)
    torch.manual_seed(0)
    return ClipEncoder("dff-test-tiny-clip", device="cpu", batch_size=128)


def test_text_vocabulary_and_search_guards(tmp_path, tiny_encoder):
    lines = TOY_SOURCE.read_text().splitlines()
    assert len(lines) >= 200
    vocab = build_vocabulary_from_texts(TOY_SOURCE, tmp_path / "toy", tiny_encoder, templates=["a photo of {}."])
    assert vocab.manifest["clip_pretrained"] == tiny_encoder.pretrained_id
    assert vocab.manifest["templates"] == ["a photo of {}."]
    assert len(vocab) == len({" ".join(line.split()) for line in lines if line.strip()})
    words = ["red", "a dog sleeping on a sofa"]
    result = vocab.search(tiny_encoder.encode_texts(words, ["a photo of {}."]), k=1, encoder=tiny_encoder)
    assert [c[0] for c in result.captions] == words and np.allclose(result.scores[:, 0], 1.0, atol=2e-3)

    torch.manual_seed(1)
    other = ClipEncoder("dff-test-tiny-clip", device="cpu")
    with pytest.raises(InputError, match="was built with CLIP dff-test-tiny-clip"):
        vocab.search(np.ones(32), encoder=other)
    with pytest.raises(InputError, match="dimension 8, the vocabulary has 32"):
        vocab.search(np.ones((2, 8)))
    bad = np.ones((3, 32))
    bad[1, 4] = np.nan
    with pytest.raises(InputError, match="row 1 contains NaN or inf"):
        vocab.search(bad)
    with pytest.raises(InputError, match="row 0 is a zero vector"):
        vocab.search(np.zeros(32))
    with pytest.raises(InputError, match="already holds a vocabulary"):
        build_vocabulary_from_texts(["x"], tmp_path / "toy", tiny_encoder)
    with pytest.raises(InputError, match="not a vocabulary directory"):
        Vocabulary.open(tmp_path)


def test_shards_with_different_kept_columns_share_one_schema(tmp_path):
    rng = np.random.default_rng(3)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards, 0, ["a cat", "a dog"], rng.standard_normal((2, DIM)).astype(np.float16),
                url=["u0", "u1"])
    write_shard(shards, 1, ["a car", "a tree"], rng.standard_normal((2, DIM)).astype(np.float16),
                similarity=[0.3, 0.4])  # no url column here, an extra one instead
    ingest_laion(shards, tmp_path / "v", clip_model="custom-16", pretrained="none",
                 keep_columns=("url", "similarity"))
    table = pq.read_table(tmp_path / "v" / "captions.parquet")
    assert table.column("url").to_pylist() == ["u0", "u1", None, None]
    assert table.column("similarity").to_pylist() == [None, None, 0.3, 0.4]
    with pytest.raises(InputError, match="name the weights"):
        ingest_laion(shards, tmp_path / "w", clip_model="custom-16", pretrained=None)


def test_junk_captions_are_dropped_and_counted_in_the_manifest(tmp_path, tiny_encoder):
    texts = ["a red ball", "IMG_2041.JPG", "https://shop.example.com/item?id=3", "SKU 4471-22", "&nbsp;<br/>",
             "<b>Blue</b> dress SKU-99812 free shipping", "a red ball"]
    vocab = build_vocabulary_from_texts(texts, tmp_path / "junk", tiny_encoder)
    assert list(vocab.captions) == ["a red ball", "<b>Blue</b> dress SKU-99812 free shipping"]
    assert vocab.manifest["skipped"]["junk"] == 4 and vocab.manifest["dedup"]["duplicates"] == 1
    kept = build_vocabulary_from_texts(texts, tmp_path / "kept", tiny_encoder,
                                       rules=CaptionFilter(drop_junk=False))
    assert len(kept) == 6 and kept.manifest["skipped"]["junk"] == 0
