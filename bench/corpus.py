"""Every file of an image corpus, one per request, against the demo server: each must get a
per-image result (never a request failure), and the slowest are listed.

    .venv/bin/python bench/corpus.py DIR [--target HOST:PORT] [SERVER FLAGS]

Pillow's own test images are a good hostile corpus (every format and many broken files):
`pip download pillow --no-binary :all: --no-deps` and unpack `Tests/images`. Without --target
the demo server is started as bench/soak.py starts it. Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from soak import server_process, tree_rss

MAX_FILE_BYTES = 64 * 1024 * 1024


def run(target: str, files: list[Path], pid: int | None) -> int:
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    timings: list[tuple[float, str, str]] = []
    rss_start = tree_rss(pid)
    options = [("grpc.max_send_message_length", MAX_FILE_BYTES)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.ModeratorStub(channel)
        for path in files:
            request = pb.ModerateRequest(images=[pb.Image(id=path.name, data=path.read_bytes())])
            started = time.perf_counter()
            try:
                (result,) = stub.Moderate(request, timeout=120).results
            except grpc.RpcError as exc:
                failures.append(f"{path}: {exc.code().name} {exc.details()}")
                continue
            seconds = time.perf_counter() - started
            code = result.error.code
            outcome = pb.ImageErrorCode.Name(code) if code else pb.Decision.Name(result.decision)
            outcomes[outcome] += 1
            timings.append((seconds, str(path), outcome))
    rss_end = tree_rss(pid)
    timings.sort(reverse=True)
    print(
        f"# {len(files)} files, {len(timings)} per-image results, {len(failures)} failed requests"
    )
    for outcome, count in outcomes.most_common():
        print(f"   {outcome}: {count}")
    print(
        f"# slowest (the budget is --decode-timeout-ms; over 2 s: {sum(t > 2 for t, *_ in timings)})"
    )
    for seconds, name, outcome in timings[:8]:
        print(f"   {seconds * 1000:8.0f} ms  {outcome:40s} {name}")
    for failure in failures:
        print(f"FAILED {failure}")
    if rss_start and rss_end:
        print(f"# server RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--target", help="HOST:PORT of a running server")
    args, server_flags = parser.parse_known_args()
    files = sorted(
        p for p in args.directory.rglob("*") if p.is_file() and p.stat().st_size <= MAX_FILE_BYTES
    )
    if args.target:
        sys.exit(run(args.target, files, None))
    with server_process(server_flags) as (port, pid):
        code = run(f"127.0.0.1:{port}", files, pid)
    sys.exit(code)


if __name__ == "__main__":
    main()
