"""`destination local|sftp|s3`: one command per destination block type, its options made from
the block's own fields, so a field added to a block is an option here with the block's default,
bounds and description, and nothing is written twice.

How a value reaches a field follows from its type, never from the command line's text alone:

- secrets (`SecretStr`) come from an environment variable (`--<name>-env`), the password also
  from stdin; key material from a file. No secret is ever an option's value.
- a field holding another block (prefect-aws `AwsCredentials`) takes that block's name.
- an optional choice (`Literal`) also takes `none`.

The names that read better on a command line than the field's (`--bucket` for `bucket_name`)
are listed in `RENAMED`; every other option is the field's name with dashes.
"""

from __future__ import annotations

import inspect
import os
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
import typer.main
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from typer.core import TyperGroup

from patient_delivery.cli.common import console, fail, invalid, prefect, read_file, start_prefect

if TYPE_CHECKING:
    import click

COMMANDS = {"local": "local-destination", "sftp": "sftp-destination", "s3": "s3-destination"}
"""Each command and the block type (slug) it creates."""

RENAMED = {
    "bucket_name": "bucket",
    "region_name": "region",
    "path_template": "template",
    "manifest_template": "manifests",
    "host_keys": "host-key",
    "role_session_name": "session-name",
    "server_side_encryption": "sse",
}
FROM_FILE = {
    "encryption_key": "encrypt-to",
    "signing_key": "signing-key",
    "private_key": "private-key-file",
}
"""Key material: read from the file the option names."""
FROM_ENV = {
    "password": "password-env",
    "private_key_passphrase": "passphrase-env",
    "signing_key_passphrase": "signing-passphrase-env",
    "external_id": "external-id-env",
}
"""Secrets: read from the environment variable the option names (default `--<name>-env`)."""
FROM_STDIN = {"password": "password-stdin"}


class UnsupportedField(TypeError):
    """A block field whose type no option is made for; the test of every block names it."""


class Source:
    """How one field gets its value from the command line: its options, and the value."""

    def __init__(self, name: str, info: FieldInfo) -> None:
        self.name = name
        self.info = info
        self.options: list[inspect.Parameter] = []
        self.optional, self.kind = _unwrap(info.annotation)
        self._make()

    def _option(self, flag: str, kind: Any, default: Any = None, **settings: Any) -> None:
        """An option `--flag` of type `kind` (None when not given, so the block's default
        applies), passed to the command as `<field>__<n>`."""
        required = settings.pop("required", False)
        option = typer.Option(f"--{flag}", **settings)
        annotation = Annotated[kind if required or default is not None else kind | None, option]
        self.options.append(inspect.Parameter(
            f"{self.name}__{len(self.options)}", inspect.Parameter.KEYWORD_ONLY,
            annotation=annotation, default=inspect.Parameter.empty if required else default,
        ))  # fmt: skip

    def _make(self) -> None:
        info, kind = self.info, self.kind
        flag = RENAMED.get(self.name, self.name.replace("_", "-"))
        about = info.description or info.title or ""
        required = info.is_required()
        if self.name in FROM_FILE:
            self._option(FROM_FILE[self.name], Path, required=required,
                         help=f"File holding it. {about}")  # fmt: skip
        elif kind is SecretStr:
            self._option(FROM_ENV.get(self.name, f"{flag}-env"), str, metavar="VARIABLE",
                         help=f"Environment variable holding it. {about}")  # fmt: skip
            if self.name in FROM_STDIN:
                self._option(FROM_STDIN[self.name], bool, default=False,
                             help="Read it from the first line of stdin")  # fmt: skip
        elif kind is bool:
            self._option(f"{flag}/--no-{flag}", bool, help=about,
                         show_default="yes" if info.default else "no")  # fmt: skip
        elif isinstance(kind, type) and issubclass(kind, BaseModel):  # another block, by name
            self._option(flag, str, metavar="BLOCK",
                         help=f"Name of a saved {kind.__name__} block. {about}")  # fmt: skip
        elif typing.get_origin(kind) is list:
            self._option(flag, list[str], required=required, help=f"{about} (repeatable)")
        elif kind in (int, float):
            bounds = {type(m).__name__: m for m in info.metadata}
            low = getattr(bounds.get("Ge"), "ge", None)
            high = getattr(bounds.get("Le"), "le", None)
            self._option(flag, kind, required=required, min=low, max=high,
                         help=about, **_default_shown(info))  # fmt: skip
        elif kind in (str, Path):
            self._option(flag, kind, required=required, help=about, **_default_shown(info))
        elif typing.get_origin(kind) is Literal:
            choices = (*typing.get_args(kind), *(("none",) if self.optional else ()))
            self._option(flag, Literal[choices], required=required, help=about,  # type: ignore[valid-type]
                         **_default_shown(info))  # fmt: skip
        else:
            raise UnsupportedField(f"{self.name}: no command-line option for a {kind!r} field")

    def value(self, given: dict[str, Any]) -> Any:
        """The field's value from the parsed options; None when none was given."""
        first, *rest = (given.get(option.name) for option in self.options)
        if self.name in FROM_FILE:
            return read_file(first, f"--{FROM_FILE[self.name]}")
        if self.kind is SecretStr:
            if rest and rest[0]:
                return sys.stdin.readline().rstrip("\n")
            flag = FROM_ENV.get(self.name, f"{RENAMED.get(self.name, self.name)}-env")
            return _from_env(first, f"--{flag}") if first else None
        if isinstance(self.kind, type) and issubclass(self.kind, BaseModel):
            return self.kind.load(first, _sync=True) if first else None  # type: ignore[attr-defined]
        if typing.get_origin(self.kind) is list:
            return list(first) if first else None
        if first == "none" and self.optional and typing.get_origin(self.kind) is Literal:
            return _NONE
        return first  # a Path as given: the block refuses a relative folder


_NONE = object()
"""An optional choice set to `none` on the command line (distinct from not given)."""


def _unwrap(annotation: Any) -> tuple[bool, Any]:
    """Whether the type allows None, and the type without it."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return True, args[0]
    return False, annotation


def _default_shown(info: FieldInfo) -> dict[str, Any]:
    """Help shows the block's default (the option itself defaults to "not given")."""
    if info.is_required() or info.default in (None, ""):
        return {}
    return {"show_default": str(info.default)}


def _from_env(variable: str, option: str) -> str:
    value = os.environ.get(variable)
    if value is None:
        raise fail(f"{option}: environment variable {variable} is not set", code=2)
    return value


def _sources(block_type: type[BaseModel]) -> list[Source]:
    return [Source(name, info) for name, info in block_type.model_fields.items()
            if not (isinstance(info.exclude, bool) and info.exclude)]  # fmt: skip


def destination_command(command: str, block_type: type[BaseModel]) -> typer.Typer:
    """`destination <command> NAME --option ...`, as a Typer app of that one command: build the
    block (its checks run here; a refusal names the field, never its value) and save it."""
    sources = _sources(block_type)

    def create(name: str, overwrite: bool = False, **given: Any) -> None:
        prefect()
        fields = {}
        for source in sources:
            value = source.value(given)
            if value is not None:
                fields[source.name] = None if value is _NONE else value
        _save(block_type, name, overwrite, fields)

    params = [
        inspect.Parameter("name", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation=Annotated[str, typer.Argument(help="The block's name")]),
        *(option for source in sources for option in source.options),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation=Annotated[bool, typer.Option(
                              "--overwrite", help="Replace a block of that name")]),
    ]  # fmt: skip
    create.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    create.__annotations__ = {p.name: p.annotation for p in params}
    summary = (block_type.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    one = typer.Typer(add_completion=False)
    one.command(command, help=f"Create (or with --overwrite replace) a {COMMANDS[command]} "
                f"block. {summary}")(create)  # fmt: skip
    return one


def _save(block_type: type[BaseModel], name: str, overwrite: bool, fields: dict[str, Any]) -> None:
    try:
        block = block_type(**fields)
    except ValidationError as exc:
        raise invalid(exc) from None
    slug = block_type.get_block_type_slug()  # type: ignore[attr-defined]
    try:
        block.save(name, overwrite=overwrite)  # type: ignore[attr-defined]
    except ValueError as exc:
        if "already in use" not in str(exc):
            raise
        raise fail(f"{slug}/{name} exists already; --overwrite replaces it", code=2) from None
    console.print(f"{slug}/{name}  {block.describe()}", highlight=False)  # type: ignore[attr-defined]


class DestinationGroup(TyperGroup):
    """The `destination` group, whose create commands are made from the block types when first
    asked for (importing the blocks costs more than most commands need)."""

    def list_commands(self, ctx: click.Context) -> list[str]:  # type: ignore[override]
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS:
            made = destination_command(cmd_name, _block_types()[COMMANDS[cmd_name]])
            return typer.main.get_command(made)
        return super().get_command(ctx, cmd_name)


def _block_types() -> dict[str, type[BaseModel]]:
    """The destination block types. Importing them imports Prefect, which reads its settings
    then: Prefect's local defaults (and this command's temporary API) come first."""
    start_prefect()
    from patient_delivery.blocks import DESTINATION_TYPES

    return dict(DESTINATION_TYPES)
