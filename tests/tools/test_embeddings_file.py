from __future__ import annotations

import json
from pathlib import Path

from moderator.core.scoring import Decision
from moderator.tools.changes import Verdict
from moderator.tools.embeddings_file import read_embeddings_file
from tests.helpers import unit


def test_the_embeddings_file_reports_bad_lines_and_skips_failed_images(tmp_path: Path) -> None:
    path = tmp_path / "stored.jsonl"
    lines = [
        {
            "id": "a",
            "embedding": unit(1, 0, 0),
            "decision": "DECISION_BLOCK",
            "model": "m",
            "policy_version": "v1",
            "policies": [{"policy_id": "toy", "score": 0.9, "violated": True}, {"policy_id": "o"}],
        },
        {"id": "b", "embedding": unit(0, 1, 0), "views": [{"values": unit(0, 1, 0)}]},
        {"id": "broken", "decision": "DECISION_ERROR", "error": {"code": "CORRUPT"}},
        {"embedding": [1.0]},
        {"id": "c", "embedding": ["x"]},
        {"id": "d", "embedding": [1.0], "decision": "DECISION_MAYBE"},
        {"id": "e", "embedding": [True, 0.0]},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n\n"
    path.write_bytes(text.encode() + b'{"id": "\xff"}\n')
    chunks = list(read_embeddings_file(path, chunk_size=1))
    images = [image for chunk in chunks for image in chunk.images]
    problems = [problem for chunk in chunks for problem in chunk.problems]
    assert [len(chunk.images) for chunk in chunks] == [1, 1, 0]
    assert [s.image.id for s in images] == ["a", "b"]
    first = images[0]
    assert first.verdict == Verdict(Decision.BLOCK, frozenset({"toy"}), frozenset({"toy", "o"}))
    assert (first.model, first.policy_version) == ("m", "v1")
    assert images[1].verdict is None
    assert len(images[1].image.views) == 1
    assert sum(chunk.without_embedding for chunk in chunks) == 1
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{n}" for n in (4, 5, 6, 7, 8, 10)]
    assert "missing 'id'" in problems[0]
    assert "list of numbers" in problems[1]
    assert "DECISION_MAYBE" in problems[2]
    assert "list of numbers" in problems[3]
    assert "utf-8" in problems[5]
