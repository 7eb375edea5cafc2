"""Path templates: checked when configured, checked again at render, never rewritten."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from patient_delivery.paths import (
    DEFAULT_MANIFEST_TEMPLATE,
    DEFAULT_TEMPLATE,
    DOCUMENTS,
    MANIFESTS,
    PathTemplate,
    PathTemplateError,
    PathValueError,
    TemplateKind,
    format_timestamp,
)

VALUES = {
    "orgId": "acme",
    "projectId": "study-1",
    "healthexPatientId": "hx_0123456789abcdef0123",
    "externalId": "MRN-42",
    "dataType": "ccda",
    "timestamp": "20261125T134501Z",
}


def test_default_template_renders_with_extension_per_data_type() -> None:
    template = PathTemplate.parse(DEFAULT_TEMPLATE)
    assert template.render(VALUES, "ccda") == (
        "acme/study-1/hx_0123456789abcdef0123/ccda/20261125T134501Z.xml"
    )
    fhir = template.render({**VALUES, "dataType": "fhir"}, "fhir")
    assert fhir == "acme/study-1/hx_0123456789abcdef0123/fhir/20261125T134501Z.json"


def test_extension_not_doubled_when_template_has_it() -> None:
    template = PathTemplate.parse("in/{externalId}.xml")
    assert template.render(VALUES, "ccda") == "in/MRN-42.xml"
    assert template.render(VALUES, "fhir") == "in/MRN-42.xml.json"


def test_all_six_variables_are_known() -> None:
    text = "{orgId}/{projectId}/{healthexPatientId}/{externalId}/{dataType}/{timestamp}"
    assert PathTemplate.parse(text).variables == frozenset(VALUES)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("{orgId}/{patientId}", "{patientId}"),
        ("{orgId}/{healthexPatientId", "stray"),
        ("{orgId}/healthexPatientId}", "stray"),
        ("/abs/{healthexPatientId}", "absolute"),
        ("C:/x/{healthexPatientId}", "absolute"),
        ("a/../{healthexPatientId}", "'..'"),
        ("a/./{healthexPatientId}", "'.'"),
        ("a\\{healthexPatientId}", "contains '\\'"),
        ("a//{healthexPatientId}", "empty folder"),
        ("{orgId}/{dataType}", "names no patient"),
        ("a\x00b/{externalId}", "control"),
        ("", "empty"),
    ],
)
def test_bad_templates_are_refused_with_the_problem_named(template: str, named: str) -> None:
    with pytest.raises(PathTemplateError) as error:
        PathTemplate.parse(template)
    message = str(error.value)
    assert named in message
    assert "example of a valid template" in message or named == "empty"


@pytest.mark.bad_input
def test_unknown_variables_are_all_listed() -> None:
    with pytest.raises(PathTemplateError, match=r"\{foo\}, \{patient\}"):
        PathTemplate.parse("{patient}/{foo}/{externalId}")


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("../../etc", "separator"),
        ("a/b", "separator"),
        ("a\\b", "separator"),
        ("..", "'..'"),
        ("x..y", "'..'"),
        (".", "'.'"),
        ("", "empty"),
        ("nul\x00byte", "control"),
        ("new\nline", "control"),
        ("esc\x1b[31m", "control"),
        ("rtl\u202egnp.exe", "invisible"),
        ("x" * 1000, "longer"),
        (" padded", "whitespace"),
    ],
)
def test_hostile_values_fail_render_and_name_the_variable_not_the_value(
    value: str, problem: str
) -> None:
    template = PathTemplate.parse("{orgId}/{externalId}")
    with pytest.raises(PathValueError) as error:
        template.render({**VALUES, "externalId": value}, "ccda")
    assert error.value.variable == "externalId"
    assert problem in str(error.value)
    if len(value) > 2:
        assert value not in str(error.value)


def test_unused_variables_are_not_checked() -> None:
    # A hostile externalId only matters to templates that put it in the path.
    template = PathTemplate.parse("{healthexPatientId}")
    assert template.render({**VALUES, "externalId": "../../etc"}, "fhir") == (
        "hx_0123456789abcdef0123.json"
    )


def test_unicode_values_are_kept_as_they_are() -> None:
    template = PathTemplate.parse("{externalId}")
    assert template.render({**VALUES, "externalId": "Zoë-Łukasz"}, "ccda") == "Zoë-Łukasz.xml"


def test_timestamp_is_utc_sortable_and_file_name_safe() -> None:
    moment = datetime(2026, 11, 25, 8, 45, 1, tzinfo=timezone(timedelta(hours=-5)))
    assert format_timestamp(moment) == "20261125T134501Z"
    assert format_timestamp(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) < format_timestamp(
        datetime(2026, 11, 2, 3, 4, 5, tzinfo=UTC)
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        format_timestamp(datetime(2026, 1, 1))


def test_fixed_prefix_is_the_folders_before_the_first_variable() -> None:
    assert PathTemplate.parse("inbox/daily/{externalId}").fixed_prefix == "inbox/daily/"
    assert PathTemplate.parse("in/x-{externalId}/{timestamp}").fixed_prefix == "in/"
    assert PathTemplate.parse(DEFAULT_TEMPLATE).fixed_prefix == ""


@pytest.mark.bad_input
@pytest.mark.security
@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("{orgId}/_manifests/{timestamp}-{runId}.json", "{projectId} (one per project)"),
        ("{orgId:/<4}/{projectId}/{runId}.json", "unknown variable(s) {orgId:/<4}"),
        ("{projectId!r}/{runId}.json", "unknown variable(s) {projectId!r}"),
        ("{orgId}/{projectId}/latest.json", "must hold {runId}"),
        ("{orgId}/{bogus}/{projectId}/{runId}.json", "unknown variable(s) {bogus}"),
        ("{projectId}/{runId}.txt", "must end with .json"),
        ("/{projectId}/{runId}.json", "absolute"),
        ("{projectId}/../{runId}.json", "'..' segment"),
        ("{projectId}//{runId}.json", "empty folder name"),
        ("{projectId}/{healthexPatientId}/{runId}.json", "unknown variable(s) {healthexPatientId}"),
    ],
)
def test_manifest_templates_give_each_project_and_run_its_own_plain_path(
    template: str, named: str
) -> None:
    """A manifest path shared by projects would let one project's manifest list, or replace,
    another's; a format spec could pad or cut a value into another folder."""
    from pydantic import ValidationError

    from patient_delivery.blocks.local import LocalDestination

    with pytest.raises(ValidationError) as refused:
        LocalDestination(root="/srv/x", manifest_template=template)
    [error] = refused.value.errors()
    assert error["loc"] == ("manifest_template",) and named in error["msg"]
    assert template not in error["msg"]  # the rules broken, not the value
    LocalDestination(root="/srv/x", manifest_template="{projectId}/{runId}.json")  # accepted


def test_manifest_paths_render_through_the_same_checks_as_document_paths() -> None:
    from datetime import UTC, datetime

    from patient_delivery.blocks import TerminalDeliveryError
    from patient_delivery.blocks.local import LocalDestination

    folder = LocalDestination(
        root="/srv/x", manifest_template="in/{orgId}/{projectId}/{runId}.json"
    )
    moment = datetime(2026, 12, 3, tzinfo=UTC)
    assert folder.render_manifest_path("acme", "study", moment, "r1") == "in/acme/study/r1.json"
    with pytest.raises(TerminalDeliveryError, match="'projectId' contains a path separator"):
        folder.render_manifest_path("acme", "a/b", moment, "r1")
    off = LocalDestination(root="/srv/x", manifest_template="")
    assert off.render_manifest_path("acme", "study", moment, "r1") == ""


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        *[
            (DOCUMENTS, t)
            for t in (
                DEFAULT_TEMPLATE,
                "incoming/{externalId}.xml",
                "{orgId}/{healthexPatientId}",
                "a.b/{externalId}-{timestamp}",
                "{externalId}/.hidden",
                "x..y/{externalId}",
                "/{orgId}/{bogus}/../x",
                "{orgId}/{projectId}",
                "a/../{externalId}",
                "..",
                "./{externalId}",
                "a//{externalId}",
                "{externalId}/",
                "{externalId",
                "a}/{externalId}",
                "a\\b/{externalId}",
                "{ externalId }",
                "{runId}/{externalId}",
                "",
            )
        ],
        *[
            (MANIFESTS, t)
            for t in (
                DEFAULT_MANIFEST_TEMPLATE,
                "in/{projectId}/{runId}.json",
                "{projectId}-{runId}.json",
                "{projectId}/{runId}",
                "{orgId}/manifest.json",
                "/{projectId}/{runId}.json",
                "{projectId}/../{runId}.json",
                "{projectId}/{healthexPatientId}{runId}.json",
            )
        ],
    ],
)
def test_the_schema_pattern_agrees_with_the_parser(kind: TemplateKind, text: str) -> None:
    """What a form checks with the pattern is what the block checks (characters aside)."""
    try:
        PathTemplate.parse(text, kind)
        valid = True
    except PathTemplateError:
        valid = False
    assert bool(re.fullmatch(kind.schema_pattern, text)) == valid
