"""Passphrases: the strength a new one needs, and `custodian passphrase` to change one.

The change rewrites the credential file atomically (temporary file, fsync,
rename, fsync of the directory), mode 0600; a failure at any step leaves
the old file exactly as it was and no temporary file behind.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from keyquorum.cli import files
from keyquorum.cli.main import main as cli_main
from keyquorum.cli.passphrase import MIN_GUESSES_LOG10, MIN_LENGTH, check_strength
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.errors import InvalidInputError, WrongPassphraseError
from keyquorum.quorum.secret import SecretBytes

STRONG = "plum staple orbit canyon velvet"
STRONGER = "quiet lantern misty harbor 1987 fig"


def run(*args: str) -> Result:
    return CliRunner().invoke(cli_main, list(args))


def _file(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text + "\n")
    return path


@pytest.fixture
def alice(tmp_path: Path) -> Path:
    pp = _file(tmp_path, "old.pp", STRONG)
    r = run(
        "custodian", "new", "--name", "alice", "--out", str(tmp_path), "--passphrase-file", str(pp)
    )
    assert r.exit_code == 0, r.output
    return tmp_path / "alice.kqcred"


WEAK = {
    "one-letter": ("a", "has 1 characters; use at least 12"),
    "eleven": ("x7#kQ9!vb2Z", "has 11 characters"),
    "common-password": ("password1234", "too easy to guess"),
    "own-name-repeated": ("alicealicealice", "too easy to guess"),
    "keyboard-walk": ("qwertyuiopasdfgh", "too easy to guess"),
    "repeated-character": ("aaaaaaaaaaaaaaaaaaaa", "too easy to guess"),
    "a-date": ("1987-11-25 1987-11-25", "too easy to guess"),
}


@pytest.mark.parametrize(("weak", "message"), list(WEAK.values()), ids=list(WEAK))
def test_custodian_new_refuses_a_weak_passphrase(tmp_path: Path, weak: str, message: str) -> None:
    pp = _file(tmp_path, "weak.pp", weak)
    r = run(
        "custodian", "new", "--name", "alice", "--out", str(tmp_path), "--passphrase-file", str(pp)
    )
    assert r.exit_code == 1
    assert message in r.stderr
    if len(weak) > 2:
        assert weak not in r.output
    assert not (tmp_path / "alice.kqcred").exists()
    assert not (tmp_path / "alice.pub.json").exists()


def test_the_rule_is_length_and_zxcvbn_guesses() -> None:
    with SecretBytes(STRONG.encode()) as good:
        check_strength(good, name="alice")
    assert MIN_LENGTH == 12
    assert MIN_GUESSES_LOG10 == 12
    # Long enough but guessable: refused by the estimate, with its reason.
    with (
        SecretBytes(b"correct horse") as weak,
        pytest.raises(InvalidInputError, match=r"about 10\^\d+ guesses, fewer than the 10\^12"),
    ):
        check_strength(weak, name="alice")
    # Longer than zxcvbn reads: judged by the first 72 characters, not refused for length.
    with SecretBytes(((STRONG + " ") * 10).encode()) as long:
        check_strength(long, name="alice")


def test_passphrase_change_rewrites_the_file_and_keeps_the_keys(alice: Path) -> None:
    before = alice.read_bytes()
    public = CustodianCredential.decrypt(before, STRONG.encode()).public()
    inode = alice.stat().st_ino
    old = _file(alice.parent, "old.pp", STRONG)
    new = _file(alice.parent, "new.pp", STRONGER)
    r = run("custodian", "passphrase", "--credential", str(alice),
            "--passphrase-file", str(old), "--new-passphrase-file", str(new))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"fingerprint {public.label}" in r.stdout
    after = alice.read_bytes()
    assert after != before
    assert alice.stat().st_ino != inode  # a new file renamed into place
    assert stat.S_IMODE(alice.stat().st_mode) == 0o600
    assert CustodianCredential.decrypt(after, STRONGER.encode()).public() == public
    with pytest.raises(WrongPassphraseError):
        CustodianCredential.decrypt(after, STRONG.encode())
    assert sorted(p.name for p in alice.parent.iterdir() if p.name.endswith(".tmp")) == []
    assert STRONG not in r.output
    assert STRONGER not in r.output


CHANGE_REFUSALS = {
    "wrong-current": ("not it at all, really", STRONGER, "wrong passphrase"),
    "weak-new": (STRONG, "password1234", "too easy to guess"),
    "same-as-current": (STRONG, STRONG, "the new passphrase is the current one"),
}


@pytest.mark.parametrize(
    ("current", "new", "message"), list(CHANGE_REFUSALS.values()), ids=list(CHANGE_REFUSALS)
)
def test_a_refused_change_leaves_the_file_as_it_was(
    alice: Path, current: str, new: str, message: str
) -> None:
    before = alice.read_bytes()
    r = run("custodian", "passphrase", "--credential", str(alice),
            "--passphrase-file", str(_file(alice.parent, "cur.pp", current)),
            "--new-passphrase-file", str(_file(alice.parent, "new.pp", new)))  # fmt: skip
    assert r.exit_code == 1
    assert message in r.stderr
    assert alice.read_bytes() == before
    assert [p for p in alice.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("step", ["write", "fsync", "rename"])
def test_a_failure_while_replacing_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    target = tmp_path / "alice.kqcred"
    target.write_bytes(b"the old credential")
    target.chmod(0o600)

    def fail(*_args: object, **_kw: object) -> None:
        raise OSError(28, "No space left on device")

    if step == "write":
        monkeypatch.setattr(files.os, "write", fail)
    elif step == "fsync":
        monkeypatch.setattr(files.os, "fsync", fail)
    else:
        monkeypatch.setattr(Path, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        files.replace_atomically(target, b"the new credential", 0o600)
    assert target.read_bytes() == b"the old credential"
    assert [p.name for p in tmp_path.iterdir()] == ["alice.kqcred"]


def test_replace_atomically_syncs_the_file_and_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "alice.kqcred"
    target.write_bytes(b"old")
    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", recording)
    files.replace_atomically(target, b"new", 0o600)
    assert synced == ["file", "dir"]
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
