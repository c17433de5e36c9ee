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
