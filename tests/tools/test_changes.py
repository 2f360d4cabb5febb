from __future__ import annotations

from moderator.core.scoring import Decision
from moderator.tools.changes import ChangeSummary, Verdict, format_summary


def test_change_summary_counts_decisions_and_policies() -> None:
    allow = Verdict(Decision.ALLOW, frozenset(), frozenset({"a", "b"}))
    block_a = Verdict(Decision.BLOCK, frozenset({"a"}), frozenset({"a", "b"}))
    review_b = Verdict(Decision.REVIEW, frozenset({"b"}), frozenset({"b", "c"}))
    new_allow = Verdict(Decision.ALLOW, frozenset(), frozenset({"b", "c"}))
    summary = ChangeSummary(listed=1)
    for image_id, before, after in (
        ("1", allow, review_b),
        ("2", block_a, new_allow),
        ("3", allow, new_allow),
    ):
        summary.add(image_id, before, after)
    assert summary.decisions == {
        (Decision.ALLOW, Decision.REVIEW): 1,
        (Decision.BLOCK, Decision.ALLOW): 1,
        (Decision.ALLOW, Decision.ALLOW): 1,
    }
    assert (summary.changed, summary.changed_ids) == (2, ["1"])
    a, b, c = (summary.policies[k] for k in "abc")
    assert [summary.status(k) for k in "abc"] == ["removed", "kept", "added"]
    assert (a.before, a.after, a.cleared) == (1, 0, 0)  # a is gone, not "cleared"
    assert (b.before, b.after, b.newly_flagged, b.cleared) == (0, 1, 1, 0)
    assert (c.before, c.after, c.newly_flagged) == (0, 0, 0)
    assert "changed (first 1): 1" in format_summary(summary, "old", "new")
