"""Rescoring stored embeddings against moderating the images again, in one run.

    .venv/bin/python bench/rescore.py [--precision auto|fp32|bf16] [--seconds 10]

Serves ViT-B-32 with random weights (same compute as the pretrained model) and the default
policies. The baseline is `Moderate` on 16-image requests of photo-like JPEGs; against it:
`ScoreEmbeddings` over gRPC, and the pieces of `moderator rescore` (reading the JSON lines file,
scoring with 6 and with 1000 x 10 policies). Nothing here is a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import grpc
import torch
from moderator_client import format_json
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from throughput import (
    photo_like_jpeg,
    random_model,
    server_process,
    service_command,
    synthetic_policies,
    timed,
)

from moderator.config import REPO_ROOT, ImageConfig
from moderator.core.embeddings import EmbeddingCache, build_policy_index
from moderator.core.policies import build_policy_set, load_policy_dir
from moderator.core.rescoring import EmbeddedImage, embedded_image, rescore_images
from moderator.tools.embeddings_file import read_embeddings_file

STORED = 4096  # one ScoreEmbeddings request at the default limit
MIB = 1024 * 1024


async def moderate_rate(port: int, images: list[bytes], clients: int, seconds: float) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ModeratorStub(channel)
        request = pb.ModerateRequest(
            images=[pb.Image(id=str(i), data=d) for i, d in enumerate(images)]
        )
        await stub.Moderate(request, timeout=600)
        done = 0
        stop_at = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await stub.Moderate(request, timeout=600)
                done += len(images)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done / (time.perf_counter() - start)


async def stored_results(port: int, images: list[bytes]) -> pb.ModerateResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ModeratorStub(channel)
        request = pb.ModerateRequest(
            images=[pb.Image(id=str(i), data=d) for i, d in enumerate(images)],
            include_embeddings=True,
        )
        response: pb.ModerateResponse = await stub.Moderate(request, timeout=600)
        return response


def replicate(response: pb.ModerateResponse, count: int) -> list[pb.ImageResult]:
    """`count` distinct stored results: the real embeddings, slightly perturbed."""
    generator = torch.Generator().manual_seed(0)
    results = []
    for i in range(count):
        source = response.results[i % len(response.results)]
        vector = torch.tensor(list(source.embedding))
        vector = torch.nn.functional.normalize(
            vector + 0.05 * torch.randn(vector.shape, generator=generator), dim=0
        )
        result = pb.ImageResult()
        result.CopyFrom(source)
        result.id = f"stored-{i}"
        del result.embedding[:]
        result.embedding.extend(vector.tolist())
        results.append(result)
    return results


async def score_embeddings_rate(
    port: int, stored: list[pb.ImageResult], model: str, seconds: float
) -> float:
    options = [("grpc.max_send_message_length", 128 * MIB)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.ModeratorStub(channel)
        request = pb.ScoreEmbeddingsRequest(
            images=[pb.EmbeddedImage(id=r.id, embedding=r.embedding) for r in stored],
            model=model,
        )
        await stub.ScoreEmbeddings(request, timeout=600)
        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            await stub.ScoreEmbeddings(request, timeout=600)
            done += len(stored)
        return done / (time.perf_counter() - start)


async def moderate_latency(
    port: int,
    image: bytes,
    count: int,
    rescoring: pb.ScoreEmbeddingsRequest | None,
    pause: float = 0.0,
) -> float:
    """p50 seconds of one-image Moderate calls, alone or while a client sends ScoreEmbeddings
    requests back to back, `pause` seconds apart."""
    options = [("grpc.max_send_message_length", 128 * MIB)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.ModeratorStub(channel)
        request = pb.ModerateRequest(images=[pb.Image(id="a", data=image)])
        await stub.Moderate(request, timeout=600)
        stop = asyncio.Event()

        async def rescore_nonstop() -> None:
            while rescoring is not None and not stop.is_set():
                await stub.ScoreEmbeddings(rescoring, timeout=600)
                await asyncio.sleep(pause)

        background = asyncio.ensure_future(rescore_nonstop())
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            await stub.Moderate(request, timeout=600)
            latencies.append(time.perf_counter() - start)
        stop.set()
        await background
        return sorted(latencies)[len(latencies) // 2]


def offline_rate(images: list[EmbeddedImage], policy_count: int, seconds: float) -> float:
    """Stored embeddings per second through rescore_images (scoring + results)."""
    dim = len(images[0].views[0])
    policies = (
        load_policy_dir(REPO_ROOT / "policies").policies
        if policy_count == 0
        else synthetic_policies(policy_count, 10)
    )
    policy_set = build_policy_set(policies)
    index = build_policy_index(
        policy_set,
        lambda texts: torch.nn.functional.normalize(torch.randn(len(texts), dim), dim=-1),
        EmbeddingCache(None, "bench"),
        torch.device("cpu"),
    )
    max_views = ImageConfig().max_views
    per_call = timed(lambda: rescore_images(images, index, None, max_views), seconds)
    return len(images) / per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", default="auto", help="auto, fp32 or bf16")
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    args = parser.parse_args()

    precision = random_model(args.precision).info.precision
    print(f"# ViT-B-32, random weights, {precision}, {torch.get_num_threads()} torch threads")
    photos = [photo_like_jpeg(640, 480, seed) for seed in range(16)]
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        with server_process(service_command(precision, tmp, [])) as port:
            baseline = asyncio.run(moderate_rate(port, photos, 2, args.seconds))
            rows.append(("Moderate, 16 photos (640x480) per request (baseline)", baseline, "img/s"))
            response = asyncio.run(stored_results(port, photos))
            stored = replicate(response, STORED)
            rpc = asyncio.run(score_embeddings_rate(port, stored, response.model, args.seconds))
            rows.append((f"ScoreEmbeddings, {STORED} per request, 6 policies", rpc, "emb/s"))
            rescoring = pb.ScoreEmbeddingsRequest(
                images=[pb.EmbeddedImage(id=r.id, embedding=r.embedding) for r in stored],
                model=response.model,
            )
            alone = asyncio.run(moderate_latency(port, photos[0], 40, None))
            during = asyncio.run(moderate_latency(port, photos[0], 40, rescoring))
            paced = asyncio.run(moderate_latency(port, photos[0], 40, rescoring, pause=1.0))
        path = Path(tmp) / "stored.jsonl"
        context = (response.policy_version, response.model, response.precision)
        lines = [format_json(r, *context) for r in stored]
        path.write_text("\n".join(lines) + "\n")
        per_read = timed(lambda: list(read_embeddings_file(path)), args.seconds / 2)
        rows.append(("rescore: read the JSON lines file", STORED / per_read, "emb/s"))
        size = path.stat().st_size / STORED
    images = [embedded_image(r.id, list(r.embedding)) for r in stored]
    rows.append(("rescore: score + outcomes, 6 policies", offline_rate(images, 0, 3), "emb/s"))
    rows.append(
        ("rescore: score + outcomes, 1000 x 10 policies", offline_rate(images, 1000, 3), "emb/s")
    )
    width = max(len(name) for name, _, _ in rows)
    print(f"{'':{width}}  {'rate':>10}  vs baseline")
    for name, value, unit in rows:
        print(f"{name:{width}}  {value:>10.0f} {unit:6}  {value / baseline:8.1f}x")
    print(f"JSON lines file: {size / 1024:.1f} KiB per stored image (512 floats + results)")
    print(
        f"one-image Moderate p50: {alone * 1000:.1f} ms alone, {during * 1000:.1f} ms while "
        f"ScoreEmbeddings runs nonstop ({during / alone:.2f} x), {paced * 1000:.1f} ms with "
        f"1 s between ScoreEmbeddings requests ({paced / alone:.2f} x)"
    )


if __name__ == "__main__":
    main()
