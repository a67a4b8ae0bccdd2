"""The registry's directory discipline, without artifacts (tests/test_serving.py promotes real
ones): promote / rollback never create a registry, and a killed promote's temporaries are removed
by the next writer under the lock."""

from __future__ import annotations

import json
import os

import pytest

from bf16jax.serving import registry


def _never(*args, **kwargs):
    pytest.fail("the gate must not run")


@pytest.mark.parametrize("exists", [False, True])
def test_promote_refuses_a_directory_that_is_not_a_registry(tmp_path, exists):
    target = tmp_path / "not_a_registry"
    if exists:
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
    before = sorted(os.listdir(target)) if exists else None
    reg = registry.Registry(str(target))
    with pytest.raises(ValueError, match="is not a registry .* init --reference"):
        reg.promote(str(tmp_path / "artifact"), _never)
    with pytest.raises(ValueError, match="is not a registry"):
        reg.rollback()
    if exists:
        assert sorted(os.listdir(target)) == before  # no .lock, no versions/
    else:
        assert not target.exists()


def test_a_killed_promote_leaves_nothing_behind_after_the_next_write(tmp_path):
    """A promote killed during its copy leaves versions/.tmp-*; the next writer removes it."""
    reg_dir = tmp_path / "reg"
    (reg_dir / "versions" / ".tmp-0badc0de").mkdir(parents=True)
    (reg_dir / "versions" / ".tmp-0badc0de" / "params.bin").write_bytes(b"half a copy")
    (reg_dir / "registry.json.tmp-12345678").write_text("{")
    state = {"format": registry.FORMAT, "active": None, "history": [], "versions": {},
             "rejected": [], "reference": {}}  # fmt: skip
    (reg_dir / "registry.json").write_text(json.dumps(state))
    reg = registry.Registry(str(reg_dir))
    with pytest.raises(ValueError, match="Nothing to roll back to"):
        reg.rollback()  # a writer: takes the lock, cleans, then refuses
    assert os.listdir(reg_dir / "versions") == []
    assert sorted(os.listdir(reg_dir)) == [".lock", "registry.json", "versions"]
    assert reg.state() == state
