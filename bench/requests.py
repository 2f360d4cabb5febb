"""Hostile requests against a real server: how long a refusal takes, and what it costs in memory.

    .venv/bin/python bench/requests.py [--rounds 5]

Starts `moderator serve --demo` on a free port and sends, in alternating rounds, an ordinary
one-image Moderate request (the baseline) and each attack: a gzip bomb, tens of millions of
empty images, a flood of unknown fields, ScoreEmbeddings requests of tens of millions of empty
images or views, and a request one image over the count limit. Prints the median time of each
(and its ratio to the baseline of the same rounds), its status, and the server's peak resident
memory (VmHWM) before and after all the attacks.
"""

from __future__ import annotations

import argparse
import functools
import io
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from moderator_client.v1 import moderator_pb2 as pb

from moderator.demo.shapes import render_shape

# This benchmark sends the same images again and again: with the cache for repeated uploads
# on, all but the first would be hits that skip the decode and the model they measure.
NO_IMAGE_CACHE = ("--image-cache-mb", "0")

MIB = 1024 * 1024
MODERATE = "/moderator.v1.Moderator/Moderate"
SCORE = "/moderator.v1.Moderator/ScoreEmbeddings"
FLOOD_BYTES = 80 * MIB  # under the default 81 MiB message limit


@dataclass(frozen=True)
class Attack:
    name: str
    method: str
    payload: bytes
    compression: grpc.Compression | None = None


def length_delimited(field: int, payload: bytes) -> bytes:
    return bytes([field << 3 | 2]) + varint(len(payload)) + payload


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def attacks() -> list[Attack]:
    empty = b"\x0a\x00"  # field 1, length 0
    unknown = b"\x78\x00"  # field 15, varint 0
    over = pb.ModerateRequest(images=[pb.Image(id=str(i), data=b"x") for i in range(257)])
    one_big = pb.ModerateRequest(images=[pb.Image(id="big", data=b"x" * (FLOOD_BYTES - 64))])
    return [
        # not an attack: what moving 80 MiB costs (one image over --max-image-mb, answered OK
        # with its per-image error), to compare the refusals with
        Attack("80 MiB accepted (one oversized image)", MODERATE, one_big.SerializeToString()),
        Attack(
            "gzip bomb (80 MiB of empty images)",
            MODERATE,
            empty * (FLOOD_BYTES // 2),
            grpc.Compression.Gzip,
        ),
        Attack("40 M empty images", MODERATE, empty * (FLOOD_BYTES // 2)),
        Attack("40 M unknown fields", MODERATE, unknown * (FLOOD_BYTES // 2)),
        Attack("257 images of 1 byte", MODERATE, over.SerializeToString()),
        Attack("ScoreEmbeddings, 40 M empty images", SCORE, empty * (FLOOD_BYTES // 2)),
        Attack(
            "ScoreEmbeddings, one image of 40 M empty views",
            SCORE,
            length_delimited(1, b"\x1a\x00" * (FLOOD_BYTES // 2 - 8)),
        ),
    ]


def start_server(workdir: Path) -> tuple[subprocess.Popen[str], int]:
    command = [
        sys.executable, "-m", "moderator", "serve", "--demo", "--host", "127.0.0.1",
        "--port", "0", "--metrics-port", "-1", "--cache-dir", str(workdir / "cache"),
        "--policy-poll-seconds", "0", "--drain-seconds", "0", *NO_IMAGE_CACHE,
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        if match := re.search(r"SERVING on port (\d+)", line):
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, int(match.group(1))
    raise SystemExit("the server did not start")


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def send(channel: grpc.Channel, attack: Attack) -> object:
    call = channel.unary_unary(attack.method, request_serializer=None, response_deserializer=None)
    return call(attack.payload, timeout=120, compression=attack.compression)


def timed(call: Callable[[], object]) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        call()
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
    return time.perf_counter() - started, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    process, port = start_server(Path(tempfile.mkdtemp()))
    try:
        run(f"127.0.0.1:{port}", process.pid, args.rounds)
    finally:
        process.terminate()
        process.wait(60)


def run(address: str, pid: int, rounds: int) -> None:
    image = render_shape("red", "circle", 160, 160)
    encoded = io.BytesIO()
    image.save(encoded, "PNG")
    ordinary = pb.ModerateRequest(images=[pb.Image(id="red", data=encoded.getvalue())])
    cases = attacks()
    with grpc.insecure_channel(address) as channel:
        moderate = channel.unary_unary(
            MODERATE, request_serializer=None, response_deserializer=None
        )
        for _ in range(3):  # warm up
            moderate(ordinary.SerializeToString(), timeout=60)
        peak_before = peak_rss_mib(pid)
        baseline: list[float] = []
        times: dict[str, list[float]] = {case.name: [] for case in cases}
        ratios: dict[str, list[float]] = {case.name: [] for case in cases}
        codes: dict[str, str] = {}
        for _ in range(rounds):
            for case in cases:
                base, _code = timed(lambda: moderate(ordinary.SerializeToString(), timeout=60))
                took, codes[case.name] = timed(functools.partial(send, channel, case))
                baseline.append(base)
                times[case.name].append(took)
                ratios[case.name].append(took / base)
        peak_after = peak_rss_mib(pid)
    print(f"ordinary 1-image Moderate: median {statistics.median(baseline) * 1000:.1f} ms")
    print(f"{'attack':50} {'status':20} {'median ms':>10} {'x ordinary':>11}")
    for case in cases:
        print(
            f"{case.name:50} {codes[case.name]:20} "
            f"{statistics.median(times[case.name]) * 1000:10.1f} "
            f"{statistics.median(ratios[case.name]):11.2f}"
        )
    print(f"server peak RSS: {peak_before:.0f} MiB before the attacks, {peak_after:.0f} MiB after")
    print(
        f"(each attack message is {FLOOD_BYTES // MIB} MiB on the client; cpu flags: {cpu_flags()})"
    )


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0].split()
    wanted = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")
    return ", ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


if __name__ == "__main__":
    main()
