"""`moderator policies validate|test`: check policy files, and their regression examples."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from moderator.cli.flags import Subparsers
from moderator.cli.options import MODEL_OPTIONS, add_options, load_model
from moderator.core.policies import load_policy_dir
from moderator.errors import PolicyError


def add_parser(commands: Subparsers, env: Mapping[str, str]) -> None:
    policies = commands.add_parser("policies", help="work with policy files")
    policy_commands = policies.add_subparsers(dest="policy_command", required=True)
    validate = policy_commands.add_parser("validate", help="check every policy file in DIR")
    validate.add_argument("directory", type=Path)
    validate.set_defaults(handler=run_validate)
    test = policy_commands.add_parser(
        "test", help="check regression examples: EXAMPLES_DIR/<policy>/{violating,benign}/*"
    )
    test.add_argument("policies_dir", type=Path, metavar="POLICY_DIR")
    test.add_argument("examples_dir", type=Path, metavar="EXAMPLES_DIR")
    add_options(test, MODEL_OPTIONS, env)
    test.set_defaults(handler=run_tests)


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


def run_tests(args: argparse.Namespace) -> int:
    from moderator.tools.offline import OfflineScorer
    from moderator.tools.regression import discover_examples, format_table, run_examples

    policy_set = load_policy_dir(args.policies_dir)
    examples, skipped = discover_examples(args.examples_dir, policy_set)
    clip, cache = load_model(args)
    results = run_examples(OfflineScorer(clip, policy_set, cache), examples)
    print(format_table(results, args.examples_dir))
    if skipped:
        print(f"skipped examples of disabled policies: {', '.join(skipped)}")
    return 0 if all(r.passed for r in results) else 1
