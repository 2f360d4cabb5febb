from __future__ import annotations

from pathlib import Path

import pytest

from moderator.config import DEMO_POLICIES_DIR, REPO_ROOT
from moderator.core.policies import (
    DEFAULT_TEMPLATES,
    Action,
    Mode,
    load_policy_dir,
    parse_policy,
)
from moderator.errors import PolicyError

VALID = """\
title: Weapons
description: Firearms or knives shown in a threatening way.
action: review
mode: enforce
threshold: 0.27
descriptions:
  - a person pointing a gun at the camera
  - a bloody knife
benign:
  - a toy water pistol
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def problems_for(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy("weapons", text, source="weapons.yaml")
    return info.value.problems


def test_valid_policy_is_parsed_with_defaults() -> None:
    policy = parse_policy("weapons", VALID, source="weapons.yaml")
    assert policy.id == "weapons"
    assert policy.action is Action.REVIEW
    assert policy.mode is Mode.ENFORCE
    assert policy.threshold == pytest.approx(0.27)
    assert policy.descriptions == ("a person pointing a gun at the camera", "a bloody knife")
    assert policy.benign == ("a toy water pistol",)
    assert policy.templates == DEFAULT_TEMPLATES
    assert policy.prompts(["a knife"])[0] == [t.format("a knife") for t in DEFAULT_TEMPLATES]


def test_version_follows_content_not_comments() -> None:
    base = parse_policy("weapons", VALID, source="weapons.yaml")
    commented = parse_policy("weapons", "# owner: t&s\n" + VALID, source="weapons.yaml")
    changed = parse_policy("weapons", VALID.replace("0.27", "0.30"), source="weapons.yaml")
    assert base.version == commented.version
    assert base.version != changed.version


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VALID + "colour: red\n", "weapons.yaml:11: key 'colour': unknown key"),
        (VALID.replace("threshold: 0.27", "threshold: high"), "weapons.yaml:5: key 'threshold'"),
        (VALID.replace("threshold: 0.27", "threshold: 3"), "between -2 and 2"),
        (VALID.replace("action: review", "action: delete"), "key 'action': must be one of"),
        (VALID.replace("mode: enforce", "mode: loud"), "key 'mode': must be one of"),
        (VALID.replace("title: Weapons", "title: ''"), "key 'title': must be a non-empty string"),
        (VALID.replace("  - a bloody knife", "  - ''"), "key 'descriptions': entry 2"),
        (
            VALID.replace("  - a bloody knife\n", "")
            .replace("  - a person pointing a gun at the camera\n", "")
            .replace("descriptions:", "descriptions: []"),
            "key 'descriptions': must be a non-empty list",
        ),
        (
            VALID + "templates: ['a photo of']\n",
            "key 'templates': entry 1 must contain exactly one {}",
        ),
        (VALID + "templates: ['{} and {}']\n", "key 'templates': entry 1"),
        (VALID + "threshold: 0.5\n", "key 'threshold': key appears more than once"),
        (VALID.replace("action: review\n", ""), "missing required key 'action'"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("title: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_policy_names_file_key_and_reason(text: str, expected: str) -> None:
    problems = problems_for(text)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("weapons.yaml") for p in problems)


def test_directory_reports_every_broken_file(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", VALID)
    write(tmp_path, "bad_action.yaml", VALID.replace("action: review", "action: nuke"))
    write(tmp_path, "bad_threshold.yaml", VALID.replace("0.27", "'x'"))
    with pytest.raises(PolicyError) as info:
        load_policy_dir(tmp_path)
    joined = "\n".join(info.value.problems)
    assert "bad_action.yaml" in joined
    assert "bad_threshold.yaml" in joined
    assert "good.yaml" not in joined


def test_duplicate_policy_id_across_extensions(tmp_path: Path) -> None:
    write(tmp_path, "weapons.yaml", VALID)
    write(tmp_path, "weapons.yml", VALID)
    with pytest.raises(PolicyError, match="duplicate policy id 'weapons'"):
        load_policy_dir(tmp_path)


def test_file_name_must_be_a_policy_id(tmp_path: Path) -> None:
    write(tmp_path, "Bad Name.yaml", VALID)
    with pytest.raises(PolicyError, match="file name must be a policy id"):
        load_policy_dir(tmp_path)


def test_disabled_policies_are_validated_but_not_loaded(tmp_path: Path) -> None:
    write(tmp_path, "weapons.yaml", VALID)
    write(tmp_path, "drugs.yaml", VALID.replace("mode: enforce", "mode: disabled"))
    write(tmp_path, "gore.yaml", VALID.replace("mode: enforce", "mode: shadow"))
    policy_set = load_policy_dir(tmp_path)
    assert policy_set.ids == ("gore", "weapons")
    assert policy_set.disabled == ("drugs",)
    write(
        tmp_path,
        "drugs.yaml",
        VALID.replace("mode: enforce", "mode: disabled").replace("0.27", "x"),
    )
    with pytest.raises(PolicyError, match=r"drugs\.yaml"):
        load_policy_dir(tmp_path)


def test_set_version_changes_with_any_policy(tmp_path: Path) -> None:
    write(tmp_path, "weapons.yaml", VALID)
    first = load_policy_dir(tmp_path).version
    assert load_policy_dir(tmp_path).version == first
    write(tmp_path, "gore.yaml", VALID)
    assert load_policy_dir(tmp_path).version != first


def test_missing_or_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy_dir(tmp_path / "nope")
    with pytest.raises(PolicyError, match="no policy files"):
        load_policy_dir(tmp_path)


@pytest.mark.parametrize("directory", [REPO_ROOT / "policies", DEMO_POLICIES_DIR])
def test_shipped_policy_sets_are_valid(directory: Path) -> None:
    policy_set = load_policy_dir(directory)
    assert len(policy_set.policies) >= 3
    for policy in policy_set.policies:
        assert len(policy.descriptions) >= 1


def test_default_policy_set_covers_the_required_harms() -> None:
    policy_set = load_policy_dir(REPO_ROOT / "policies")
    required = {"nudity", "violence", "weapons", "drugs", "hate_symbols", "self_harm"}
    assert required <= set(policy_set.ids)
    for policy in policy_set.policies:
        assert len(policy.descriptions) >= 3, policy.id
        assert len(policy.benign) >= 2, policy.id


def test_a_set_with_every_policy_disabled_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "drugs.yaml", VALID.replace("mode: enforce", "mode: disabled"))
    with pytest.raises(PolicyError, match="no active policies"):
        load_policy_dir(tmp_path)


# -- hostile documents: each is a problem at its line, found fast, with a short message -------

BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
descriptions: *i
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            VALID.replace("threshold: 0.27", "threshold: " + "9" * 5000),
            "weapons.yaml:5:12: key 'threshold': a number longer than 64 characters",
        ),
        (
            VALID.replace("  - a bloody knife", "  - " + "1" * 5000),
            "weapons.yaml:8:5: key 'descriptions': a number longer than 64 characters",
        ),
        (
            VALID.replace("threshold: 0.27", "threshold: 0x" + "f" * 5000),
            "weapons.yaml:5:12: key 'threshold': a number longer than 64 characters",
        ),
        (
            VALID + "templates: [2024-02-30]\n",
            "weapons.yaml:11:13: key 'templates': cannot be read: ValueError: day is out of range",
        ),
        (
            VALID + "templates: !!python/object/apply:os.system ['true']\n",
            "weapons.yaml:11:12: key 'templates': cannot be read: could not determine a "
            "constructor",
        ),
    ],
)
def test_a_value_that_cannot_be_built_names_its_key_and_line(text: str, expected: str) -> None:
    [problem] = problems_for(text)
    assert problem.startswith(expected), problem


@pytest.mark.parametrize(
    ("nested", "where"),
    [
        ("descriptions: " + "[" * 10000 + "]" * 10000 + "\n", "weapons.yaml:6:30:"),
        ("descriptions: " + "{a: " * 10000 + "}" * 10000 + "\n", "weapons.yaml:6:75:"),
        (
            "descriptions:\n" + "".join("  " * depth + "-\n" for depth in range(1, 5000)),
            "weapons.yaml:22:33:",  # where the 17th level starts
        ),
    ],
)
def test_deep_nesting_is_refused_before_it_is_built(nested: str, where: str) -> None:
    """Composing 10000 levels would raise RecursionError; the loader stops at the 17th."""
    text = VALID.replace("descriptions:\n", nested + "unused:\n")
    assert problems_for(text) == [
        f"{where} nested deeper than 16 levels of lists and mappings",
    ]


def test_nesting_up_to_the_limit_is_only_a_type_problem() -> None:
    deepest = VALID + "templates: " + "[" * 15 + "'{}'" + "]" * 15 + "\n"  # the mapping is 1
    too_deep = VALID + "templates: " + "[" * 16 + "'{}'" + "]" * 16 + "\n"
    assert problems_for(deepest) == [
        "weapons.yaml:11: key 'templates': entry 1 must contain exactly one {}, got "
        "[[[[[[[[[[[[[['{}']]]]]]]]]]]]]]"
    ]
    assert problems_for(too_deep) == [
        "weapons.yaml:11:27: nested deeper than 16 levels of lists and mappings"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BILLION_LAUGHS, "weapons.yaml:1:4: YAML anchors (&a) are not allowed"),
        (VALID.replace("title: Weapons", "title: &t Weapons"), "weapons.yaml:1:8: YAML anchors"),
        (VALID + "templates: *nowhere\n", "weapons.yaml:11:12: YAML aliases (*nowhere) are not"),
    ],
)
def test_anchors_and_aliases_are_refused(text: str, expected: str) -> None:
    [problem] = problems_for(text)
    assert problem.startswith(expected)
    assert len(problem) < 200  # nothing was expanded into the message


def test_long_values_are_cut_short_in_problems() -> None:
    [problem] = problems_for(VALID.replace("action: review", "action: " + "x" * 100_000))
    assert problem == (
        "weapons.yaml:3: key 'action': must be one of review | block, got '" + "x" * 76 + "..."
    )


def test_a_file_with_many_problems_reports_the_first_twenty() -> None:
    problems = problems_for(VALID + "".join(f"k{'y' * 1000}{i}: v\n" for i in range(1000)))
    assert len(problems) == 21
    assert problems[-1] == "weapons.yaml: 980 more problems not shown"
    assert sum(map(len, problems)) < 5000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VALID + "<<: {title: x}\n", "weapons.yaml:11: key '<<': unknown key"),
        (VALID + "? [a, b]\n: x\n", "weapons.yaml:11:3: keys must be plain names"),
        (VALID + "\0", "weapons.yaml: not valid YAML: unacceptable character #x0000"),
        (VALID + "---\n" + VALID, "weapons.yaml:11:1: not valid YAML: expected a single document"),
        ("!!set {title, action}\n", "weapons.yaml: a policy must be a YAML mapping"),
        ("", "weapons.yaml: a policy must be a YAML mapping"),
    ],
)
def test_unusual_yaml_is_a_problem(text: str, expected: str) -> None:
    problems = problems_for(text)
    assert any(p.startswith(expected) for p in problems), problems
