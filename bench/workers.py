"""One server process against `--workers N`, around the stand-in encoder, in alternating rounds.

    .venv/bin/python bench/workers.py [--workers 2] [--rounds 6] [--seconds 4]
        [--gpu-ms-per-image 0] [--connections 16]

Starts two stand-in servers side by side (bench/stack.py's child mode: the real service with
an image encoder that costs nothing, or sleeps --gpu-ms-per-image without the GIL): one
`--workers 1`, one `--workers N` (a supervisor and N worker processes sharing the port). Both
get the same load from this process on the same number of connections (the kernel spreads a
port's connections over its workers, one connection stays with one worker): 1-image and
16-image Moderate requests, each shape on each server once per round, the order rotating.
Reported: img/s and the CPU-ms per image of the whole process tree (supervisor, workers, their
decode workers), and the medians of each round's own ratios N-workers / 1-worker. Nothing here
is a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import Load, Sample, Shape, make_images, print_machine, start_server, stop_server
from throughput import median_range

from moderator.config import REPO_ROOT


def server_args(args: argparse.Namespace, workers: int) -> argparse.Namespace:
    return argparse.Namespace(
        view_size=224,
        gpu_ms_per_image=args.gpu_ms_per_image,
        policies=args.policies,
        decode_workers=0,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        workers=workers,
    )


async def run(args: argparse.Namespace) -> None:
    print_machine()
    images = make_images(32)
    shapes = [
        Shape("1", "1-image requests", 1, args.clients),
        Shape("16", "16-image requests", 16, args.clients_16),
    ]
    names = ("1 worker", f"{args.workers} workers")
    print(
        f"# load: 1-image {args.clients} in flight, 16-image {args.clients_16} in flight, "
        f"{args.connections} connections; --gpu-ms-per-image {args.gpu_ms_per_image:g}; "
        f"{args.rounds} rounds of {args.seconds:g} s (after {args.ramp:g} s ramp)"
    )
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as many:
        servers = [
            start_server(server_args(args, 1), Path(one)),
            start_server(server_args(args, args.workers), Path(many)),
        ]
        loads = [Load(port, process.pid, images, args.connections) for process, port, _ in servers]
        samples: dict[tuple[str, str], list[Sample]] = {
            (s.key, n): [] for s in shapes for n in names
        }
        try:
            for load in loads:
                for shape in shapes:
                    await load.check(shape)
                    await load.measure(shape, args.ramp, args.ramp)
            runs = [(shape, i) for shape in shapes for i in range(2)]
            for r in range(args.rounds):
                line = []
                for shape, i in runs[r % len(runs) :] + runs[: r % len(runs)]:
                    sample, _ = await loads[i].measure(shape, args.ramp, args.seconds)
                    samples[shape.key, names[i]].append(sample)
                    line.append(
                        f"{shape.key} x{names[i][0]}: {sample.rate:,.0f} img/s "
                        f"{sample.server_ms:.2f} CPU-ms"
                    )
                print(f"round {r + 1}: " + "; ".join(line), flush=True)
        finally:
            for load in loads:
                await load.close()
            for process, _, _ in servers:
                stop_server(process)
    report(shapes, names, samples)
    failures = sum(load.errors.total() for load in loads)
    print(f"# failed calls: {failures}")


def report(
    shapes: list[Shape], names: tuple[str, str], samples: dict[tuple[str, str], list[Sample]]
) -> None:
    print()
    print("| load | server | img/s | CPU-ms per image |")
    print("|---|---|---|---|")
    for shape in shapes:
        for name in names:
            runs = samples[shape.key, name]
            rates = median_range([s.rate for s in runs], 0)
            cpu = median_range([s.server_ms for s in runs])
            print(f"| {shape.label} | {name} | {rates} | {cpu} |")
    print()
    print("| load | img/s, many / one | CPU-ms per image, many / one |")
    print("|---|---|---|")
    for shape in shapes:
        one, many = samples[shape.key, names[0]], samples[shape.key, names[1]]
        rate = median_range([b.rate / a.rate for a, b in zip(one, many, strict=True)])
        cpu = median_range([b.server_ms / a.server_ms for a, b in zip(one, many, strict=True)])
        print(f"| {shape.label} | {rate} | {cpu} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--ramp", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=32, help="1-image calls in flight")
    parser.add_argument("--clients-16", type=int, default=4, help="16-image calls in flight")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--gpu-ms-per-image", type=float, default=0.0)
    parser.add_argument("--policies", type=Path, default=REPO_ROOT / "policies")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
