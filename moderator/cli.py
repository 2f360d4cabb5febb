"""Command line: argv + MODERATOR_* environment -> Config -> run. The only place that reads env.

moderator serve [--demo] [--policies DIR] [--model NAME] [--pretrained TAG|PATH|none] ...
moderator check [--server HOST:PORT] [--json] [--embeddings] FILE...
moderator policies validate DIR
moderator policies test POLICY_DIR EXAMPLES_DIR
moderator calibrate POLICY_DIR LABELS [--target-precision P | --target-recall R] [--report F]
moderator rescore EMBEDDINGS --policies DIR [--baseline DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import grpc

from moderator.config import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    DEMO_POLICIES_DIR,
    MIB,
    BatchConfig,
    Config,
    ImageConfig,
    ModelConfig,
    ServerConfig,
    default_cache_dir,
    demo_model_config,
)
from moderator.errors import ConfigError, ModeratorError, PolicyError
from moderator.files import replaced_atomically
from moderator.policies import load_policy_dir

if TYPE_CHECKING:
    from moderator.calibration import Calibration
    from moderator.clip import ClipModel
    from moderator.embeddings import EmbeddingCache
    from moderator.offline import OfflineScorer
    from moderator.rescoring import ChangeSummary, StoredChunk, Verdict

log = logging.getLogger("moderator")

ENV_PREFIX = "MODERATOR_"
CHECK_BATCH_SIZE = 16
INVALID_LISTED = 10
DEFAULT_TARGET_PRECISION = 0.9
TRUE_WORDS = ("1", "true", "yes", "on")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def env_name(flag: str) -> str:
    """--max-wait-ms -> MODERATOR_MAX_WAIT_MS"""
    return ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()


@dataclass(frozen=True)
class Option:
    flag: str
    kind: Callable[[str], Any]
    default: Any
    help: str

    @property
    def env(self) -> str:
        return env_name(self.flag)


MODEL_OPTIONS = (
    Option("--model", str, DEFAULT_MODEL, "open_clip model name, or hf-hub:ORG/REPO"),
    Option(
        "--pretrained",
        str,
        DEFAULT_PRETRAINED,
        "open_clip pretrained tag, checkpoint PATH, or none",
    ),
    Option("--device", str, "auto", "auto, cpu, cuda or cuda:N"),
    Option("--precision", str, "auto", "auto, fp32, bf16 or fp16 (auto: bf16 where fast)"),
    Option(
        "--cache-dir", Path, None, "text-embedding cache directory (default: ~/.cache/moderator)"
    ),
)
SERVE_OPTIONS = (
    Option(
        "--policies",
        Path,
        None,
        "policy directory (default: ./policies, or policies/demo with --demo)",
    ),
    Option("--policy-poll-seconds", float, 5.0, "check the policy directory this often (0: off)"),
    Option("--host", str, ServerConfig.host, "address to listen on"),
    Option("--port", int, ServerConfig.port, "gRPC port (0 picks a free one)"),
    Option(
        "--metrics-port", int, ServerConfig.metrics_port, "Prometheus port (0: free port, -1: off)"
    ),
    Option("--max-batch-size", int, BatchConfig.max_batch_size, "image views per forward pass"),
    Option("--max-wait-ms", float, BatchConfig.max_wait_ms, "longest wait to fill a batch"),
    Option(
        "--max-queue-images",
        int,
        BatchConfig.max_queue_images,
        "images in flight before RESOURCE_EXHAUSTED",
    ),
    Option("--decode-threads", int, BatchConfig.decode_threads, "image decoding threads"),
    Option(
        "--max-images-per-request", int, ServerConfig.max_images_per_request, "images per request"
    ),
    Option(
        "--max-embeddings-per-request",
        int,
        ServerConfig.max_embeddings_per_request,
        "stored embeddings per ScoreEmbeddings request",
    ),
    Option(
        "--max-rescore-requests",
        int,
        ServerConfig.max_rescore_requests,
        "ScoreEmbeddings requests admitted at once (0 turns the RPC off)",
    ),
    Option(
        "--max-message-mb", int, ServerConfig.max_message_bytes // MIB, "largest gRPC message, MiB"
    ),
    Option("--max-image-mb", float, ImageConfig.max_bytes / MIB, "largest image, MiB"),
    Option("--max-image-pixels", int, ImageConfig.max_pixels, "largest image, width x height"),
    Option("--log-level", str.upper, "INFO", "DEBUG, INFO, WARNING or ERROR"),
)
MODEL_SWITCHES = (
    ("--demo", "use the bundled demo model (and policies/demo when serving); no network needed"),
    ("--allow-random-weights", "allow --pretrained none (random weights; benchmarks only)"),
)


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moderator", description="Image moderation with CLIP.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC service")
    add_options(serve, (*MODEL_OPTIONS, *SERVE_OPTIONS), env)

    check = commands.add_parser("check", help="moderate image files with a running server")
    check.add_argument("files", nargs="+", type=Path)
    check.add_argument("--server", default=env.get(env_name("--server"), "localhost:50051"))
    check.add_argument("--json", action="store_true", help="print one JSON object per image")
    check.add_argument(
        "--embeddings",
        action="store_true",
        help="include image embeddings (implies --json): the file `moderator rescore` reads",
    )
    check.add_argument(
        "--policy", action="append", default=[], help="only this policy id (repeatable)"
    )
    check.add_argument("--timeout", type=float, default=60.0, help="seconds per request")

    policies = commands.add_parser("policies", help="work with policy files")
    policy_commands = policies.add_subparsers(dest="policy_command", required=True)
    validate = policy_commands.add_parser("validate", help="check every policy file in DIR")
    validate.add_argument("directory", type=Path)
    test = policy_commands.add_parser(
        "test", help="check regression examples: EXAMPLES_DIR/<policy>/{violating,benign}/*"
    )
    test.add_argument("policies_dir", type=Path, metavar="POLICY_DIR")
    test.add_argument("examples_dir", type=Path, metavar="EXAMPLES_DIR")
    add_options(test, MODEL_OPTIONS, env)

    calibrate = commands.add_parser(
        "calibrate", help="precision/recall per policy from labelled images; suggest thresholds"
    )
    calibrate.add_argument("policies_dir", type=Path, metavar="POLICY_DIR")
    calibrate.add_argument(
        "labels",
        type=Path,
        metavar="LABELS",
        help="CSV of path,policy_id,label (violating|benign), or a folder laid out like "
        "EXAMPLES_DIR",
    )
    target = calibrate.add_mutually_exclusive_group()
    target.add_argument(
        "--target-precision",
        type=float,
        help=f"suggest the highest-recall threshold with this precision "
        f"(default {DEFAULT_TARGET_PRECISION})",
    )
    target.add_argument(
        "--target-recall",
        type=float,
        help="suggest the highest-precision threshold with this recall",
    )
    calibrate.add_argument("--report", type=Path, help="write an HTML report (charts) here")
    calibrate.add_argument(
        "--write",
        action="store_true",
        help="write the suggested thresholds into the policy files (comments are kept)",
    )
    calibrate.add_argument(
        "--force",
        action="store_true",
        help="with --write, also write thresholds calibrated on fewer than 20 images of a kind",
    )
    add_options(calibrate, MODEL_OPTIONS, env)

    rescore = commands.add_parser(
        "rescore",
        help="score stored embeddings (from `check --embeddings`) against a policy set",
    )
    rescore.add_argument("embeddings", type=Path, metavar="EMBEDDINGS", help="JSON lines file")
    rescore.add_argument("--policies", type=Path, required=True, help="the policy set to try")
    rescore.add_argument(
        "--baseline",
        type=Path,
        help="compare with this policy set rescored (default: the results stored in the file)",
    )
    rescore.add_argument("--out", type=Path, help="write every new result here as JSON lines")
    add_options(rescore, MODEL_OPTIONS, env)
    return parser


def add_options(
    parser: argparse.ArgumentParser, options: Sequence[Option], env: Mapping[str, str]
) -> None:
    """Flags with defaults from MODERATOR_* variables, plus the model switches."""
    for option in options:
        # argparse converts a string default with `type`, so a bad value gets a clean usage error
        default = env.get(option.env, option.default)
        parser.add_argument(
            option.flag, type=option.kind, default=default, help=f"{option.help} [{option.env}]"
        )
    for flag, text in MODEL_SWITCHES:
        variable = env_name(flag)
        default = env.get(variable, "").lower() in TRUE_WORDS
        parser.add_argument(flag, action="store_true", default=default, help=f"{text} [{variable}]")


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    if args.demo:
        return demo_model_config(args.device, args.precision)
    return ModelConfig(
        name=args.model,
        pretrained=None if str(args.pretrained).lower() == "none" else args.pretrained,
        device=args.device,
        precision=args.precision,
        allow_random_weights=args.allow_random_weights,
    )


def config_from_args(args: argparse.Namespace) -> Config:
    default_policies = DEMO_POLICIES_DIR if args.demo else Path("policies")
    return Config(
        policies_dir=args.policies or default_policies,
        policy_poll_seconds=args.policy_poll_seconds,
        embedding_cache_dir=args.cache_dir or default_cache_dir(),
        model=model_config_from_args(args),
        images=ImageConfig(
            max_bytes=int(args.max_image_mb * MIB), max_pixels=args.max_image_pixels
        ),
        batching=BatchConfig(
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_queue_images=args.max_queue_images,
            decode_threads=args.decode_threads,
        ),
        server=ServerConfig(
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            max_message_bytes=args.max_message_mb * MIB,
            max_images_per_request=args.max_images_per_request,
            max_embeddings_per_request=args.max_embeddings_per_request,
            max_rescore_requests=args.max_rescore_requests,
        ),
    )


def validate_config(config: Config) -> None:
    batching = config.batching
    if batching.max_batch_size < 1 or batching.decode_threads < 1:
        raise ConfigError("--max-batch-size and --decode-threads must be at least 1")
    for flag, value in (
        ("--max-images-per-request", config.server.max_images_per_request),
        ("--max-embeddings-per-request", config.server.max_embeddings_per_request),
        ("--max-image-pixels", config.images.max_pixels),
        ("--max-message-mb", config.server.max_message_bytes),
        ("--max-image-mb", config.images.max_bytes),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be positive")
    if config.server.max_rescore_requests < 0:
        raise ConfigError("--max-rescore-requests must not be negative (0 turns it off)")
    if config.policy_poll_seconds < 0:
        raise ConfigError("--policy-poll-seconds must not be negative (0 turns watching off)")
    if batching.max_wait_ms < 0:
        raise ConfigError("--max-wait-ms must not be negative")
    if batching.max_queue_images < config.server.max_images_per_request:
        raise ConfigError("--max-queue-images must be at least --max-images-per-request")


def run_serve(args: argparse.Namespace) -> int:
    from moderator.server import serve

    config = config_from_args(args)
    validate_config(config)
    asyncio.run(serve(config))
    return 0


def run_policies(args: argparse.Namespace) -> int:
    return run_policy_tests(args) if args.policy_command == "test" else run_validate(args)


def run_validate(args: argparse.Namespace) -> int:
    try:
        policy_set = load_policy_dir(args.directory)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{len(exc.problems)} problem(s) in {args.directory}")
        return 1
    disabled = f", {len(policy_set.disabled)} disabled" if policy_set.disabled else ""
    print(
        f"ok: {len(policy_set.policies)} active policies{disabled} in {args.directory} "
        f"(version {policy_set.version})"
    )
    return 0


def load_model(args: argparse.Namespace) -> tuple[ClipModel, EmbeddingCache]:
    """The model named by the model options, and its text-embedding cache (offline tools)."""
    from moderator.clip import TEXT_PRECISION, load_clip
    from moderator.embeddings import EmbeddingCache

    clip = load_clip(model_config_from_args(args))
    cache = EmbeddingCache.for_model(
        args.cache_dir or default_cache_dir(), clip.info.weights_key, TEXT_PRECISION
    )
    return clip, cache


def run_policy_tests(args: argparse.Namespace) -> int:
    from moderator.offline import OfflineScorer
    from moderator.regression import discover_examples, format_table, run_examples

    policy_set = load_policy_dir(args.policies_dir)
    examples, skipped = discover_examples(args.examples_dir, policy_set)
    clip, cache = load_model(args)
    results = run_examples(OfflineScorer(clip, policy_set, cache), examples)
    print(format_table(results, args.examples_dir))
    if skipped:
        print(f"skipped examples of disabled policies: {', '.join(skipped)}")
    return 0 if all(r.passed for r in results) else 1


def run_calibrate(args: argparse.Namespace) -> int:
    from moderator.calibration import Target, calibrate, format_calibration, read_labels_csv
    from moderator.offline import OfflineScorer
    from moderator.regression import discover_examples
    from moderator.report import render_report

    target, value = (
        (Target.RECALL, args.target_recall)
        if args.target_recall is not None
        else (
            Target.PRECISION,
            DEFAULT_TARGET_PRECISION if args.target_precision is None else args.target_precision,
        )
    )
    if not 0 < value <= 1:
        raise ConfigError(f"--target-{target.value} must be in (0, 1], got {value}")
    policy_set = load_policy_dir(args.policies_dir)
    if args.labels.is_dir():
        examples, skipped = discover_examples(args.labels, policy_set)
        if skipped:
            print(f"skipped labelled images of disabled policies: {', '.join(skipped)}")
    else:
        examples = read_labels_csv(args.labels, policy_set)
    clip, cache = load_model(args)
    calibration = calibrate(OfflineScorer(clip, policy_set, cache), examples, target, value)
    print(format_calibration(calibration))
    try:
        if args.report:
            args.report.write_text(render_report(calibration, args.report), encoding="utf-8")
            print(f"report: {args.report}")
        if args.write:
            write_suggestions(args.policies_dir, calibration, force=args.force)
    except OSError as exc:
        raise ConfigError(f"cannot write: {exc}") from exc
    return 0


def write_suggestions(directory: Path, calibration: Calibration, force: bool) -> None:
    from moderator.policies import format_threshold, write_thresholds

    changes: dict[str, tuple[float, float]] = {}
    for result in calibration.policies:
        if result.suggested is None or result.suggested.threshold == result.current.threshold:
            continue
        if result.few_examples and not force:
            print(f"{result.policy_id}: not written, too few labelled images (--force writes it)")
            continue
        changes[result.policy_id] = (result.current.threshold, result.suggested.threshold)
    written = write_thresholds(directory, {pid: new for pid, (_, new) in changes.items()})
    for policy_id, path in written.items():
        old, new = changes[policy_id]
        print(f"{path}: threshold {format_threshold(old)} -> {format_threshold(new)}")


def run_rescore(args: argparse.Namespace) -> int:
    """Rescore the file chunk by chunk; print what changed. Exit 1 if any line or embedding
    could not be used (after reporting it), 0 otherwise."""
    from moderator.offline import OfflineScorer
    from moderator.rescoring import ChangeSummary, format_summary, read_embeddings_file

    chunks = read_embeddings_file(args.embeddings)
    try:
        first = next(chunks, None)
    except OSError as exc:
        raise ConfigError(f"cannot read {args.embeddings}: {exc}") from exc
    if first is None:
        raise ConfigError(f"{args.embeddings}: no image embeddings to rescore")
    policy_set = load_policy_dir(args.policies)
    baseline_set = load_policy_dir(args.baseline) if args.baseline else None
    clip, cache = load_model(args)
    after_scorer = OfflineScorer(clip, policy_set, cache)
    before_scorer = OfflineScorer(clip, baseline_set, cache) if baseline_set else None
    rescore = Rescore(after_scorer, before_scorer, ChangeSummary())
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(written_on_success(args.out)) if args.out else None
        for chunk in itertools.chain([first], chunks):
            rescore.add_chunk(chunk, out)
    before = (
        f"{args.baseline} (version {baseline_set.version})"
        if baseline_set
        else f"stored results (version {', '.join(sorted(rescore.stored_versions)) or '?'})"
    )
    print(
        format_summary(rescore.summary, before, f"{args.policies} (version {policy_set.version})")
    )
    return rescore.report_skipped()


@contextlib.contextmanager
def written_on_success(path: Path) -> Iterator[TextIO]:
    """A file to write `path` through: a regular file (or a link to one) appears only if the
    block completes; anything else (/dev/stdout, a pipe) is written directly."""
    target = path.resolve()
    if target.exists() and not target.is_file():
        with target.open("w", encoding="utf-8") as out:
            yield out
        return
    with replaced_atomically(target) as out:
        yield out


@dataclass
class Rescore:
    """`moderator rescore` state across the chunks of one file."""

    after: OfflineScorer
    before: OfflineScorer | None  # None: compare with the results stored in the file
    summary: ChangeSummary
    stored_versions: set[str] = field(default_factory=set)
    problems: int = 0
    failed_at_moderation: int = 0
    not_compared: int = 0  # no stored decision and no baseline: scored, not compared
    invalid: list[str] = field(default_factory=list)

    def add_chunk(self, chunk: StoredChunk, out: TextIO | None) -> None:
        from moderator.rescoring import source_mismatch, verdict_of
        from moderator.servicer import image_result

        for problem in chunk.problems:
            print(f"skipped {problem}", file=sys.stderr)
        self.problems += len(chunk.problems)
        self.failed_at_moderation += chunk.without_embedding
        info = self.after.clip.info
        mismatch = source_mismatch(chunk.images, info.model_id)
        if mismatch:
            raise ConfigError(mismatch)
        images = [s.image for s in chunk.images]
        after = self.after.score_embeddings(images)
        if out is not None:
            version = self.after.policy_set.version
            for stored, outcome in zip(chunk.images, after, strict=True):
                # the precision that made the embedding, not this process's
                record = (image_result(outcome), version, info.model_id, stored.precision)
                out.write(format_json(*record) + "\n")
        befores: list[Verdict | None]
        if self.before is not None:
            befores = [verdict_of(o) for o in self.before.score_embeddings(images)]
        else:
            befores = [s.verdict for s in chunk.images]
            self.stored_versions |= {s.policy_version for s in chunk.images if s.policy_version}
        for outcome, before in zip(after, befores, strict=True):
            if outcome.error is not None:
                self.invalid.append(f"{outcome.id}: {outcome.error.message}")
            elif before is None:
                self.not_compared += 1
            else:
                self.summary.add(outcome.id, before, verdict_of(outcome))

    def report_skipped(self) -> int:
        if self.failed_at_moderation:
            print(
                f"({self.failed_at_moderation} images that failed at moderation time were skipped)"
            )
        if self.not_compared:
            print(
                f"({self.not_compared} images have no stored decision: scored, not compared; "
                "--baseline POLICY_DIR compares with a policy set instead)"
            )
        for message in self.invalid[:INVALID_LISTED]:
            print(f"invalid embedding: {message}", file=sys.stderr)
        if self.problems or self.invalid:
            listed = min(len(self.invalid), INVALID_LISTED)
            print(
                f"error: {self.problems} unreadable lines (listed above) and "
                f"{len(self.invalid)} invalid embeddings (the first {listed} listed above) "
                "were left out",
                file=sys.stderr,
            )
            return 1
        return 0


def run_check(args: argparse.Namespace) -> int:
    from moderator.v1 import moderator_pb2 as pb
    from moderator.v1 import moderator_pb2_grpc as pb_grpc

    options = [
        ("grpc.max_send_message_length", 256 * MIB),
        ("grpc.max_receive_message_length", 256 * MIB),
    ]
    with grpc.insecure_channel(args.server, options=options) as channel:
        stub = pb_grpc.ModeratorStub(channel)
        for start in range(0, len(args.files), CHECK_BATCH_SIZE):
            files: list[Path] = args.files[start : start + CHECK_BATCH_SIZE]
            request = pb.ModerateRequest(
                images=[pb.Image(id=str(path), data=path.read_bytes()) for path in files],
                policy_ids=args.policy,
                include_embeddings=args.embeddings,
            )
            try:
                response = stub.Moderate(request, timeout=args.timeout)
            except grpc.RpcError as exc:
                print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            for result in response.results:
                if args.json or args.embeddings:
                    context = (response.policy_version, response.model, response.precision)
                    print(format_json(result, *context))
                else:
                    print(format_line(result))
    return 0


def format_line(result: Any) -> str:
    from moderator.v1 import moderator_pb2 as pb

    decision = pb.Decision.Name(result.decision).removeprefix("DECISION_")
    if result.decision == pb.DECISION_ERROR:
        code = pb.ImageErrorCode.Name(result.error.code).removeprefix("IMAGE_ERROR_CODE_")
        return f"{result.id}\t{decision}\t{code}: {result.error.message}"
    violations = [
        f"{p.policy_id}{'(shadow)' if p.mode == pb.POLICY_MODE_SHADOW else ''}="
        f"{p.score:.3f}>={p.threshold:.3f} ({p.matched_description})"
        for p in result.policies
        if p.violated
    ]
    return f"{result.id}\t{decision}\t{', '.join(violations) or '-'}"


def format_json(result: Any, policy_version: str, model: str, precision: str) -> str:
    """One ImageResult as a JSON line (protobuf's JSON mapping) with its response's context."""
    from google.protobuf.json_format import MessageToDict

    record = MessageToDict(result, preserving_proto_field_name=True)
    record.update(policy_version=policy_version, model=model, precision=precision)
    return json.dumps(record, sort_keys=True)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser(os.environ if env is None else env).parse_args(argv)
    level = getattr(args, "log_level", "INFO")
    if level not in LOG_LEVELS:
        print(f"error: --log-level {level}: use one of {', '.join(LOG_LEVELS)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handlers = {
        "serve": run_serve,
        "check": run_check,
        "policies": run_policies,
        "calibrate": run_calibrate,
        "rescore": run_rescore,
    }
    try:
        return handlers[args.command](args)
    except PolicyError as exc:
        print("error: invalid policies:\n  " + "\n  ".join(exc.problems), file=sys.stderr)
        return 2
    except ModeratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
