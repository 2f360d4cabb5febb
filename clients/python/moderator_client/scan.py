"""`moderator-scan`: moderate a folder (a backlog, last month's uploads) with a running server.

    moderator-scan PATH... --server HOST:PORT --out results.jsonl [--resume] [--concurrency N]
        [--batch N] [--policy ID]... [--embeddings]

Folders are walked for image files (PATH `-` reads file names from stdin, one per line). Batches
go to the server concurrently; each image's result is one JSON line in --out (the line
`moderator check --json` prints and `moderator rescore` reads), written and flushed as its
batch comes back, so a crash loses at most the batches in flight. --resume skips every image
already in --out. A busy server (RESOURCE_EXHAUSTED, UNAVAILABLE after the client's own
retries) is waited for with backoff, never given up on. Ctrl-C finishes the batches in flight
and stops; a second Ctrl-C stops at once. Exit status: 0, 1 when any image could not be
moderated, 2 for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc

from moderator_client.client import AsyncModeratorClient, bearer, credentials
from moderator_client.progress import Progress
from moderator_client.results import ModerateResult

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mpo"}
)
BUSY = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
LONGEST_BACKOFF_SECONDS = 30.0
DEADLINE_TRIES = 3
EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moderator-scan", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="image files, folders, or - for names on stdin")
    parser.add_argument("--server", default=os.environ.get("MODERATOR_SERVER", "localhost:50051"))
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per image")
    parser.add_argument("--resume", action="store_true", help="skip images already in --out")
    parser.add_argument("--concurrency", type=int, default=4, help="batches in flight")
    parser.add_argument("--batch", type=int, default=16, help="images per request")
    parser.add_argument("--batch-mb", type=float, default=16.0, help="bytes per request, MiB")
    parser.add_argument("--max-image-mb", type=float, default=64.0, help="larger files: error")
    parser.add_argument("--policy", action="append", default=[], help="only this policy id")
    parser.add_argument("--embeddings", action="store_true", help="store image embeddings")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--token-file", type=Path, default=os.environ.get("MODERATOR_TOKEN_FILE"))
    parser.add_argument("--tls-ca", type=Path, help="verify the server against this PEM CA")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="client key (mutual TLS)")
    parser.add_argument("--progress-seconds", type=float, default=10.0, help="without a terminal")
    args = parser.parse_args(argv)
    for name in ("concurrency", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def image_files(paths: Sequence[str]) -> Iterator[Path]:
    """Files named, and image files under folders named (sorted, so runs agree), once each."""
    seen: set[Path] = set()
    for name in paths:
        names = (line.strip() for line in sys.stdin) if name == "-" else (name,)
        for entry in names:
            if not entry:
                continue
            path = Path(entry)
            found = _walk(path) if path.is_dir() else iter((path,))
            for file in found:
                if file not in seen:
                    seen.add(file)
                    yield file


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(root) / name


def done_ids(out: Path) -> set[str]:
    """Ids already in `out`. A last line cut short by a crash is cut off the file."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with out.open("r+b") as file:
            file.truncate(end)
    ids = set()
    for line in data[:end].splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            continue
    return ids


class Scan:
    """Batches through the server, results into the output, counts into the progress line."""

    def __init__(self, args: argparse.Namespace, files: list[Path], progress: Progress) -> None:
        self.args = args
        self.files = files
        self.progress = progress
        self.stopping = asyncio.Event()
        self._out = args.out.open("a", encoding="utf-8")

    def batches(self) -> Iterator[list[tuple[str, bytes]]]:
        batch: list[tuple[str, bytes]] = []
        size = 0
        limit, largest = self.args.batch_mb * 2**20, self.args.max_image_mb * 2**20
        for path in self.files:
            if self.stopping.is_set():
                return
            data = self._read(path, largest)
            if data is None:
                continue
            if batch and (len(batch) >= self.args.batch or size + len(data) > limit):
                yield batch
                batch, size = [], 0
            batch.append((str(path), data))
            size += len(data)
        if batch:
            yield batch

    def _read(self, path: Path, largest: float) -> bytes | None:
        try:
            if path.stat().st_size > largest:
                self.progress.failed("too_large_to_send")
                return None
            return path.read_bytes()
        except OSError:
            self.progress.failed("unreadable")
            return None

    async def run(self, client: AsyncModeratorClient) -> None:
        batches = self.batches()
        await asyncio.gather(*(self._sender(client, batches) for _ in range(self.args.concurrency)))
        self._out.close()

    async def _sender(
        self, client: AsyncModeratorClient, batches: Iterator[list[tuple[str, bytes]]]
    ) -> None:
        for batch in batches:  # one generator, shared: each batch goes to one sender
            answer = await self._moderate(client, batch)
            if answer is not None:
                self._write(answer)
            if self.stopping.is_set():
                return

    async def _moderate(
        self, client: AsyncModeratorClient, batch: list[tuple[str, bytes]]
    ) -> ModerateResult | None:
        wait, deadline_tries = 1.0, 0
        while True:
            try:
                return await client.moderate(
                    batch,
                    self.args.policy,
                    include_embeddings=self.args.embeddings,
                    timeout=self.args.timeout,
                )
            except grpc.RpcError as exc:
                code = exc.code()
                deadline_tries += code == grpc.StatusCode.DEADLINE_EXCEEDED
                retry = code in BUSY or (
                    code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline_tries < DEADLINE_TRIES
                )
                if not retry or self.stopping.is_set():
                    self.progress.failed(code.name.lower(), len(batch))
                    return None
                self.progress.note(f"server busy ({code.name}): waiting {wait:.0f} s")
                await asyncio.sleep(wait * random.uniform(0.5, 1.0))
                wait = min(2 * wait, LONGEST_BACKOFF_SECONDS)

    def _write(self, answer: ModerateResult) -> None:
        self._out.write("".join(line + "\n" for line in answer.json_lines()))
        self._out.flush()
        for result in answer.results:
            self.progress.decided(result.decision, result.error.code if result.error else None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists() and args.out.stat().st_size and not args.resume:
        print(
            f"moderator-scan: {args.out} exists: --resume to go on, or remove it", file=sys.stderr
        )
        return EXIT_USAGE
    skip = done_ids(args.out) if args.resume else set()
    files = [path for path in image_files(args.paths) if str(path) not in skip]
    progress = Progress(len(files), sys.stderr, args.progress_seconds, skipped=len(skip))
    try:
        token = args.token_file.read_text().strip() if args.token_file else None
        token = token or os.environ.get("MODERATOR_TOKEN")
        ca, cert, key = (
            p.read_bytes() if p else None for p in (args.tls_ca, args.tls_cert, args.tls_key)
        )
        # the client's own checks, now: bad credentials are an argument error, before any work
        bearer(token)
        credentials(ca, cert, key)
    except (OSError, ValueError) as exc:
        print(f"moderator-scan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    connect = functools.partial(
        AsyncModeratorClient,
        args.server,
        tls_ca=ca,
        tls_cert=cert,
        tls_key=key,
        token=token,
        timeout=args.timeout,
    )
    interrupted = asyncio.run(_scan(args, files, progress, connect))
    progress.summary()
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_ERRORS if progress.errors else EXIT_OK


async def _scan(
    args: argparse.Namespace,
    files: list[Path],
    progress: Progress,
    connect: Callable[[], AsyncModeratorClient],
) -> bool:
    """Run the scan; True if it was interrupted."""
    client = connect()  # in the loop: a grpc.aio channel belongs to the loop it was made in
    scan = Scan(args, files, progress)
    running = asyncio.ensure_future(scan.run(client))
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        if scan.stopping.is_set():
            running.cancel()  # the second Ctrl-C: now
            return
        scan.stopping.set()
        progress.note("interrupted: finishing the batches in flight (Ctrl-C again to stop now)")

    loop.add_signal_handler(signal.SIGINT, interrupt)
    loop.add_signal_handler(signal.SIGTERM, interrupt)
    ticker = asyncio.ensure_future(progress.tick_until(running))
    try:
        await running
    except asyncio.CancelledError:
        pass
    finally:
        ticker.cancel()
        await client.close()
    return scan.stopping.is_set()


if __name__ == "__main__":
    sys.exit(main())
