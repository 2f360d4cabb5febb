"""Policy text embeddings: an on-disk cache and the PolicyIndex the scorer reads.

A prompt is one template applied to one description ("a photo of a bloody knife."). Prompt
embeddings are cached per (model, dtype, prompt); a description's embedding is the normalised
mean of its prompts' embeddings (CLIP prompt ensembling).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moderator.core.hash_index import HashIndex, build_hash_index
from moderator.core.known_content import ExampleImage
from moderator.core.policies import Policy, PolicySet
from moderator.errors import PolicyError

log = logging.getLogger(__name__)

Encoder = Callable[[list[str]], torch.Tensor]
# An example image -> its view embeddings [V, E], L2-normalised (decoded and encoded as live
# images are; the caller caches them).
ExampleEncoder = Callable[[ExampleImage], torch.Tensor]
CHECKSUM_BYTES = 32
# The widest entry: an example image of 64 views of 4096 values (and its view count)
MAX_ENTRY_BYTES = CHECKSUM_BYTES + 4 * (1 + 64 * 4096)
STALE_WRITE_SECONDS = 3600.0
# Views of one policy's examples (or allow examples): each image scored gathers this many
# similarities per policy, padded to the largest.
MAX_EXAMPLE_VIEWS = 1024
# Image embeddings are L2-normalised: the slack allowed for float32 rounding and JSON round trips
# when one comes back from a cache entry or a caller.
NORM_TOLERANCE = 1e-3


class EmbeddingCache:
    """Prompt embeddings for one model and dtype, kept in memory and persisted one file per
    prompt in a folder per model.

    An entry is its vector (float32, little-endian) after a SHA-256 over the model key, the
    prompt and the vector: an entry edited, cut short, or moved to another prompt's name does
    not verify, and is encoded again (logged). One file per prompt, each written whole (a
    temporary file renamed), so processes sharing the folder (replicas on one volume, the CLI
    beside a server) keep each other's entries. Temporary files older than an hour are what a
    writer that died left behind: swept at start.
    """

    def __init__(self, directory: Path | None, model_key: str, kind: str = "text") -> None:
        digest = hashlib.sha256(model_key.encode()).hexdigest()[:16]
        self.directory = directory
        self.path = directory / f"{kind}-embeddings-{digest}" if directory else None
        self.model_key = model_key
        self._embeddings: dict[str, torch.Tensor] = {}
        self.encoded_total = 0
        self.rejected_total = 0  # entries on disk that did not verify
        self._sweep_stale_writes()

    @classmethod
    def for_model(
        cls, directory: Path | None, weights_key: str | None, text_precision: str
    ) -> EmbeddingCache:
        """The cache for one model's weights and text precision; in memory only for random
        weights."""
        return cls(directory if weights_key else None, f"{weights_key}|{text_precision}")

    @classmethod
    def for_images(
        cls, directory: Path | None, weights_key: str | None, pipeline: str
    ) -> EmbeddingCache:
        """The cache of example images' view embeddings for one model's weights and image
        `pipeline` (precision, view size, limits: whatever changes the views or their
        embeddings); keyed by the image's content digest."""
        return cls(directory if weights_key else None, f"{weights_key}|{pipeline}", "image")

    def __len__(self) -> int:
        return len(self._embeddings)

    def lookup(self, prompts: list[str], encode: Encoder) -> torch.Tensor:
        """Embeddings [N, E] (float32, CPU) for `prompts`; encodes only those not cached."""
        for prompt in dict.fromkeys(p for p in prompts if p not in self._embeddings):
            stored = self._read(prompt)
            if stored is not None:
                self._embeddings[prompt] = stored
        missing = list(dict.fromkeys(p for p in prompts if p not in self._embeddings))
        if missing:
            self._encode(missing, encode)
        if len({int(self._embeddings[p].numel()) for p in prompts}) > 1:
            # A verified entry of another width (the checksum has no secret): none is trusted.
            log.warning(
                "embedding cache %s holds vectors of different sizes: encoded again", self.path
            )
            unique = list(dict.fromkeys(prompts))
            self.rejected_total += len(unique)
            self._encode(unique, encode)
        return torch.stack([self._embeddings[p] for p in prompts])

    def forget(self, prompt: str) -> None:
        """Drop an entry (in memory and on disk) its user found unusable: the next lookup
        encodes and writes it again."""
        self._embeddings.pop(prompt, None)
        self.rejected_total += 1
        if self.path is not None:
            with contextlib.suppress(OSError):
                self._entry(prompt).unlink()

    def _encode(self, prompts: list[str], encode: Encoder) -> None:
        """Encode `prompts` (distinct), keep and save them."""
        encoded = encode(prompts).float().cpu()
        self._embeddings.update(zip(prompts, encoded, strict=True))
        self.encoded_total += len(prompts)
        self._write(prompts)

    def _entry(self, prompt: str) -> Path:
        assert self.path is not None
        name = hashlib.sha256(f"{self.model_key}\0{prompt}".encode()).hexdigest()[:32]
        return self.path / f"{name}.f32"

    def _checksum(self, prompt: str, vector: bytes) -> bytes:
        return hashlib.sha256(f"{self.model_key}\0{prompt}\0".encode() + vector).digest()

    def _read(self, prompt: str) -> torch.Tensor | None:
        if self.path is None:
            return None
        entry = self._entry(prompt)
        try:
            data = _read_entry(entry)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("embedding cache entry %s unreadable: %s", entry, exc)
            return None
        checksum, vector = data[:CHECKSUM_BYTES], data[CHECKSUM_BYTES:]
        if vector and len(vector) % 4 == 0 and checksum == self._checksum(prompt, vector):
            values = torch.frombuffer(bytearray(vector), dtype=torch.float32)
            if bool(torch.isfinite(values).all()):
                return values
        self.rejected_total += 1
        log.warning(
            "embedding cache entry %s does not verify for prompt %r: encoded again",
            entry,
            prompt[:200],
        )
        return None

    def _write(self, prompts: list[str]) -> None:
        if self.path is None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a cache that cannot be written only costs re-encoding later
            log.warning("cannot write embedding cache %s: %s (in memory only)", self.path, exc)
            return
        for prompt in prompts:
            vector = self._embeddings[prompt].numpy().astype("<f4").tobytes()
            try:
                _write_whole(self._entry(prompt), self._checksum(prompt, vector) + vector)
            except OSError as exc:  # this entry only: the others are still worth keeping
                log.warning("cannot write embedding cache entry for %r: %s", prompt[:200], exc)

    def _sweep_stale_writes(self) -> None:
        if self.path is None or not self.path.is_dir():
            return
        cutoff = time.time() - STALE_WRITE_SECONDS
        for leftover in self.path.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if leftover.lstat().st_mtime < cutoff:
                    leftover.unlink()


def _read_entry(entry: Path) -> bytes:
    """An entry's bytes: a regular file (not a link, a FIFO that would block, a folder) no
    larger than any entry can be."""
    fd = os.open(entry, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_ENTRY_BYTES:
            raise OSError(f"not a regular file of at most {MAX_ENTRY_BYTES} bytes")
        return file.read(MAX_ENTRY_BYTES + 1)


def _write_whole(path: Path, data: bytes) -> None:
    """`path` holds `data` or what it held before, never a part (a temporary file renamed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True, eq=False)  # compared and hashed by identity
class PolicyIndex:
    """Everything the scorer needs for one PolicySet, as tensors.

    `matrix` holds one row per description and benign text of every policy, then one per view
    of every example image. The gather tables map each policy to its rows, padded with
    `pad_row` (a column of -inf added at scoring time), so each per-policy max is one gather
    and one reduction for all policies.
    """

    policy_set: PolicySet
    matrix: torch.Tensor  # [R, E] on the model device
    violating_rows: torch.Tensor  # [P, K] long, on the model device
    benign_rows: torch.Tensor  # [P, Kb] long, on the model device
    has_benign: torch.Tensor  # [P] bool, on the model device
    example_rows: torch.Tensor  # [P, Kx] long, on the model device: violating examples' views
    allow_rows: torch.Tensor  # [P, Ka] long, on the model device: allow examples' views
    thresholds: torch.Tensor  # [3, P] float32, CPU: text, example and allow thresholds
    example_names: tuple[tuple[str, ...], ...]  # [P][Kx]: the example each row is a view of
    allow_names: tuple[tuple[str, ...], ...]  # [P][Ka]
    hashes: HashIndex

    @property
    def pad_row(self) -> int:
        return int(self.matrix.shape[0])

    cpu_copy: PolicyIndex | None = None  # when the tensors above are on a GPU

    @property
    def on_cpu(self) -> PolicyIndex:
        """This index with every tensor on the CPU: stored embeddings are rescored there, so
        rescoring never takes the model device from live traffic."""
        return self.cpu_copy or self


def build_policy_index(
    policy_set: PolicySet,
    encode: Encoder,
    cache: EmbeddingCache,
    device: torch.device,
    embed_example: ExampleEncoder | None = None,
) -> PolicyIndex:
    """`embed_example`: an example image's view embeddings, needed when a policy has any."""
    policies = policy_set.policies
    texts, violating, benign = _text_layout(policies)
    text_matrix = embed_texts(texts, encode, cache)
    examples = _ExampleLayout(len(texts), embed_example)
    example_rows = [examples.add(p.known.examples) for p in policies]
    allow_rows = [examples.add(p.known.allow_examples) for p in policies]
    matrix = examples.appended_to(text_matrix)
    if not len(matrix):  # hash lists alone: no rows, but images are still multiplied by it
        matrix = torch.zeros(0, int(cache.lookup([""], encode).shape[1]))
    pad = int(matrix.shape[0])
    on_cpu = PolicyIndex(
        policy_set=policy_set,
        matrix=matrix,
        violating_rows=_padded(violating, pad),
        benign_rows=_padded(benign, pad),
        has_benign=torch.tensor([bool(rows) for rows in benign], dtype=torch.bool),
        example_rows=_padded([rows for rows, _ in example_rows], pad),
        allow_rows=_padded([rows for rows, _ in allow_rows], pad),
        thresholds=torch.tensor(
            [
                [p.threshold for p in policies],
                [p.known.example_threshold for p in policies],
                [p.known.allow_threshold for p in policies],
            ],
            dtype=torch.float32,
        ).view(3, len(policies)),
        example_names=tuple(names for _, names in example_rows),
        allow_names=tuple(names for _, names in allow_rows),
        hashes=build_hash_index(policies),
    )
    if device.type == "cpu":
        return on_cpu
    return dataclasses.replace(
        on_cpu,
        matrix=on_cpu.matrix.to(device),
        violating_rows=on_cpu.violating_rows.to(device),
        benign_rows=on_cpu.benign_rows.to(device),
        has_benign=on_cpu.has_benign.to(device),
        example_rows=on_cpu.example_rows.to(device),
        allow_rows=on_cpu.allow_rows.to(device),
        cpu_copy=on_cpu,
    )


class _ExampleLayout:
    """Example images' view embeddings, appended after the text rows, each image once."""

    def __init__(self, first_row: int, embed: ExampleEncoder | None) -> None:
        self._next_row = first_row
        self._embed = embed
        self._blocks: list[torch.Tensor] = []
        self._rows: dict[str, list[int]] = {}  # by content digest

    def add(self, examples: Sequence[ExampleImage]) -> tuple[list[int], tuple[str, ...]]:
        """The rows of `examples` (embedded now unless seen) and the name of each row."""
        rows: list[int] = []
        names: list[str] = []
        for example in examples:
            if example.sha256 not in self._rows:
                self._rows[example.sha256] = self._embedded(example)
            rows += self._rows[example.sha256]
            names += [example.name] * len(self._rows[example.sha256])
            if len(rows) > MAX_EXAMPLE_VIEWS:
                raise PolicyError(
                    [
                        f"{example.name}: its policy's examples make over {MAX_EXAMPLE_VIEWS} "
                        "views (an animation or a long image makes several): use fewer"
                    ]
                )
        return rows, tuple(names)

    def _embedded(self, example: ExampleImage) -> list[int]:
        if self._embed is None:
            raise ValueError("policies with example images need an image encoder")
        views = self._embed(example).float().cpu()
        self._blocks.append(views)
        first, self._next_row = self._next_row, self._next_row + int(views.shape[0])
        return list(range(first, self._next_row))

    def appended_to(self, text_matrix: torch.Tensor) -> torch.Tensor:
        if not self._blocks:
            return text_matrix
        blocks = [text_matrix, *self._blocks] if len(text_matrix) else self._blocks
        if len({int(block.shape[1]) for block in blocks}) > 1:
            raise ValueError("image and text embeddings differ in size")
        return torch.cat(blocks)


def embed_texts(
    texts: Sequence[tuple[str, tuple[str, ...]]], encode: Encoder, cache: EmbeddingCache
) -> torch.Tensor:
    """(text, templates) pairs -> normalised template-ensembled embeddings [T, E]."""
    prompts = [template.format(text) for text, templates in texts for template in templates]
    owners = torch.tensor(
        [i for i, (_, templates) in enumerate(texts) for _ in templates], dtype=torch.long
    )
    prompt_embeddings = cache.lookup(prompts, encode) if prompts else torch.zeros(0, 1)
    summed = torch.zeros(len(texts), prompt_embeddings.shape[1]).index_add_(
        0, owners, prompt_embeddings
    )
    return F.normalize(summed, dim=-1)


def _text_layout(
    policies: tuple[Policy, ...],
) -> tuple[list[tuple[str, tuple[str, ...]]], list[list[int]], list[list[int]]]:
    texts: list[tuple[str, tuple[str, ...]]] = []
    violating: list[list[int]] = []
    benign: list[list[int]] = []
    for policy in policies:
        violating.append(_append_rows(texts, policy.descriptions, policy.templates))
        benign.append(_append_rows(texts, policy.benign, policy.templates))
    return texts, violating, benign


def _append_rows(
    texts: list[tuple[str, tuple[str, ...]]], new: tuple[str, ...], templates: tuple[str, ...]
) -> list[int]:
    start = len(texts)
    texts.extend((text, templates) for text in new)
    return list(range(start, len(texts)))


def _padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long).view(
        len(rows), width
    )
