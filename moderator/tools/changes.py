"""What a policy change changes: decision transitions and per-policy flag counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from moderator.core.outcomes import ImageOutcome
from moderator.core.scoring import Decision
from moderator.tools.tables import aligned_rows


@dataclass(frozen=True)
class Verdict:
    """What one policy set decided for one image."""

    decision: Decision
    violated: frozenset[str]  # ids of the policies it violated, shadow ones included
    evaluated: frozenset[str]  # ids of the policies it was scored against


def verdict_of(outcome: ImageOutcome) -> Verdict:
    return Verdict(
        decision=outcome.decision,
        violated=frozenset(policy.id for policy in outcome.violated),
        evaluated=frozenset(p.policy.id for p in outcome.policies),
    )


@dataclass
class PolicyChange:
    before: int = 0  # images it flagged before
    after: int = 0
    newly_flagged: int = 0
    cleared: int = 0


@dataclass
class ChangeSummary:
    """Decision transitions and per-policy flag counts, added to one image at a time."""

    listed: int = 20  # ids of changed images kept for the report
    images: int = 0
    decisions: Counter[tuple[Decision, Decision]] = field(default_factory=Counter)
    policies: dict[str, PolicyChange] = field(default_factory=dict)
    before_policies: set[str] = field(default_factory=set)
    after_policies: set[str] = field(default_factory=set)
    changed: int = 0
    changed_ids: list[str] = field(default_factory=list)  # the first `listed` changed images

    def add(self, image_id: str, before: Verdict, after: Verdict) -> None:
        self.images += 1
        self.decisions[(before.decision, after.decision)] += 1
        if before.decision != after.decision:
            self.changed += 1
            if len(self.changed_ids) < self.listed:
                self.changed_ids.append(image_id)
        self.before_policies |= before.evaluated
        self.after_policies |= after.evaluated
        both = before.evaluated & after.evaluated
        for policy_id in before.evaluated | after.evaluated:
            change = self.policies.setdefault(policy_id, PolicyChange())
            was, now = policy_id in before.violated, policy_id in after.violated
            change.before += was
            change.after += now
            if policy_id in both:
                change.newly_flagged += now and not was
                change.cleared += was and not now

    def status(self, policy_id: str) -> str:
        """kept, added or removed: a policy only one side has is not counted as a change."""
        if policy_id not in self.after_policies:
            return "removed"
        return "kept" if policy_id in self.before_policies else "added"


def format_summary(summary: ChangeSummary, before: str, after: str) -> str:
    lines = [f"{summary.images} images: {before} -> {after}", "", "decisions:"]
    for (old, new), count in sorted(summary.decisions.items()):
        marker = "" if old == new else "  (changed)"
        lines.append(f"  {old.name:<6} -> {new.name:<6} {count:>8}{marker}")
    lines += ["", "policies:"]
    header = ("policy", "status", "flagged before", "flagged after", "newly flagged", "cleared")
    rows = [header] + [
        (
            pid,
            summary.status(pid),
            str(c.before),
            str(c.after),
            str(c.newly_flagged),
            str(c.cleared),
        )
        for pid, c in sorted(summary.policies.items())
    ]
    lines += aligned_rows(rows, indent="  ")
    lines += ["", f"{summary.changed} images changed decision"]
    if summary.changed:
        more = f" (first {summary.listed})" if summary.changed > summary.listed else ""
        lines.append(f"changed{more}: " + ", ".join(summary.changed_ids))
    return "\n".join(line.rstrip() for line in lines)
