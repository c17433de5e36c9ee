"""The lab's owner files (portbroker/testing/lab.py, OWNERS_DIR): a lab's file
stays until its teardown has removed everything, so that what a failed
teardown left is swept once its process has ended. Built with the commands
stubbed (no namespace is made), so one namespace's deletion can be made to
fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from portbroker.testing import lab as lab_module
from portbroker.testing.lab import Lab, LabError, Variant, open_roaming


@pytest.fixture
def stubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Labs built without running a command; the namespaces named in the set
    yielded fail to delete (``ip netns delete`` errs), the others are deleted."""
    failing: set[str] = set()

    def delete(created: list[str]) -> list[str]:
        errors = []
        while created:
            ns = created.pop()
            if ns in failing:
                errors.append(f"ip netns delete {ns}: Device or resource busy")
        return errors

    monkeypatch.setattr(lab_module, "OWNERS_DIR", tmp_path / "owners")
    monkeypatch.setattr(lab_module, "_run", lambda *_args, **_kwargs: "")
    monkeypatch.setattr(lab_module, "_delete_namespaces", delete)
    monkeypatch.setattr(lab_module, "_check_lab_possible", lambda: None)
    monkeypatch.setattr(lab_module._Blackholes, "remove_all", lambda _self: None)
    return failing


def owners(tmp_path: Path) -> set[str]:
    return {path.name for path in (tmp_path / "owners").iterdir()}


def test_a_lab_whose_own_namespace_was_not_deleted_keeps_its_owner_file(
    tmp_path: Path, stubbed: set[str]
) -> None:
    """Lab.close raised for the gw namespace it could not delete, but its own
    wan (the same suffix) had been deleted and removed the owner file: what
    was left was nobody's, and no sweep would ever remove it."""
    lab = Lab(Variant.NONE, "abc123", tmp_path)
    lab._build()
    assert owners(tmp_path) == {"abc123"}
    stubbed.add(lab.gw_ns)
    with pytest.raises(LabError, match="lab teardown incomplete"):
        lab.close()
    assert owners(tmp_path) == {"abc123"}
    stubbed.clear()
    lab._created_ns.append(lab.gw_ns)  # what is left, deleted at last
    lab.close()
    assert owners(tmp_path) == set()


def test_a_roaming_lan_whose_switch_was_not_deleted_keeps_its_owner_file(
    tmp_path: Path, stubbed: set[str]
) -> None:
    """open_roaming's lan switch has the wan's suffix: the wan's teardown
    removed the owner file though the switch's namespace was still there (and
    the switch's error was dropped: a stack callback's result is ignored)."""
    roaming_lab = open_roaming(Variant.NONE, Variant.NONE, workdir=tmp_path)
    roaming = roaming_lab.__enter__()
    stubbed.add(roaming.lan_switch_ns)
    suffix = roaming.lan_switch_ns.rsplit("-", 1)[1]
    assert suffix in owners(tmp_path)
    with pytest.raises(LabError, match="ip netns delete pb-sw-"):
        roaming_lab.__exit__(None, None, None)
    assert owners(tmp_path) == {suffix}


def test_a_namespace_made_as_an_interrupt_came_is_deleted_with_the_lab(
    tmp_path: Path, stubbed: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (or a test's timeout) while ``ip netns add`` ran: the namespace
    was made, but not yet listed as the lab's, so its teardown left it and
    removed the owner file; nothing would ever delete it."""
    made: list[str] = []
    deleted: list[str] = []

    def run(argv: list[str], **_kwargs: object) -> str:
        if argv[:3] == ["ip", "netns", "add"]:
            made.append(argv[3])
            if argv[3].startswith("pb-gw-"):
                raise KeyboardInterrupt  # once ip has made it
        return ""

    def delete(created: list[str]) -> list[str]:
        deleted.extend(reversed(created))
        created.clear()
        return []

    monkeypatch.setattr(lab_module, "_run", run)
    monkeypatch.setattr(lab_module, "_delete_namespaces", delete)
    lab = Lab(Variant.NONE, "abc123", tmp_path)
    with pytest.raises(KeyboardInterrupt):
        lab._build()
    lab.close()
    assert sorted(deleted) == sorted(made) == ["pb-gw-abc123", "pb-wan-abc123"]


def test_a_namespace_ip_refused_to_make_is_not_the_labs_to_delete(
    tmp_path: Path, stubbed: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ip netns add`` failing (the name taken: another lab's) made nothing
    of this lab's, so its teardown must not delete that name."""
    deleted: list[str] = []

    def run(argv: list[str], **_kwargs: object) -> str:
        if argv[:3] == ["ip", "netns", "add"] and argv[3].startswith("pb-gw-"):
            raise LabError(f"{' '.join(argv)} failed (1): File exists")
        return ""

    def delete(created: list[str]) -> list[str]:
        deleted.extend(created)
        created.clear()
        return []

    monkeypatch.setattr(lab_module, "_run", run)
    monkeypatch.setattr(lab_module, "_delete_namespaces", delete)
    lab = Lab(Variant.NONE, "abc123", tmp_path)
    with pytest.raises(LabError, match="File exists"):
        lab._build()
    lab.close()
    assert deleted == ["pb-wan-abc123"]
    assert owners(tmp_path) == set()
