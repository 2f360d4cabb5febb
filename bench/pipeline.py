"""The model pipeline alone: is a batch every max(stage, device) instead of stage + device?

    .venv/bin/python bench/pipeline.py [--gpu-ms-per-image 0.1] [--rounds 9] [--seconds 2]

Drives the real `Batcher` (serving/batching.py) in this process with a stand-in encoder that
sleeps `--gpu-ms-per-image` ms per image with the GIL released, as a GPU's forward pass keeps
the host waiting, and returns a fixed embedding; 224 px views, the default policy set. A feeder
thread keeps `--window` images submitted, as the event loop does under load. Rounds alternate
the serial worker (`--pipeline off`: stage, forward and finish in series on one thread) and the
pipelined one, and each round reports:

- device ms per batch: the time the stand-in slept, per batch;
- host ms per batch: everything else, measured on the serial worker (its time per batch minus
  its device time): collecting and staging a batch, scoring, per-image results, futures;
- the pipelined worker's time per batch against max(host, device), the ideal for a pipeline,
  and against host + device, the serial worker's.

The time per batch, not img/s, is compared, since the two workers can form batches of a
different mean size. Nothing here is a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry
from throughput import median_range

from moderator.config import REPO_ROOT, BatchConfig
from moderator.core.embeddings import EmbeddingCache, PolicyIndex, build_policy_index
from moderator.core.policies import load_policy_dir
from moderator.core.scoring import ScoredImage
from moderator.serving.batching import Batcher
from moderator.serving.metrics import Metrics

EMBED_DIM = 512
VIEW_SIZE = 224


class StandInEncoder:
    """One fixed L2-normalised embedding per image; sleeps `gpu_ms_per_image` per image with
    the GIL released (time.sleep), as a device's forward pass would. `slept` adds up the time
    it really slept, `batches` the forward passes."""

    def __init__(self, embedding: torch.Tensor, gpu_ms_per_image: float) -> None:
        self.embedding = embedding
        self.seconds_per_image = gpu_ms_per_image / 1000.0
        self.slept = 0.0
        self.batches = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        count = int(pixels.shape[0])
        self.batches += 1
        if self.seconds_per_image > 0:
            started = time.perf_counter()
            time.sleep(count * self.seconds_per_image)
            self.slept += time.perf_counter() - started
        return self.embedding.expand(count, -1).clone()


def fixed_embedding(dim: int = EMBED_DIM) -> torch.Tensor:
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.normalize(vector, dim=0)


def default_policy_index(dim: int = EMBED_DIM) -> PolicyIndex:
    """The default policy set, its text embedded by a random stand-in (scores are not read)."""
    generator = torch.Generator().manual_seed(1)
    return build_policy_index(
        load_policy_dir(REPO_ROOT / "policies"),
        lambda texts: torch.nn.functional.normalize(
            torch.randn(len(texts), dim, generator=generator), dim=-1
        ),
        EmbeddingCache(None, "bench"),
        torch.device("cpu"),
    )


@dataclass(frozen=True)
class Round:
    images: int
    batches: int
    seconds: float
    device_seconds: float

    @property
    def ms_per_batch(self) -> float:
        return 1000 * self.seconds / self.batches

    @property
    def device_ms_per_batch(self) -> float:
        return 1000 * self.device_seconds / self.batches

    @property
    def mean_batch(self) -> float:
        return self.images / self.batches


def run_round(
    pipelined: bool, gpu_ms: float, seconds: float, window: int, batch_size: int
) -> Round:
    """Feed a fresh Batcher for `seconds`; what it did."""
    metrics = Metrics(CollectorRegistry())
    encoder = StandInEncoder(fixed_embedding(), gpu_ms)
    config = BatchConfig(max_batch_size=batch_size, max_wait_ms=5, pipelined=pipelined)
    batcher = Batcher(encoder, config, metrics)
    index = default_policy_index()
    pixels = torch.randint(0, 256, (1, 3, VIEW_SIZE, VIEW_SIZE), dtype=torch.uint8)
    batcher.start()
    stop = threading.Event()
    counted = threading.Event()
    done = [0]

    def feed() -> None:
        in_flight: collections.deque[Future[ScoredImage]] = collections.deque()
        while not stop.is_set():
            while len(in_flight) < window:
                in_flight.append(batcher.submit(pixels, index, None))
            in_flight.popleft().result()
            if counted.is_set():
                done[0] += 1
        for future in in_flight:
            future.result()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    time.sleep(0.3)  # warm up
    batches_before = encoder.batches
    slept_before = encoder.slept
    counted.set()
    started = time.perf_counter()
    time.sleep(seconds)
    counted.clear()
    elapsed = time.perf_counter() - started
    images = done[0]
    batches = encoder.batches - batches_before
    slept = encoder.slept - slept_before
    stop.set()
    feeder.join()
    batcher.stop()
    return Round(images, max(1, batches), elapsed, slept)


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = collections.defaultdict(list)
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        results = {
            pipelined: run_round(
                pipelined, args.gpu_ms_per_image, args.seconds, args.window, args.batch
            )
            for pipelined in order
        }
        serial, piped = results[False], results[True]
        host = serial.ms_per_batch - serial.device_ms_per_batch
        device = piped.device_ms_per_batch
        ideal = max(host, device)
        figures["serial ms/batch"].append(serial.ms_per_batch)
        figures["pipelined ms/batch"].append(piped.ms_per_batch)
        figures["device ms/batch"].append(device)
        figures["host ms/batch"].append(host)
        figures["pipelined / max(host, device)"].append(piped.ms_per_batch / ideal)
        figures["pipelined / (host + device)"].append(piped.ms_per_batch / (host + device))
        figures["serial img/s"].append(serial.images / serial.seconds)
        figures["pipelined img/s"].append(piped.images / piped.seconds)
        figures["serial mean batch"].append(serial.mean_batch)
        figures["pipelined mean batch"].append(piped.mean_batch)
        print(
            f"round {r + 1}: serial {serial.ms_per_batch:.2f} ms/batch "
            f"({serial.images / serial.seconds:,.0f} img/s, batch {serial.mean_batch:.1f}); "
            f"pipelined {piped.ms_per_batch:.2f} ms/batch ({piped.images / piped.seconds:,.0f} "
            f"img/s, batch {piped.mean_batch:.1f}); host {host:.2f}, device {device:.2f} ms/batch",
            flush=True,
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu-ms-per-image", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--window", type=int, default=64, help="images submitted at once")
    parser.add_argument("--batch", type=int, default=16, help="--max-batch-size")
    args = parser.parse_args()
    print(
        f"# bench/pipeline.py {' '.join(sys.argv[1:]) or '(defaults)'}; torch threads {torch.get_num_threads()}"
    )
    print_figures(measure(args))


def print_figures(figures: dict[str, list[float]]) -> None:
    print()
    print("| figure | median (range) |")
    print("|---|---|")
    for name, values in figures.items():
        digits = 0 if "img/s" in name else 2
        print(f"| {name} | {median_range(values, digits)} |")


if __name__ == "__main__":
    main()
