"""`moderator rescore`: what a policy change would decide, from stored embeddings."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from moderator_client import format_json

from moderator.cli.flags import Subparsers
from moderator.cli.options import MODEL_OPTIONS, add_options, load_model
from moderator.core.policies import load_policy_dir
from moderator.errors import ConfigError
from moderator.tools.files import write_target, written_on_success

if TYPE_CHECKING:
    from moderator.tools.changes import ChangeSummary, Verdict
    from moderator.tools.embeddings_file import StoredChunk
    from moderator.tools.offline import OfflineScorer

INVALID_LISTED = 10


def add_parser(commands: Subparsers, env: Mapping[str, str]) -> None:
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
    rescore.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Rescore the file chunk by chunk; print what changed. Exit 1 if any line or embedding
    could not be used (after reporting it), 0 otherwise."""
    from moderator.tools.changes import ChangeSummary, format_summary
    from moderator.tools.embeddings_file import read_embeddings_file
    from moderator.tools.offline import OfflineScorer

    chunks = read_embeddings_file(args.embeddings)
    try:
        first = next(chunks, None)
    except OSError as exc:
        raise ConfigError(f"cannot read {args.embeddings}: {exc}") from exc
    if first is None:
        raise ConfigError(f"{args.embeddings}: no image embeddings to rescore")
    if args.out:
        write_target(args.out)  # a link that is not safe to follow is refused before any work
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
        from moderator.tools.changes import verdict_of
        from moderator.tools.embeddings_file import source_mismatch
        from moderator.wire import image_result

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
