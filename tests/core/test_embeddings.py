from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from moderator.config import DEMO_POLICIES_DIR
from moderator.core.embeddings import EmbeddingCache, build_policy_index, embed_texts
from moderator.core.policies import build_policy_set, load_policy_dir, parse_policy
from tests.helpers import DIM, CountingEncoder, vector


def policy_yaml(descriptions: list[str], benign: list[str] | None = None) -> str:
    lines = ["title: T", "action: block", "threshold: 0.2", "templates: ['{}', 'a photo of {}.']"]
    lines += ["descriptions:"] + [f"  - {d}" for d in descriptions]
    if benign:
        lines += ["benign:"] + [f"  - {b}" for b in benign]
    return "\n".join(lines) + "\n"


def test_cache_encodes_each_prompt_once_and_persists(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    cache = EmbeddingCache(tmp_path, "model-a|float32")
    first = cache.lookup(["a", "b", "a"], encoder)
    assert encoder.encoded == ["a", "b"]
    assert torch.allclose(first[0], first[2])
    cache.lookup(["b", "c"], encoder)
    assert encoder.encoded == ["a", "b", "c"]

    restarted = EmbeddingCache(tmp_path, "model-a|float32")
    again = CountingEncoder()
    assert torch.allclose(restarted.lookup(["a", "b"], again), first[:2])
    assert again.encoded == []
    assert restarted.encoded_total == 0


def test_cache_is_keyed_by_model(tmp_path: Path) -> None:
    EmbeddingCache(tmp_path, "model-a|float32").lookup(["a"], CountingEncoder())
    other = CountingEncoder()
    EmbeddingCache(tmp_path, "model-b|float32").lookup(["a"], other)
    assert other.encoded == ["a"]


def entries(cache: EmbeddingCache) -> list[Path]:
    assert cache.path is not None
    return sorted(cache.path.glob("*.f32"))


def test_a_tampered_entry_is_encoded_again_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = EmbeddingCache(tmp_path, "m")
    cache.lookup(["a knife"], CountingEncoder())
    [entry] = entries(cache)
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0x40  # one bit of the vector: what a tamperer would change
    entry.write_bytes(bytes(data))
    encoder = CountingEncoder()
    reloaded = EmbeddingCache(tmp_path, "m")
    assert torch.allclose(reloaded.lookup(["a knife"], encoder)[0], vector("a knife"))
    assert encoder.encoded == ["a knife"]
    assert reloaded.rejected_total == 1
    assert "does not verify for prompt 'a knife'" in caplog.text
    again = CountingEncoder()
    EmbeddingCache(tmp_path, "m").lookup(["a knife"], again)
    assert again.encoded == []  # the rewritten entry verifies


def test_an_entry_moved_to_another_prompt_or_cut_short_does_not_verify(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, "m")
    cache.lookup(["a knife", "a flower"], CountingEncoder())
    knife, flower = (cache._entry(p) for p in ("a knife", "a flower"))
    flower.write_bytes(knife.read_bytes())  # a knife's vector for the flower prompt
    knife.write_bytes(knife.read_bytes()[:40])
    encoder = CountingEncoder()
    EmbeddingCache(tmp_path, "m").lookup(["a knife", "a flower"], encoder)
    assert encoder.encoded == ["a knife", "a flower"]


def test_two_writers_sharing_the_folder_keep_both_sets_of_entries(tmp_path: Path) -> None:
    server, cli = EmbeddingCache(tmp_path, "m"), EmbeddingCache(tmp_path, "m")
    server.lookup(["a", "b"], CountingEncoder())
    cli.lookup(["c"], CountingEncoder())  # a whole-file cache would have dropped a and b here
    server.lookup(["d"], CountingEncoder())
    fresh = CountingEncoder()
    EmbeddingCache(tmp_path, "m").lookup(["a", "b", "c", "d"], fresh)
    assert fresh.encoded == []


def test_writes_a_dead_writer_left_are_swept_at_start(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, "m")
    cache.lookup(["a"], CountingEncoder())
    assert cache.path is not None
    stale, recent = cache.path / ".x.f32.1.tmp", cache.path / ".y.f32.2.tmp"
    stale.write_bytes(b"half")
    recent.write_bytes(b"in progress")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    EmbeddingCache(tmp_path, "m")
    assert not stale.exists()
    assert recent.exists()  # another process may be writing it now


def test_unwritable_cache_directory_still_works(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = EmbeddingCache(blocker / "cache", "m")
    assert cache.lookup(["a"], CountingEncoder()).shape == (1, DIM)


def test_descriptions_are_template_ensembles() -> None:
    cache = EmbeddingCache(None, "m")
    texts = [("a knife", ("{}", "a photo of {}."))]
    embedded = embed_texts(texts, CountingEncoder(), cache)
    expected = vector("a knife") + vector("a photo of a knife.")
    assert torch.allclose(embedded[0], expected / expected.norm(), atol=1e-6)


def test_policy_index_layout() -> None:
    policies = [
        parse_policy("knives", policy_yaml(["a knife", "a dagger", "a sword"], ["a spoon"]), "k"),
        parse_policy("guns", policy_yaml(["a gun"]), "g"),
    ]
    policy_set = build_policy_set(policies)
    assert policy_set.ids == ("guns", "knives")
    encoder = CountingEncoder()
    index = build_policy_index(policy_set, encoder, EmbeddingCache(None, "m"), torch.device("cpu"))
    assert index.matrix.shape == (5, DIM)  # 4 descriptions + 1 benign text
    assert index.violating_rows.tolist() == [[0, 5, 5], [1, 2, 3]]  # 5 is the padding row
    assert index.benign_rows.tolist() == [[5], [4]]
    assert index.has_benign.tolist() == [False, True]
    assert index.thresholds[0].tolist() == pytest.approx([0.2, 0.2])  # text; then examples
    assert len(encoder.encoded) == 10  # 5 texts x 2 templates


def test_an_index_on_another_device_keeps_a_cpu_copy_for_rescoring() -> None:
    policy_set = load_policy_dir(DEMO_POLICIES_DIR)
    cache = EmbeddingCache(None, "test")
    index = build_policy_index(policy_set, CountingEncoder(), cache, torch.device("meta"))
    assert index.matrix.device.type == "meta"
    assert index.cpu_copy is not None
    on_cpu = index.on_cpu
    for tensor in (
        on_cpu.matrix,
        on_cpu.violating_rows,
        on_cpu.benign_rows,
        on_cpu.has_benign,
    ):
        assert tensor.device.type == "cpu"
    assert on_cpu.matrix.shape == index.matrix.shape
    cpu_index = build_policy_index(policy_set, CountingEncoder(), cache, torch.device("cpu"))
    assert cpu_index.on_cpu is cpu_index
    assert torch.equal(on_cpu.matrix, cpu_index.matrix)


def test_a_forged_entry_of_another_width_is_not_trusted(tmp_path: Path) -> None:
    """The checksum has no secret: whoever can write the folder can forge one. An entry of
    another width would break the index: every entry of the lookup is encoded again."""
    cache = EmbeddingCache(tmp_path, "m")
    cache.lookup(["a", "b"], CountingEncoder())
    forged = bytes(4 * (DIM + 3))  # not DIM floats
    cache._entry("b").write_bytes(cache._checksum("b", forged) + forged)
    encoder = CountingEncoder()
    reloaded = EmbeddingCache(tmp_path, "m")
    assert reloaded.lookup(["a", "b"], encoder).shape == (2, DIM)
    assert sorted(encoder.encoded) == ["a", "b"]


def test_entries_that_are_not_plain_files_neither_block_nor_stop_the_others(
    tmp_path: Path,
) -> None:
    cache = EmbeddingCache(tmp_path, "m")
    cache.lookup(["seed"], CountingEncoder())
    os.mkfifo(cache._entry("a"))  # reading it would block until someone writes
    cache._entry("b").mkdir()  # writing over it fails
    encoder = CountingEncoder()
    fresh = EmbeddingCache(tmp_path, "m")
    assert fresh.lookup(["a", "b", "c"], encoder).shape == (3, DIM)
    assert encoder.encoded == ["a", "b", "c"]
    again = CountingEncoder()
    EmbeddingCache(tmp_path, "m").lookup(["a", "c"], again)
    assert again.encoded == []  # a's FIFO was replaced by its entry, c was saved after b failed
