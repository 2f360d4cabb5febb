"""Regression examples for policies: images that must (or must not) violate a policy.

    EXAMPLES_DIR/<policy_id>/violating/*   each must violate <policy_id>
    EXAMPLES_DIR/<policy_id>/benign/*      none may violate <policy_id>

`moderator policies test POLICY_DIR EXAMPLES_DIR` runs them with the service's own scoring,
so a trust-and-safety team can check a policy change in the CI of their policy repository.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moderator.core.policies import PolicySet
from moderator.core.scoring import ScoredImage
from moderator.errors import PolicyError
from moderator.tools.offline import OfflineScorer
from moderator.tools.tables import aligned_rows

EXPECTATIONS = {"violating": True, "benign": False}


@dataclass(frozen=True)
class Example:
    policy_id: str
    path: Path
    should_violate: bool


@dataclass(frozen=True)
class ExampleResult:
    """An image against one policy, decided as the service decides (text, examples, hashes)."""

    example: Example
    score: float | None  # the text score (None: not scored, or no descriptions)
    threshold: float
    violated: bool = False
    decided_by: str = ""  # 'example NAME', 'hash ENTRY' or 'allowed by NAME' ('': the text)
    example_score: float | None = None  # best similarity to the policy's example images
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and self.violated == self.example.should_violate


def discover_examples(directory: Path, policy_set: PolicySet) -> tuple[list[Example], list[str]]:
    """(examples, ids of disabled policies skipped). Raises PolicyError for unknown ids."""
    if not directory.is_dir():
        raise PolicyError([f"{directory}: examples directory does not exist"])
    examples: list[Example] = []
    skipped: list[str] = []
    problems: list[str] = []
    for policy_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        policy_id = policy_dir.name
        if policy_id in policy_set.disabled:
            skipped.append(policy_id)
            continue
        if policy_id not in policy_set.ids:
            problems.append(f"{policy_dir}: no active policy with id '{policy_id}'")
            continue
        for kind, should_violate in EXPECTATIONS.items():
            files = sorted(
                f
                for f in (policy_dir / kind).glob("*")
                if f.is_file() and not f.name.startswith(".")
            )
            examples.extend(Example(policy_id, f, should_violate) for f in files)
    if problems:
        raise PolicyError(problems)
    if not examples:
        raise PolicyError([f"{directory}: no examples (<policy_id>/violating/* or benign/*)"])
    return examples, skipped


def run_examples(scorer: OfflineScorer, examples: Sequence[Example]) -> list[ExampleResult]:
    """Each example's score for its policy; an image labelled for several policies is scored
    once."""
    policy_set = scorer.policy_set
    paths = list(dict.fromkeys(e.path for e in examples))
    scored_paths = dict(zip(paths, scorer.score_files(paths), strict=True))
    results = []
    for example in examples:
        column = policy_set.index_of(example.policy_id)
        policy = policy_set.policies[column]
        scored = scored_paths[example.path].scored
        if scored is None:
            error = scored_paths[example.path].error
            message = error.message if error else "unreadable"
            results.append(ExampleResult(example, None, policy.threshold, error=message))
            continue
        results.append(
            ExampleResult(
                example,
                score=scored.scores[column] if policy.descriptions else None,
                threshold=policy.threshold,
                violated=column in scored.violated,
                decided_by=_decided_by(scored, column),
                example_score=scored.example_scores[column] if policy.known.examples else None,
            )
        )
    return results


def _decided_by(scored: ScoredImage, column: int) -> str:
    if column in scored.hash_matches:
        return f"hash {scored.hash_matches[column]}"
    if column in scored.allowed_by:
        return f"allowed by {scored.allowed_by[column]}"
    if column in scored.matched_examples and column in scored.violated:
        return f"example {scored.matched_examples[column]}"
    return ""


def format_table(results: list[ExampleResult], root: Path) -> str:
    header = ("example", "expected", "score", "threshold", "example score", "decided by", "result")
    rows = [header]
    for r in results:
        outcome = "pass" if r.passed else f"FAIL{': ' + r.error if r.error else ''}"
        expected = "violates" if r.example.should_violate else "benign"
        rows.append(
            (
                str(r.example.path.relative_to(root)),
                expected,
                _number(r.score),
                "-" if r.score is None else f"{r.threshold:.3f}",
                _number(r.example_score),
                r.decided_by or "-",
                outcome,
            )
        )
    lines = aligned_rows(rows)
    failed = sum(not r.passed for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
