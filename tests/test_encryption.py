"""OpenPGP keys on destination blocks: refused when they cannot be used, wherever the block is
built (Python, the CLI, a block saved from the Prefect UI), shown by fingerprint, never quoted.
Delivery itself is in the destination contract (every destination type)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from typer.testing import CliRunner

from patient_delivery.blocks.contract import TerminalDeliveryError, Upload
from patient_delivery.blocks.local import LocalDestination
from patient_delivery.cli import app
from tests.gnupg import PASSPHRASE, Keys
from tests.test_deliver_flow import save_as_the_ui_would, save_local

runner = CliRunner()


def armor_lines(armored: str) -> list[str]:
    """The lines of key material in an armored block (what must never be quoted back)."""
    return [line for line in armored.splitlines() if len(line) > 40 and "-----" not in line]


BAD_RECEIVER_KEYS = [
    ("expired", "expired on 2020-12-31"),
    ("revoked", "is revoked"),
    ("signing_only", "has no encryption key valid now"),
    ("encryption_subkey_expired", "has no encryption key valid now"),
    ("receiver_secret", "holds a secret key; give the organization's public key only"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("key", "reason"), BAD_RECEIVER_KEYS)
def test_a_receiver_key_that_cannot_be_used_is_refused_when_the_block_is_built(
    pgp_keys: Keys, tmp_path: Path, key: str, reason: str
) -> None:
    armored = getattr(pgp_keys, key)
    with pytest.raises(ValidationError) as refused:
        LocalDestination(root=tmp_path, encryption_key=armored)
    message = str(refused.value)
    assert "encryption_key" in message and reason in message
    assert not any(line in message for line in armor_lines(armored))


NOT_A_KEY = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n-----END PGP PUBLIC KEY BLOCK-----"


@pytest.mark.bad_input
@pytest.mark.parametrize("text", ["not a key", NOT_A_KEY])
def test_text_that_is_not_one_key_is_refused(pgp_keys: Keys, tmp_path: Path, text: str) -> None:
    with pytest.raises(ValidationError, match="is not one OpenPGP public key"):
        LocalDestination(root=tmp_path, encryption_key=text)
    two = pgp_keys.receiver_public + pgp_keys.ours_public
    with pytest.raises(ValidationError, match=r"is not one OpenPGP public key \(2 found\)"):
        LocalDestination(root=tmp_path, encryption_key=two)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("secret", "passphrase", "reason"),
    [
        ("ours_secret", None, "the passphrase is wrong or missing"),
        ("ours_secret", "wrong", "the passphrase is wrong or missing"),
        ("ours_public", None, "holds no secret key material"),
        ("expired_secret", None, "expired on 2020-12-31"),
    ],
)
def test_a_signing_key_that_cannot_sign_is_refused(
    pgp_keys: Keys, tmp_path: Path, secret: str, passphrase: str | None, reason: str
) -> None:
    armored = getattr(pgp_keys, secret)
    with pytest.raises(ValidationError) as refused:
        LocalDestination(
            root=tmp_path,
            encryption_key=pgp_keys.receiver_public,
            signing_key=SecretStr(armored),
            signing_key_passphrase=SecretStr(passphrase) if passphrase else None,
        )
    message = str(refused.value)
    assert "signing_key: " in message and reason in message
    assert not any(line in message for line in armor_lines(armored))
    assert "wrong" not in message.replace("is wrong", "")  # the passphrase given, never


@pytest.mark.bad_input
def test_a_signing_key_without_a_receiver_key_is_refused(pgp_keys: Keys, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="signing_key: needs encryption_key"):
        LocalDestination(root=tmp_path, signing_key=SecretStr(pgp_keys.ours_secret))


def test_paths_end_in_pgp_only_when_encrypting(pgp_keys: Keys, tmp_path: Path) -> None:
    values = {"orgId": "o", "projectId": "p", "healthexPatientId": "h", "externalId": "e",
              "dataType": "fhir", "timestamp": "20260101T000000Z"}  # fmt: skip
    plain = LocalDestination(root=tmp_path)
    sealed = LocalDestination(root=tmp_path, encryption_key=pgp_keys.receiver_public)
    assert plain.render_path(values, "fhir").endswith("/fhir/20260101T000000Z.json")
    assert sealed.render_path(values, "fhir") == plain.render_path(values, "fhir") + ".pgp"
    from datetime import UTC, datetime

    moment = datetime(2026, 1, 1, tzinfo=UTC)
    assert sealed.render_manifest_path("o", "p", moment, "r").endswith("-r.json.pgp")


@pytest.mark.bad_input
def test_a_corrupt_store_copy_is_refused_before_it_is_encrypted(
    pgp_keys: Keys, tmp_path: Path
) -> None:
    block = LocalDestination(root=tmp_path, encryption_key=pgp_keys.receiver_public)
    good, bad = b"<a>good</a>", b"<a>bad</a>"
    uploads = [
        ("bad", Upload("x/bad.xml.pgp", bad, hashlib.sha256(good).hexdigest())),
        ("good", Upload("x/good.xml.pgp", good, hashlib.sha256(good).hexdigest())),
    ]
    with block.delivery_session() as session:
        results = dict(session.upload_many(uploads))
    assert isinstance(results["bad"], TerminalDeliveryError)
    assert "does not match the stored SHA-256" in str(results["bad"])
    assert not (tmp_path / "x/bad.xml.pgp").exists()
    sent = (tmp_path / "x/good.xml.pgp").read_bytes()
    assert results["good"].sha256 == hashlib.sha256(sent).hexdigest()  # what was sent
    assert pgp_keys.receiver.decrypt(sent).plaintext == good


@pytest.mark.usefixtures("prefect_api")
class TestFromTheShell:
    def write(self, tmp_path: Path, name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    def test_a_block_is_saved_with_keys_from_files_and_shown_by_fingerprint(
        self, pgp_keys: Keys, tmp_path: Path
    ) -> None:
        public = self.write(tmp_path, "org.asc", pgp_keys.receiver_public)
        secret = self.write(tmp_path, "ours.asc", pgp_keys.ours_secret)
        created = runner.invoke(
            app,
            ["destination", "local", "sealed", "--root", str(tmp_path / "out"),
             "--encrypt-to", str(public), "--signing-key", str(secret),
             "--signing-passphrase-env", "SIGNING_PASSPHRASE", "--overwrite"],
            env={"SIGNING_PASSPHRASE": PASSPHRASE},
        )  # fmt: skip
        assert created.exit_code == 0, created.output
        shown = runner.invoke(app, ["destination", "show", "local-destination/sealed"],
                              env={"COLUMNS": "250"})  # fmt: skip
        assert shown.exit_code == 0, shown.output
        receiver = pgp_keys.receiver.fingerprint("pgp@receiver.example")
        assert f"OpenPGP {receiver} (expires " in shown.output
        assert f"******** OpenPGP {pgp_keys.ours_fingerprint}" in shown.output
        for armored in (pgp_keys.receiver_public, pgp_keys.ours_secret):
            assert not any(line in shown.output for line in armor_lines(armored))
        assert PASSPHRASE not in shown.output
        tested = runner.invoke(app, ["destination", "test", "local-destination/sealed"])
        assert tested.exit_code == 0 and f"encrypts to OpenPGP {receiver}" in tested.output

    @pytest.mark.bad_input
    def test_the_cli_refuses_an_expired_key_in_one_line(
        self, pgp_keys: Keys, tmp_path: Path
    ) -> None:
        expired = self.write(tmp_path, "expired.asc", pgp_keys.expired)
        result = runner.invoke(
            app,
            ["destination", "local", "x", "--root", str(tmp_path), "--encrypt-to", str(expired)],
        )
        assert result.exit_code == 2 and result.stdout == ""
        assert len(result.stderr.splitlines()) == 1
        assert "encryption_key: " in result.stderr and "expired on 2020-12-31" in result.stderr

    @pytest.mark.bad_input
    def test_the_cli_refuses_a_key_file_it_cannot_read(self, tmp_path: Path) -> None:
        result = runner.invoke(
            app,
            ["destination", "local", "x", "--root", str(tmp_path),
             "--encrypt-to", str(tmp_path / "missing.asc")],
        )  # fmt: skip
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
        assert "--encrypt-to: cannot read" in result.stderr
        result = runner.invoke(
            app,
            ["destination", "sftp", "x", "--host", "127.0.0.1", "--username", "u",
             "--host-key", "SHA256:x", "--private-key-file", str(tmp_path / "id_missing")],
        )  # fmt: skip
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
        assert "--private-key-file: cannot read" in result.stderr

    @pytest.mark.bad_input
    def test_a_block_saved_from_the_ui_with_a_revoked_key_is_listed_invalid(
        self, pgp_keys: Keys, tmp_path: Path
    ) -> None:
        reference = save_local(tmp_path / "ui")
        save_as_the_ui_would(
            reference, {"root": str(tmp_path / "ui"), "encryption_key": pgp_keys.revoked}
        )
        listed = runner.invoke(app, ["destination", "list"], env={"COLUMNS": "250"})
        assert listed.exit_code == 0, listed.output
        line = next(line for line in listed.output.splitlines() if reference in line)
        assert "INVALID" in line and "encryption_key" in line
        assert "is revoked" in listed.output.replace("\n", " ").replace("│", " ")
