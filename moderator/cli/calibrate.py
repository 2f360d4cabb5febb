"""`moderator calibrate`: precision and recall per policy from labelled images; thresholds."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from moderator.cli.flags import Subparsers
from moderator.cli.options import MODEL_OPTIONS, add_options, load_model
from moderator.core.policies import load_policy_dir
from moderator.errors import ConfigError
from moderator.tools.files import write_target, written_on_success

if TYPE_CHECKING:
    from moderator.tools.calibration import Calibration

DEFAULT_TARGET_PRECISION = 0.9


def add_parser(commands: Subparsers, env: Mapping[str, str]) -> None:
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
    calibrate.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from moderator.tools.calibration import Target, calibrate, format_calibration, read_labels_csv
    from moderator.tools.offline import OfflineScorer
    from moderator.tools.regression import discover_examples
    from moderator.tools.report import render_report
    from moderator.tools.thresholds import policy_file

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
    # Links that are not safe to follow are refused before any work.
    if args.report:
        write_target(args.report)
    if args.write:
        for policy in policy_set.policies:
            write_target(policy_file(args.policies_dir, policy.id))
    clip, cache = load_model(args)
    calibration = calibrate(OfflineScorer(clip, policy_set, cache), examples, target, value)
    print(format_calibration(calibration))
    try:
        if args.report:
            with written_on_success(args.report) as out:
                out.write(render_report(calibration, args.report))
            print(f"report: {args.report}")
        if args.write:
            write_suggestions(args.policies_dir, calibration, force=args.force)
    except OSError as exc:
        raise ConfigError(f"cannot write: {exc}") from exc
    return 0


def write_suggestions(directory: Path, calibration: Calibration, force: bool) -> None:
    from moderator.tools.thresholds import format_threshold, write_thresholds

    changes: dict[tuple[str, str], tuple[float, float]] = {}
    for result in calibration.policies:
        if result.suggested is None or result.suggested.threshold == result.current.threshold:
            continue
        if result.few_examples and not force:
            print(f"{result.name}: not written, too few labelled images (--force writes it)")
            continue
        changes[result.policy_id, result.key] = (
            result.current.threshold,
            result.suggested.threshold,
        )
    written = write_thresholds(directory, {change: new for change, (_, new) in changes.items()})
    for (policy_id, key), path in written.items():
        old, new = changes[policy_id, key]
        print(f"{path}: {key} {format_threshold(old)} -> {format_threshold(new)}")
