"""`destination local|sftp|s3` are made from the blocks' own fields: every field is an option with
the block's default, bounds and description; no secret is ever an option's value."""

from __future__ import annotations

import typing
import uuid
from pathlib import Path

import pytest
from pydantic import Field, SecretStr
from typer.testing import CliRunner

from patient_delivery.blocks import DESTINATION_TYPES
from patient_delivery.blocks.local import LocalDestination
from patient_delivery.blocks.s3 import S3Destination
from patient_delivery.cli.block_options import COMMANDS, Source, destination_command
from tests.test_cli import run

runner = CliRunner()


def _flags(block_type: type) -> dict[str, list[str]]:
    """Each field of the block and the options that set it."""

    def flag(option: typing.Any) -> str:
        made = typing.get_args(option.annotation)[1]  # typer.Option(flag): its first declaration
        return str((made.param_decls or (made.default,))[0])

    return {
        name: [flag(option) for option in Source(name, info).options]
        for name, info in block_type.model_fields.items()
    }


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_field_of_every_destination_block_is_an_option(command: str) -> None:
    block_type = DESTINATION_TYPES[COMMANDS[command]]
    flags = _flags(block_type)
    assert all(flags.values()) and set(flags) == set(block_type.model_fields)
    shown = runner.invoke(destination_command(command, block_type), ["--help"],
                          env={"COLUMNS": "300"}).output  # fmt: skip
    for options in flags.values():
        assert all(option.split("/")[0] in shown for option in options)
    for name, info in block_type.model_fields.items():  # a secret is never typed in
        if info.annotation in (SecretStr, SecretStr | None):
            assert all(flag.endswith(("-env", "-stdin", "-file", "signing-key"))
                       for flag in flags[name]), flags[name]  # fmt: skip


class Retained(LocalDestination):
    """A destination type with one more field than the local folder."""

    _block_type_slug = "retained-test-folder"
    retention_days: int = Field(default=7, ge=1, le=30, description="Days files are kept.")


@pytest.mark.bad_input
def test_a_field_added_to_a_block_is_an_option_with_its_bounds_and_default() -> None:
    command = destination_command("local", Retained)
    shown = runner.invoke(command, ["--help"], env={"COLUMNS": "300"}).output
    assert "--retention-days" in shown and "Days files are kept." in shown and "(7)" in shown
    refused = runner.invoke(command, ["x", "--root", "/srv/x", "--retention-days", "40"])
    assert refused.exit_code == 2 and "--retention-days" in refused.output


@pytest.mark.usefixtures("prefect_api")
def test_options_not_given_leave_the_blocks_defaults(tmp_path: Path) -> None:
    name = f"defaults-{uuid.uuid4().hex[:8]}"
    role = "arn:aws:iam::123456789012:role/delivery"
    run("destination", "s3", name, "--bucket", "org-bucket", "--role-arn", role)
    saved = S3Destination.load(name)
    fresh = S3Destination(bucket_name="org-bucket", role_arn=role)
    assert {field: getattr(saved, field) for field in S3Destination.model_fields} == {
        field: getattr(fresh, field) for field in S3Destination.model_fields
    }

    run("destination", "s3", name, "--bucket", "org-bucket", "--role-arn", role, "--sse", "none",
        "--manifests", "", "--bucket-owner-full-control", "--overwrite")  # fmt: skip
    saved = S3Destination.load(name)
    assert saved.server_side_encryption is None and saved.manifest_template == ""
    assert saved.bucket_owner_full_control is True

    folder = f"folder-{uuid.uuid4().hex[:8]}"
    run("destination", "local", folder, "--root", str(tmp_path / "org"),
        "--manifests", "in/{projectId}/{runId}.json")  # fmt: skip
    assert LocalDestination.load(folder).manifest_template == "in/{projectId}/{runId}.json"


@pytest.mark.bad_input
@pytest.mark.usefixtures("prefect_api")
def test_a_secret_from_an_unset_variable_or_a_bad_field_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_SUCH_VARIABLE", raising=False)
    role = "arn:aws:iam::123456789012:role/delivery"
    out = run("destination", "s3", "x", "--bucket", "b", "--role-arn", role,
              "--external-id-env", "NO_SUCH_VARIABLE", code=2)  # fmt: skip
    assert (
        out.strip() == "error: --external-id-env: environment variable NO_SUCH_VARIABLE is not set"
    )
    monkeypatch.setenv("PRIVATE_VALUE", "hunter2-secret")
    out = run("destination", "s3", "x", "--bucket", "b", "--role-arn", "not-an-arn",
              "--external-id-env", "PRIVATE_VALUE", code=2)  # fmt: skip
    assert len(out.strip().splitlines()) == 1 and "role_arn" in out
    assert "hunter2" not in out and "not-an-arn" not in out
