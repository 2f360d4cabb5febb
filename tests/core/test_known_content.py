"""core/known_content.py and the known-content keys of core/policies.py: example images, allow
examples and hash lists as policy files name them, their limits, and the policy version."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from moderator.config import DEMO_POLICIES_DIR
from moderator.core import known_content
from moderator.core.known_content import (
    DEFAULT_ALLOW_THRESHOLD,
    DEFAULT_EXAMPLE_THRESHOLD,
    DEFAULT_PDQ_MAX_DISTANCE,
    NO_KNOWN_CONTENT,
    Location,
    parse_hash_list,
)
from moderator.core.pdq import pdq_bytes
from moderator.core.policies import Policy, load_policy_dir, parse_policy, parse_policy_file
from moderator.errors import PolicyError
from tests.helpers import hashes_in, shape_png

HEAD = "title: T\naction: block\n"  # lines 1-2: the known-content key under test is on line 3
HASH_A = "0123456789abcdef" * 4
HASH_B = "fedcba9876543210" * 4
# A policy without known content, and its version as commit 1b1efe8 (before known content)
# computed it: a policy without known content keeps the version it had.
PLAIN = "title: Knives\naction: review\nthreshold: 0.25\ndescriptions: [a knife, a dagger]\n"
PLAIN += "benign: [a fork]\n"
PLAIN_VERSION_BEFORE_KNOWN_CONTENT = "85e0f8b2b866"


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    return directory


def put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def known_files(policies: Path) -> str:
    """An example, an allow example and a hash list in `policies`, and the three lines (keys)
    of a policy naming them: what each known-content setting applies to."""
    put(policies / "known/a.png", shape_png("red", "square"))
    put(policies / "allowed/b.png", shape_png("blue", "circle"))
    put(policies / "lists/l.csv", f"{HASH_A},a\n")
    return "examples: [known/a.png]\nallow_examples: [allowed/b.png]\nhash_lists: [lists/l.csv]\n"


def load(policies: Path, text: str, name: str = "p.yaml") -> Policy:
    return parse_policy_file(put(policies / name, text), policies)


def problems(policies: Path, text: str, name: str = "p.yaml") -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(policies, text, name)
    return info.value.problems


def one_problem(policies: Path, text: str) -> str:
    [problem] = problems(policies, text)
    return problem


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- examples: files and folders -------------------------------------------------------------


def test_examples_from_a_file_and_a_folder(policies: Path) -> None:
    images = {
        "known/b.png": shape_png("blue", "triangle"),
        "known/a.jpg": b"jpeg bytes",
        "known/C.PNG": b"suffix in capitals",
        "known/d.tiff": b"tiff",
        "extra/one.webp": b"webp bytes",
    }
    for name, data in images.items():
        put(policies / name, data)
    put(policies / "known/.hidden.png", b"hidden")
    put(policies / "known/notes.txt", b"not an image")
    put(policies / "known/README", b"no suffix")
    put(policies / "known/deeper/e.png", b"a subfolder is not read into")
    (policies / "known/folder.png").mkdir()  # a folder named like an image
    policy = load(policies, HEAD + "examples: [known/, extra/one.webp]\n")
    examples = policy.known.examples
    names = ["known/C.PNG", "known/a.jpg", "known/b.png", "known/d.tiff", "extra/one.webp"]
    assert [e.name for e in examples] == names  # a folder's files in name order, then the file
    for example in examples:
        assert example.sha256 == digest(images[example.name])
        assert example.path == os.path.realpath(policies / example.name)
    assert policy.known.allow_examples == ()
    assert policy.descriptions == ()
    assert policy.threshold == 0.0


def test_allow_examples_are_read_like_examples(policies: Path) -> None:
    put(policies / "allowed/x.png", b"allowed")
    put(policies / "known/y.png", b"violating")
    text = "title: T\naction: block\nthreshold: 0.3\ndescriptions: [a red square]\n"
    policy = load(policies, text + "allow_examples: [allowed/]\nexamples: [known/y.png]\n")
    assert [(e.name, e.sha256) for e in policy.known.allow_examples] == [
        ("allowed/x.png", digest(b"allowed"))
    ]
    assert [e.name for e in policy.known.examples] == ["known/y.png"]
    assert policy.descriptions == ("a red square",)


def test_a_folder_without_image_files_is_a_problem(policies: Path) -> None:
    put(policies / "known/notes.txt", b"text")
    put(policies / "known/.secret.png", b"hidden")
    problem = one_problem(policies, HEAD + "examples: [known/]\n")
    assert problem == "p.yaml:3: key 'examples': known/: folder holds no image files"


def test_the_same_path_named_twice_counts_once(policies: Path) -> None:
    put(policies / "known/a.png", b"a")
    put(policies / "known/b.png", b"b")
    text = HEAD + "examples: [known/, known/a.png, ./known/../known/b.png, known//a.png, known/]\n"
    policy = load(policies, text)
    assert [e.name for e in policy.known.examples] == ["known/a.png", "known/b.png"]


def test_a_link_in_a_folder_is_an_example_of_its_own_name(policies: Path) -> None:
    """The same bytes under two names are two examples (one digest: embedded once)."""
    put(policies / "known/a.png", b"a")
    put(policies / "known/b.png", b"b")
    os.symlink("b.png", policies / "known/alias.jpg")
    policy = load(policies, HEAD + "examples: [known/, known/alias.jpg]\n")
    examples = policy.known.examples
    assert [e.name for e in examples] == ["known/a.png", "known/alias.jpg", "known/b.png"]
    alias, original = examples[1], examples[2]
    assert alias.sha256 == original.sha256 == digest(b"b")
    assert alias.path == original.path == os.path.realpath(policies / "known/b.png")


def test_a_repeated_name_at_the_limit_is_not_counted_again(
    policies: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(known_content, "MAX_EXAMPLES_PER_KEY", 2)
    put(policies / "known/a.png", b"a")
    put(policies / "known/b.png", b"b")
    policy = load(policies, HEAD + "examples: [known/, known/a.png]\n")
    assert [e.name for e in policy.known.examples] == ["known/a.png", "known/b.png"]
    (policies / "other").mkdir()
    os.symlink("../known/a.png", policies / "other/alias.png")  # another name: another example
    assert one_problem(policies, HEAD + "examples: [known/, other/alias.png]\n") == (
        "p.yaml:3: key 'examples': names more than 2 images"
    )


def test_an_absolute_path_inside_the_directory_is_named_relative_to_it(policies: Path) -> None:
    image = put(policies / "known/a.png", b"a")
    policy = load(policies, HEAD + f"examples: ['{image}']\n")
    assert [e.name for e in policy.known.examples] == ["known/a.png"]


def test_files_are_named_from_the_policy_file_s_folder(policies: Path) -> None:
    put(policies / "team/known/a.png", b"a")
    put(policies / "team/lists/l.csv", f"{HASH_A},x\n")
    path = put(policies / "team/p.yaml", HEAD + "examples: [known/]\nhash_lists: [lists/l.csv]\n")
    policy = parse_policy_file(path, policies)
    assert [e.name for e in policy.known.examples] == ["known/a.png"]
    assert policy.known.examples[0].path == os.path.realpath(policies / "team/known/a.png")
    assert [h.name for h in policy.known.hash_lists] == ["lists/l.csv"]
    assert policy.known.hash_lists[0].entries == ("lists/l.csv:x",)


def test_files_are_named_by_the_path_the_policy_writes(policies: Path) -> None:
    put(policies / "team/known/a.png", b"a")
    put(policies / "team/lists/l.csv", f"{HASH_A},x\n")
    text = HEAD + "examples: [team/known/]\nhash_lists: [./team/../team/lists/l.csv]\n"
    policy = load(policies, text)
    assert [e.name for e in policy.known.examples] == ["team/known/a.png"]
    assert [h.name for h in policy.known.hash_lists] == ["team/lists/l.csv"]
    assert policy.known.hash_lists[0].entries == ("team/lists/l.csv:x",)


# -- which policies are valid -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "files"),
    [
        ("examples: [known/a.png]\n", {"known/a.png": b"a"}),
        ("hash_lists: [l.csv]\n", {"l.csv": HASH_A.encode()}),
        ("sha256_lists: [l.csv]\n", {"l.csv": HASH_A.encode()}),
    ],
)
def test_a_policy_of_examples_or_hash_lists_alone_needs_no_text_rule(
    policies: Path, keys: str, files: dict[str, bytes]
) -> None:
    for name, data in files.items():
        put(policies / name, data)
    policy = load(policies, HEAD + keys)
    assert policy.descriptions == ()
    assert policy.threshold == 0.0
    assert policy.known != NO_KNOWN_CONTENT


def test_allow_examples_alone_are_no_rule(policies: Path) -> None:
    put(policies / "allowed/a.png", b"a")
    assert problems(policies, HEAD + "allow_examples: [allowed/]\n") == [
        "p.yaml: missing required key 'threshold'",
        "p.yaml: missing required key 'descriptions'",
        "p.yaml:3: key 'allow_examples': applies to descriptions or examples, and this policy "
        "has none",
    ]


def test_allow_examples_beside_hash_lists_alone_are_a_problem(policies: Path) -> None:
    """Allow examples only ever lift a text or example match, never a hash list's."""
    put(policies / "allowed/a.png", b"a")
    put(policies / "l.csv", HASH_A)
    text = HEAD + "hash_lists: [l.csv]\nallow_examples: [allowed/]\n"
    assert one_problem(policies, text) == (
        "p.yaml:4: key 'allow_examples': applies to descriptions or examples, and this policy "
        "has none"
    )
    put(policies / "known/b.png", b"b")
    known = load(policies, text + "examples: [known/]\n").known  # examples to allow against
    assert [e.name for e in known.allow_examples] == ["allowed/a.png"]


@pytest.mark.parametrize(
    ("setting", "beside", "needs"),
    [
        ("example_threshold: 0.8", "", "examples"),
        ("example_threshold: 0.8", "allow_examples: [allowed/a.png]\n", "examples"),
        ("allow_threshold: 0.9", "", "allow_examples"),
        ("allow_threshold: 0.9", "examples: [known/a.png]\n", "allow_examples"),
        ("pdq_max_distance: 12", "", "hash_lists"),
        ("pdq_max_distance: 12", "sha256_lists: [l.csv]\n", "hash_lists"),
    ],
)
def test_a_setting_without_what_it_applies_to_is_a_problem(
    policies: Path, setting: str, beside: str, needs: str
) -> None:
    """A threshold of nothing would be silently without effect: refused at its key."""
    put(policies / "known/a.png", shape_png("red", "square"))
    put(policies / "allowed/a.png", shape_png("blue", "circle"))
    put(policies / "l.csv", HASH_A)
    text = PLAIN + beside + f"{setting}\n"
    key = setting.partition(":")[0]
    line = text.count("\n")
    assert one_problem(policies, text) == (
        f"p.yaml:{line}: key '{key}': applies to {needs}, and this policy has none"
    )


def test_a_threshold_without_descriptions_is_a_problem(policies: Path) -> None:
    put(policies / "known/a.png", b"a")
    text = HEAD + "examples: [known/]\nthreshold: 0.3\n"
    assert one_problem(policies, text) == (
        "p.yaml:4: key 'threshold': applies to descriptions, and this policy has none"
    )


def test_descriptions_beside_examples_still_need_a_threshold(policies: Path) -> None:
    put(policies / "known/a.png", b"a")
    text = HEAD + "examples: [known/]\ndescriptions: [a knife]\n"
    assert one_problem(policies, text) == "p.yaml: missing required key 'threshold'"


def test_a_policy_without_a_file_location_cannot_name_files() -> None:
    text = HEAD + "examples: [a.png]\nallow_examples: [b.png]\nhash_lists: [l.csv]\n"
    text += "sha256_lists: [s.csv]\n"
    with pytest.raises(PolicyError) as info:
        parse_policy("p", text, "p.yaml")
    message = "names files: only a policy read from a file can have it"
    assert info.value.problems == [
        f"p.yaml:4: key 'allow_examples': {message}",
        f"p.yaml:3: key 'examples': {message}",
        f"p.yaml:5: key 'hash_lists': {message}",
        f"p.yaml:6: key 'sha256_lists': {message}",
    ]


def test_without_a_file_location_thresholds_apply_to_nothing() -> None:
    text = PLAIN + "example_threshold: 0.8\nallow_threshold: 0.9\npdq_max_distance: 12\n"
    with pytest.raises(PolicyError) as info:
        parse_policy("p", text, "p.yaml")
    assert info.value.problems == [
        "p.yaml:6: key 'example_threshold': applies to examples, and this policy has none",
        "p.yaml:7: key 'allow_threshold': applies to allow_examples, and this policy has none",
        "p.yaml:8: key 'pdq_max_distance': applies to hash_lists, and this policy has none",
    ]


def test_settings_with_what_they_apply_to_are_kept(policies: Path, known_files: str) -> None:
    text = PLAIN + known_files + "example_threshold: 0.8\nallow_threshold: 0.9\n"
    known = load(policies, text + "pdq_max_distance: 12\n").known
    assert (known.example_threshold, known.allow_threshold, known.pdq_max_distance) == (
        0.8,
        0.9,
        12,
    )
    assert [e.name for e in known.examples] == ["known/a.png"]
    assert [e.name for e in known.allow_examples] == ["allowed/b.png"]
    assert [h.name for h in known.hash_lists] == ["lists/l.csv"]


# -- thresholds: defaults and bounds ----------------------------------------------------------


def test_the_defaults(policies: Path) -> None:
    put(policies / "known/a.png", b"a")
    put(policies / "l.csv", HASH_A)
    known = load(policies, HEAD + "examples: [known/]\nhash_lists: [l.csv]\n").known
    assert known.example_threshold == DEFAULT_EXAMPLE_THRESHOLD == 0.90
    assert known.allow_threshold == DEFAULT_ALLOW_THRESHOLD == 0.95
    assert known.pdq_max_distance == DEFAULT_PDQ_MAX_DISTANCE == 31
    assert parse_policy("p", PLAIN, "p.yaml").known == NO_KNOWN_CONTENT


@pytest.mark.parametrize("key", ["example_threshold", "allow_threshold"])
@pytest.mark.parametrize(("value", "expected"), [("-1", -1.0), ("1", 1.0), ("0.5", 0.5)])
def test_a_similarity_from_minus_one_to_one_is_accepted(
    policies: Path, known_files: str, key: str, value: str, expected: float
) -> None:
    known = load(policies, PLAIN + known_files + f"{key}: {value}\n").known
    assert getattr(known, key) == expected
    assert isinstance(getattr(known, key), float)


@pytest.mark.parametrize("key", ["example_threshold", "allow_threshold"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1.01", "must be between -1 and 1 (a cosine similarity), got 1.01"),
        ("-1.5", "must be between -1 and 1 (a cosine similarity), got -1.5"),
        ("2", "must be between -1 and 1 (a cosine similarity), got 2"),
        ("true", "must be a number, got True"),
        ("'0.9'", "must be a number, got '0.9'"),
        (".nan", "must be a number, got nan"),
        (".inf", "must be a number, got inf"),
        ("[0.9]", "must be a number, got [0.9]"),
    ],
)
def test_a_similarity_out_of_bounds_or_not_a_number_is_a_problem(
    policies: Path, known_files: str, key: str, value: str, message: str
) -> None:
    assert problems(policies, PLAIN + known_files + f"{key}: {value}\n") == [
        f"p.yaml:9: key '{key}': {message}"
    ]


@pytest.mark.parametrize("value", [0, 1, 31, 255, 256])
def test_a_pdq_distance_of_0_to_256_bits_is_accepted(
    policies: Path, known_files: str, value: int
) -> None:
    known = load(policies, PLAIN + known_files + f"pdq_max_distance: {value}\n").known
    assert known.pdq_max_distance == value


@pytest.mark.parametrize("value", ["-1", "257", "31.0", "true", "false", "'31'", "[31]", "null"])
def test_a_pdq_distance_outside_0_to_256_or_not_whole_is_a_problem(
    policies: Path, known_files: str, value: str
) -> None:
    assert problems(policies, PLAIN + known_files + f"pdq_max_distance: {value}\n") == [
        "p.yaml:9: key 'pdq_max_distance': must be a whole number of bits, 0 to 256"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("known/", "must be a non-empty list of file or folder names"),
        ("[]", "must be a non-empty list of file or folder names"),
        ("[5]", "entry 1 must be a file or folder name"),
        ("[known/, '  ']", "entry 2 must be a file or folder name"),
        ("[known/, [a.png]]", "entry 2 must be a file or folder name"),
        ('["a\\0.png"]', "entry 1 must be a file or folder name"),
    ],
)
def test_a_file_key_must_be_a_list_of_names(policies: Path, value: str, message: str) -> None:
    put(policies / "known/a.png", b"a")
    assert one_problem(policies, HEAD + f"examples: {value}\n") == (
        f"p.yaml:3: key 'examples': {message}"
    )


# -- hostile files ----------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Files beside the policy directory, not in it."""
    directory = tmp_path / "outside"
    put(directory / "secret.png", b"not the policy's")
    put(directory / "list.csv", HASH_A)
    return directory


@pytest.mark.parametrize("key", ["examples", "allow_examples"])
def test_an_example_outside_the_policy_directory_is_refused(
    policies: Path, outside: Path, key: str
) -> None:
    rule = "threshold: 0.3\ndescriptions: [x]\n" if key == "allow_examples" else ""
    os.symlink(outside / "secret.png", policies / "link.png")
    os.symlink(outside, policies / "linked-folder")
    (policies / "known").mkdir()
    os.symlink(outside / "secret.png", policies / "known/inner-link.png")
    for entry, shown in [
        ("../outside/secret.png", "../outside/secret.png: lies outside the policy directory"),
        (str(outside / "secret.png"), f"{outside}/secret.png: lies outside the policy directory"),
        ("link.png", "link.png: lies outside the policy directory"),
        ("linked-folder/", "linked-folder/: lies outside the policy directory"),
        ("../outside/", "../outside/: lies outside the policy directory"),
        # a link in a folder is checked as it is read, and named as the folder names it
        ("known/", "known/inner-link.png: lies outside the policy directory, not read"),
    ]:
        line = 5 if rule else 3
        found = one_problem(policies, HEAD + rule + f"{key}: ['{entry}']\n")
        assert found == f"p.yaml:{line}: key '{key}': {shown}", entry


@pytest.mark.parametrize("key", ["hash_lists", "sha256_lists"])
def test_a_list_outside_the_policy_directory_is_refused(
    policies: Path, outside: Path, key: str
) -> None:
    os.symlink(outside / "list.csv", policies / "link.csv")
    os.symlink(outside, policies / "linked-folder")
    for entry, shown in [
        ("../outside/list.csv", "../outside/list.csv"),
        (str(outside / "list.csv"), "../outside/list.csv"),  # named from the policy's folder
        ("link.csv", "link.csv"),  # named as written, wherever it leads
        ("linked-folder/list.csv", "linked-folder/list.csv"),
    ]:
        found = one_problem(policies, HEAD + f"{key}: ['{entry}']\n")
        assert found == (
            f"p.yaml:3: key '{key}': {shown}: lies outside the policy directory, not read"
        ), entry


def test_a_link_inside_the_directory_is_read_under_its_own_name(policies: Path) -> None:
    put(policies / "store/a.png", b"a")
    put(policies / "store/l.csv", f"{HASH_A},x\n")
    os.symlink("store/a.png", policies / "alias.png")
    os.symlink("store/l.csv", policies / "alias.csv")
    known = load(policies, HEAD + "examples: [alias.png]\nhash_lists: [alias.csv]\n").known
    assert [(e.name, e.sha256) for e in known.examples] == [("alias.png", digest(b"a"))]
    assert known.examples[0].path == os.path.realpath(policies / "store/a.png")  # read there
    assert [h.name for h in known.hash_lists] == ["alias.csv"]
    assert known.hash_lists[0].entries == ("alias.csv:x",)


@pytest.mark.parametrize(
    ("key", "entry"),
    [
        ("examples", ".hidden/a.png"),
        ("examples", ".hidden/"),
        ("allow_examples", "known/.a.png"),
        ("hash_lists", "lists/.l.csv"),
        ("sha256_lists", "./lists/../lists/.l.csv"),
        ("examples", "..data/known/"),  # a ConfigMap's current generation, named directly
    ],
)
def test_a_hidden_file_or_folder_is_refused(policies: Path, key: str, entry: str) -> None:
    """Hidden files and folders are not watched for changes: a policy must not name one."""
    put(policies / ".hidden/a.png", b"a")
    put(policies / "known/.a.png", b"a")
    put(policies / "known/b.png", b"b")
    put(policies / "lists/.l.csv", HASH_A)
    put(policies / "..data/known/a.png", b"a")
    rule = "threshold: 0.3\ndescriptions: [x]\n" if key == "allow_examples" else ""
    line = 5 if rule else 3
    assert one_problem(policies, HEAD + rule + f"{key}: ['{entry}']\n") == (
        f"p.yaml:{line}: key '{key}': {entry}: a hidden file or folder; rename it"
    )


@pytest.fixture
def fifo(policies: Path) -> Iterator[Path]:
    """A FIFO named like an image. Cleanup opens its writing end once, which releases a reader
    stuck in open() should a regression block there."""
    path = policies / "known/pipe.png"
    path.parent.mkdir()
    os.mkfifo(path)
    yield path
    with contextlib.suppress(OSError):  # ENXIO: no reader is waiting, the good case
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.timeout(20)
@pytest.mark.parametrize("entry", ["known/pipe.png", "known/"], ids=["named", "in-a-folder"])
def test_a_fifo_named_as_an_example_is_a_problem_not_a_hang(
    policies: Path, fifo: Path, entry: str
) -> None:
    assert one_problem(policies, HEAD + f"examples: [{entry}]\n") == (
        "p.yaml:3: key 'examples': known/pipe.png: is a FIFO, not a regular file"
    )


@pytest.mark.timeout(20)
def test_a_fifo_named_as_a_hash_list_is_a_problem_not_a_hang(policies: Path, fifo: Path) -> None:
    assert one_problem(policies, HEAD + "hash_lists: [known/pipe.png]\n") == (
        "p.yaml:3: key 'hash_lists': known/pipe.png: is a FIFO, not a regular file"
    )


@pytest.mark.timeout(20)
def test_a_fifo_in_a_policy_directory_does_not_hang_the_load(policies: Path, fifo: Path) -> None:
    put(policies / "known/a.png", b"a")
    put(policies / "p.yaml", HEAD + "examples: [known/]\n")
    with pytest.raises(PolicyError) as info:
        load_policy_dir(policies)
    assert info.value.problems == [
        "p.yaml:3: key 'examples': known/pipe.png: is a FIFO, not a regular file"
    ]


@pytest.mark.parametrize("key", ["hash_lists", "sha256_lists"])
def test_a_directory_named_as_a_list_is_a_problem(policies: Path, key: str) -> None:
    (policies / "lists").mkdir()
    assert one_problem(policies, HEAD + f"{key}: [lists]\n") == (
        f"p.yaml:3: key '{key}': lists: is a directory, not a regular file"
    )


def test_a_missing_example_or_list_is_a_problem(policies: Path) -> None:
    text = HEAD + "examples: [gone.png]\nhash_lists: [gone.csv]\nsha256_lists: [also-gone.csv]\n"
    assert problems(policies, text) == [
        "p.yaml:3: key 'examples': gone.png: no such file or folder",
        "p.yaml:4: key 'hash_lists': gone.csv: cannot read: No such file or directory",
        "p.yaml:5: key 'sha256_lists': also-gone.csv: cannot read: No such file or directory",
    ]


def test_a_dangling_link_is_a_problem(policies: Path) -> None:
    os.symlink("nowhere.png", policies / "dangling.png")
    assert one_problem(policies, HEAD + "examples: [dangling.png]\n") == (
        "p.yaml:3: key 'examples': dangling.png: cannot read: No such file or directory"
    )


def test_an_example_over_the_size_limit_is_a_problem(
    policies: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(known_content, "MAX_EXAMPLE_BYTES", 100)
    put(policies / "known/fits.png", b"x" * 100)
    put(policies / "known/large.png", b"x" * 101)
    assert one_problem(policies, HEAD + "examples: [known/]\n") == (
        "p.yaml:3: key 'examples': known/large.png: larger than 100 bytes (9.53674e-05 MiB), "
        "the limit for an example image"
    )
    policy = load(policies, HEAD + "examples: [known/fits.png]\n")
    assert [e.name for e in policy.known.examples] == ["known/fits.png"]


def test_the_examples_of_a_policy_share_one_byte_budget(
    policies: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(known_content, "MAX_EXAMPLE_BYTES_PER_POLICY", 250)
    put(policies / "known/a.png", b"a" * 100)
    put(policies / "known/b.png", b"b" * 100)
    put(policies / "allowed/c.png", b"c" * 100)
    rule = "threshold: 0.3\ndescriptions: [x]\n"
    assert len(load(policies, HEAD + rule + "examples: [known/]\n").known.examples) == 2
    text = HEAD + rule + "examples: [known/]\nallow_examples: [allowed/]\n"
    assert one_problem(policies, text) == (
        "p.yaml:6: key 'allow_examples': the examples add up to over 250 bytes"
    )


def test_a_list_over_the_size_limit_is_a_problem(
    policies: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(known_content, "MAX_HASH_LIST_BYTES", 100)
    put(policies / "l.csv", f"{HASH_A}\n{HASH_B}\n")  # 130 bytes
    assert one_problem(policies, HEAD + "hash_lists: [l.csv]\n") == (
        "p.yaml:3: key 'hash_lists': l.csv: larger than 100 bytes (9.53674e-05 MiB), "
        "the limit for a hash list"
    )


def test_too_many_examples_is_a_problem(policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(known_content, "MAX_EXAMPLES_PER_KEY", 3)
    for name in "abcd":
        put(policies / f"known/{name}.png", name.encode())
    assert one_problem(policies, HEAD + "examples: [known/]\n") == (
        "p.yaml:3: key 'examples': names more than 3 images"
    )
    text = HEAD + "examples: [known/a.png, known/b.png, known/c.png, known/d.png]\n"
    assert one_problem(policies, text) == (
        "p.yaml:3: key 'examples': has 4 entries, at most 3 are allowed"
    )
    (policies / "known/d.png").unlink()
    assert len(load(policies, HEAD + "examples: [known/]\n").known.examples) == 3


def test_too_many_lists_is_a_problem(policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(known_content, "MAX_LISTS_PER_KEY", 2)
    for name in "abc":
        put(policies / f"{name}.csv", HASH_A)
    assert one_problem(policies, HEAD + "sha256_lists: [a.csv, b.csv, c.csv]\n") == (
        "p.yaml:3: key 'sha256_lists': has 3 entries, at most 2 are allowed"
    )


def test_the_lists_of_a_policy_share_one_entry_budget(
    policies: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(known_content, "MAX_HASH_ENTRIES_PER_POLICY", 3)
    put(policies / "two.csv", f"{HASH_A}\n{HASH_B}\n")
    put(policies / "four.csv", f"{HASH_A}\n{HASH_B}\n" * 2)
    assert load(policies, HEAD + "hash_lists: [two.csv]\n").known.hash_count == 2
    assert one_problem(policies, HEAD + "hash_lists: [two.csv]\nsha256_lists: [two.csv]\n") == (
        "p.yaml:4: key 'sha256_lists': the lists add up to over 3 entries"
    )
    assert one_problem(policies, HEAD + "hash_lists: [four.csv]\n") == (
        "p.yaml:3: key 'hash_lists': four.csv: over 3 entries"
    )


# -- hash lists -------------------------------------------------------------------------------


def test_a_hash_list_skips_comments_and_blank_lines_and_accepts_any_case() -> None:
    text = (
        "# known bad, from the exchange\n"
        "\n"
        f"{HASH_A.upper()},case-1\n"
        "   \n"
        f"  {HASH_B}  ,  spaced id  \n"
        "  # an indented comment\n"
        f"{HASH_A}\r\n"
        f"{HASH_B},id,with,commas\n"
    )
    hash_list = parse_hash_list("lists/l.csv", text.encode(), pdq=True)
    assert hash_list.name == "lists/l.csv"
    assert hash_list.hexes == (HASH_A, HASH_B, HASH_A, HASH_B)
    assert hash_list.entries == (
        "lists/l.csv:case-1",
        "lists/l.csv:spaced id",
        f"lists/l.csv:{HASH_A}",  # without an id, the hash names it
        "lists/l.csv:id,with,commas",
    )
    assert hash_list.digest == digest(text.encode())
    assert hash_list.rows.shape == (4, 4)  # core.pdq.hash_rows: [4, N]
    assert hash_list.rows.dtype == np.uint64
    assert hashes_in(hash_list.rows) == [pdq_bytes(h) for h in hash_list.hexes]


def test_a_sha256_list_keeps_hexes_and_no_rows() -> None:
    hash_list = parse_hash_list("s.csv", f"{HASH_A.upper()},x\n".encode(), pdq=False)
    assert hash_list.hexes == (HASH_A,)
    assert hash_list.entries == ("s.csv:x",)
    assert hash_list.rows.shape == (4, 0)


def test_bad_lines_are_named_by_file_and_line() -> None:
    text = f"# header\n{HASH_A}\nnot a hash,x\n{HASH_A[:-1]}\n{HASH_A}0\n{'g' * 64}\n0x{HASH_A}\n"
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", text.encode(), pdq=True)
    assert info.value.problems == [
        "l.csv:3: a hash must be 64 hex digits, got 'not a hash'",
        f"l.csv:4: a hash must be 64 hex digits, got '{HASH_A[:-1]}'",
        f"l.csv:5: a hash must be 64 hex digits, got '{HASH_A}0'",
        f"l.csv:6: a hash must be 64 hex digits, got '{'g' * 64}'",
        f"l.csv:7: a hash must be 64 hex digits, got '0x{HASH_A}'",
    ]


def test_bad_lines_in_a_policy_are_one_problem_of_its_key(policies: Path) -> None:
    put(policies / "lists/l.csv", f"{HASH_A}\nbad\n")
    assert one_problem(policies, HEAD + "sha256_lists: [lists/l.csv]\n") == (
        "p.yaml:3: key 'sha256_lists': lists/l.csv:2: a hash must be 64 hex digits, got 'bad'"
    )


def test_the_problems_of_a_list_are_capped() -> None:
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", b"bad\n" * 5000, pdq=True)
    found = info.value.problems
    assert len(found) == known_content.MAX_LIST_PROBLEMS + 1
    assert found[0] == "l.csv:1: a hash must be 64 hex digits, got 'bad'"
    assert found[9] == "l.csv:10: a hash must be 64 hex digits, got 'bad'"
    assert found[-1] == "l.csv: more problems not shown"


def test_a_long_bad_line_is_shown_cut_short() -> None:
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", b"x" * 100_000, pdq=True)
    [problem] = info.value.problems
    assert problem == f"l.csv:1: a hash must be 64 hex digits, got '{'x' * 77}...'"


def test_exactly_the_most_problems_shown_claims_no_more() -> None:
    most = known_content.MAX_LIST_PROBLEMS
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", b"bad\n" * most, pdq=True)
    assert info.value.problems == [
        f"l.csv:{n}: a hash must be 64 hex digits, got 'bad'" for n in range(1, most + 1)
    ]
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", b"bad\n" * (most + 1), pdq=True)
    assert len(info.value.problems) == most + 1
    assert info.value.problems[most - 1] == f"l.csv:{most}: a hash must be 64 hex digits, got 'bad'"
    assert info.value.problems[-1] == "l.csv: more problems not shown"


def test_a_leading_byte_order_mark_is_no_part_of_the_first_hash() -> None:
    data = f"\ufeff{HASH_A},first\n{HASH_B}\n".encode()
    assert data.startswith(b"\xef\xbb\xbf")
    hash_list = parse_hash_list("l.csv", data, pdq=True)
    assert hash_list.hexes == (HASH_A, HASH_B)
    assert hash_list.entries == ("l.csv:first", f"l.csv:{HASH_B}")
    assert hash_list.digest == digest(data)  # the version follows the bytes as they are
    commented = parse_hash_list("l.csv", f"\ufeff# a header\n{HASH_A}\n".encode(), pdq=False)
    assert commented.hexes == (HASH_A,)


def test_a_byte_order_mark_after_the_start_is_a_problem() -> None:
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", f"{HASH_A}\n\ufeff{HASH_B}\n".encode(), pdq=True)
    # shown escaped: an invisible character in a line is named, not hidden
    assert info.value.problems == [f"l.csv:2: a hash must be 64 hex digits, got '\\ufeff{HASH_B}'"]


def test_the_offset_of_a_bad_byte_after_a_byte_order_mark_is_its_offset_in_the_file() -> None:
    data = b"\xef\xbb\xbf" + f"{HASH_A},caf\xe9\n".encode("latin-1")
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", data, pdq=True)
    assert info.value.problems == ["l.csv: not UTF-8 text (offset 71)"]  # 68 after the mark


def test_a_hash_list_with_a_byte_order_mark_is_read_in_a_policy(policies: Path) -> None:
    put(policies / "lists/l.csv", b"\xef\xbb\xbf" + f"{HASH_A},x\r\n".encode())
    known = load(policies, HEAD + "hash_lists: [lists/l.csv]\nsha256_lists: [lists/l.csv]\n").known
    assert known.hash_lists[0].entries == known.sha256_lists[0].entries == ("lists/l.csv:x",)


@pytest.mark.parametrize("separator", ["\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"])
def test_only_a_newline_ends_a_line(separator: str) -> None:
    """Line numbers are an editor's: other Unicode line breaks are part of the line (and, in
    an id, refused like any control character)."""
    data = f"{HASH_A},x{separator}y\n{HASH_B},2\r\n{HASH_A},3\r{HASH_B},4\n".encode()
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", data, pdq=True)
    assert info.value.problems == ["l.csv:1: an id must not hold control characters"]
    fine = f"{HASH_A},1\n{HASH_B},2\r\n{HASH_A},3\r{HASH_B},4\n".encode()
    assert parse_hash_list("l.csv", fine, pdq=True).entries == tuple(
        f"l.csv:{n}" for n in range(1, 5)
    )


@pytest.mark.parametrize("character", ["\x00", "\t", "\x1b", "\x7f", "\x9b", "\u200b", "\u202e"])
def test_an_id_with_a_control_or_format_character_is_a_problem(character: str) -> None:
    """Ids come from outside parties and reach logs and terminals."""
    data = f"{HASH_A},ok\n{HASH_B},bad{character}id\n".encode()
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", data, pdq=False)
    assert info.value.problems == ["l.csv:2: an id must not hold control characters"]


def test_an_id_of_other_scripts_and_spaces_is_kept() -> None:
    data = f"{HASH_A},  café 名前 — id #7  \n".encode()
    assert parse_hash_list("l.csv", data, pdq=True).entries == ("l.csv:café 名前 — id #7",)


def test_a_list_of_too_many_lines_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(known_content, "MAX_LIST_LINES", 3)
    at_most = f"# one\n\n{HASH_A}\n".encode()
    assert parse_hash_list("l.csv", at_most, pdq=True).hexes == (HASH_A,)
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", at_most + b"# comments and blank lines count\n", pdq=True)
    assert info.value.problems == ["l.csv: over 3 lines"]


def test_a_list_that_is_not_utf8_is_a_problem() -> None:
    data = f"{HASH_A},caf\xe9\n".encode("latin-1")
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", data, pdq=True)
    assert info.value.problems == ["l.csv: not UTF-8 text (offset 68)"]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "   \n# x\n\t\n"])
def test_a_list_without_hashes_is_a_problem(text: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", text.encode(), pdq=False)
    assert info.value.problems == ["l.csv: holds no hashes"]


def test_an_id_of_at_most_128_characters_is_kept() -> None:
    most = known_content.MAX_ENTRY_ID_CHARS
    assert most == 128
    kept = parse_hash_list("l.csv", f"{HASH_A},{'i' * most}\n".encode(), pdq=True)
    assert kept.entries == (f"l.csv:{'i' * most}",)
    with pytest.raises(PolicyError) as info:
        parse_hash_list("l.csv", f"{HASH_A}\n{HASH_B},{'i' * (most + 1)}\n".encode(), pdq=True)
    assert info.value.problems == ["l.csv:2: an id is at most 128 characters"]


def test_a_list_in_a_policy_keeps_its_entries(policies: Path) -> None:
    put(policies / "lists/pdq.csv", f"{HASH_A},a\n{HASH_B}\n")
    put(policies / "lists/sha.csv", f"{HASH_B},s\n")
    text = HEAD + "hash_lists: [lists/pdq.csv]\npdq_max_distance: 12\n"
    known = load(policies, text + "sha256_lists: [lists/sha.csv]\n").known
    [pdq_list] = known.hash_lists
    [sha_list] = known.sha256_lists
    assert pdq_list.entries == ("lists/pdq.csv:a", f"lists/pdq.csv:{HASH_B}")
    assert sha_list.entries == ("lists/sha.csv:s",)
    assert known.pdq_max_distance == 12
    assert known.hash_count == 3


# -- unreadable folders -----------------------------------------------------------------------


def test_a_folder_that_cannot_be_listed_is_a_problem_of_its_key(
    policies: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(policies / "known/a.png", b"a")
    unreadable = os.path.realpath(policies / "known")
    listing = os.scandir

    def scandir(path: str) -> Iterator[os.DirEntry[str]]:  # chmod 000 does not stop root
        if os.fspath(path) == unreadable:
            raise PermissionError(13, "Permission denied", path)
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert one_problem(policies, HEAD + "examples: [known/]\n") == (
        "p.yaml:3: key 'examples': known/: cannot list the folder: Permission denied"
    )
    put(policies / "p.yaml", HEAD + "examples: [known/]\n")
    with pytest.raises(PolicyError) as info:
        load_policy_dir(policies)
    assert info.value.problems == [
        "p.yaml:3: key 'examples': known/: cannot list the folder: Permission denied"
    ]


# -- the policy version -----------------------------------------------------------------------


def test_a_policy_without_known_content_keeps_its_version(policies: Path) -> None:
    from_text = parse_policy("knives", PLAIN, "knives.yaml")
    from_file = load(policies, PLAIN, "knives.yaml")
    assert from_text.version == from_file.version == PLAIN_VERSION_BEFORE_KNOWN_CONTENT


def test_thresholds_written_at_their_defaults_keep_the_version(
    policies: Path, known_files: str
) -> None:
    defaults = "example_threshold: 0.9\nallow_threshold: 0.95\npdq_max_distance: 31\n"
    plain = load(policies, PLAIN + known_files).version
    assert load(policies, PLAIN + known_files + defaults).version == plain
    assert load(policies, PLAIN + known_files + "pdq_max_distance: 30\n").version != plain


def test_a_demo_policy_has_the_same_version_however_it_is_read() -> None:
    for path in sorted(DEMO_POLICIES_DIR.glob("*.yaml")):
        by_file = parse_policy_file(path, DEMO_POLICIES_DIR)
        again = parse_policy_file(path, DEMO_POLICIES_DIR)
        by_text = parse_policy(path.stem, path.read_text(), path.name)
        assert by_file.version == again.version == by_text.version, path.name
        assert by_file.known == NO_KNOWN_CONTENT
    loaded = load_policy_dir(DEMO_POLICIES_DIR)
    for policy in loaded.policies:
        path = DEMO_POLICIES_DIR / f"{policy.id}.yaml"
        assert policy.version == parse_policy(policy.id, path.read_text(), path.name).version


def test_the_version_follows_each_example_and_list_by_content(policies: Path) -> None:
    image = put(policies / "known/a.png", b"first")
    hashes = put(policies / "lists/l.csv", f"{HASH_A},a\n")
    text = HEAD + "examples: [known/]\nhash_lists: [lists/l.csv]\n"
    first = load(policies, text).version
    assert load(policies, text).version == first
    assert first != load(policies, HEAD + "hash_lists: [lists/l.csv]\n").version

    image.write_bytes(b"second")
    changed_example = load(policies, text).version
    image.write_bytes(b"first")
    assert load(policies, text).version == first
    hashes.write_text(f"# a comment is content too\n{HASH_A},a\n")
    changed_list = load(policies, text).version
    hashes.write_text(f"{HASH_A},a\n")
    assert load(policies, text).version == first
    put(policies / "known/b.png", b"another")
    added = load(policies, text).version
    assert len({first, changed_example, changed_list, added}) == 4


@pytest.mark.parametrize(
    "extra",
    ["example_threshold: 0.8\n", "allow_threshold: 0.9\n", "pdq_max_distance: 10\n"],
)
def test_the_version_follows_the_known_content_thresholds(
    policies: Path, known_files: str, extra: str
) -> None:
    text = HEAD + known_files
    assert load(policies, text + extra).version != load(policies, text).version


def test_files_behind_a_configmap_link_are_named_as_the_policy_names_them(
    policies: Path,
) -> None:
    """A ConfigMap mount: each item a link through ..data to the current generation."""
    text = HEAD + "examples: [known/]\nhash_lists: [lists/l.csv]\n"
    for generation in ("..2026_11_24_10_00_00.1", "..2026_11_24_11_00_00.2"):
        put(policies / generation / "known/a.png", b"a")
        put(policies / generation / "lists/l.csv", HASH_A)
        put(policies / generation / "p.yaml", text)
    os.symlink("..2026_11_24_10_00_00.1", policies / "..data")
    for name in ("known", "lists", "p.yaml"):
        os.symlink(f"..data/{name}", policies / name)
    first = parse_policy_file(policies / "p.yaml", policies)
    (policies / "..data").unlink()  # the update: the same files, a new generation
    os.symlink("..2026_11_24_11_00_00.2", policies / "..data")
    second = parse_policy_file(policies / "p.yaml", policies)
    assert [e.name for e in first.known.examples] == ["known/a.png"]
    assert first.known.hash_lists[0].entries == (f"lists/l.csv:{HASH_A}",)
    assert second.version == first.version
    assert [e.name for e in second.known.examples] == ["known/a.png"]
    # read from the generation the link led to when the policy was read
    assert first.known.examples[0].path.startswith(str(policies / "..2026_11_24_10_00_00.1"))
    assert second.known.examples[0].path.startswith(str(policies / "..2026_11_24_11_00_00.2"))
    (policies / "..2026_11_24_11_00_00.2/known/a.png").write_bytes(b"changed")
    assert parse_policy_file(policies / "p.yaml", policies).version != first.version


def test_problems_of_known_content_fail_the_directory_naming_file_and_line(
    policies: Path,
) -> None:
    for path in DEMO_POLICIES_DIR.glob("*.yaml"):
        shutil.copy(path, policies / path.name)
    put(policies / "known/a.png", b"a")
    put(policies / "lists/bad.csv", "nope\n")
    put(policies / "good.yaml", HEAD + "examples: [known/]\n")
    put(policies / "bad.yaml", HEAD + "hash_lists: [lists/bad.csv]\npdq_max_distance: 300\n")
    with pytest.raises(PolicyError) as info:
        load_policy_dir(policies)
    assert info.value.problems == [
        "bad.yaml:3: key 'hash_lists': lists/bad.csv:1: a hash must be 64 hex digits, got 'nope'",
        "bad.yaml:4: key 'pdq_max_distance': must be a whole number of bits, 0 to 256",
    ]
    (policies / "bad.yaml").unlink()
    loaded = load_policy_dir(policies)  # the subfolders are not policy files
    assert "good" in loaded.ids
    assert [e.name for e in loaded.policies[loaded.index_of("good")].known.examples] == [
        "known/a.png"
    ]


def test_a_location_names_where_files_are(policies: Path) -> None:
    """parse_policy reads files from `base`, inside `root` only, and names them from `base` as
    the policy writes them."""
    put(policies / "sub/known/a.png", b"a")
    put(policies / "top.png", b"top")
    location = Location(policies / "sub", os.path.realpath(policies))
    policy = parse_policy("p", HEAD + "examples: [known/, ../top.png]\n", "p.yaml", location)
    assert [e.name for e in policy.known.examples] == ["known/a.png", "../top.png"]
    assert policy.known.examples[1].path == os.path.realpath(policies / "top.png")
    narrower = Location(policies / "sub", os.path.realpath(policies / "sub"))
    with pytest.raises(PolicyError) as info:
        parse_policy("p", HEAD + "examples: [known/, ../top.png]\n", "p.yaml", narrower)
    assert info.value.problems == [
        "p.yaml:3: key 'examples': ../top.png: lies outside the policy directory"
    ]
