"""The command line, as an operator uses it: ingest, subscribe, deliver, read the ledger."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopback.servers import free_port
from patient_delivery import ingest
from patient_delivery.cli import app
from patient_delivery.store import Store

runner = CliRunner()
CCDA = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>v1</title></ClinicalDocument>'


def run(*args: str, input: bytes | None = None, code: int = 0) -> str:
    result = runner.invoke(app, list(args), input=input, env={"COLUMNS": "200"})
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def test_ingest_commands_and_refusals(store: Store, tmp_path: Path) -> None:
    assert run("org", "add", "Acme", "--id", "acme").strip() == "acme"
    assert run("project", "add", "acme", "Study", "--id", "study").strip() == "study"
    patient = run("patient", "add", "study", "--external-id", "MRN-1").strip()
    assert patient.startswith("hx_")
    doc = tmp_path / "doc.xml"
    doc.write_bytes(CCDA)
    assert "stored ccda version 1" in run("document", "put", patient, "ccda", str(doc))
    assert "unchanged" in run("document", "put", patient, "ccda", "-", input=CCDA)
    refused = run("document", "put", patient, "ccda", "-", input=b"<broken", code=2)
    assert "not well-formed XML at line 1" in refused
    assert "no patient" in run("document", "put", "hx_nobody", "ccda", str(doc), code=2)
    deep = b'{"resourceType":"Bundle","entry":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    refused = run("document", "put", patient, "fhir", "-", input=deep, code=2)
    assert "not valid JSON at line 1, column" in refused and len(refused.splitlines()) == 1
    bundle = b'{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","id":"p",'
    refused = run("document", "put", patient, "fhir", "-", input=bundle + b'"x":NaN}}]}', code=2)
    assert "not valid JSON at line 1, column 86" in refused  # at the N
    assert "already has a patient" in run(
        "patient", "add", "study", "--external-id", "MRN-1", code=2
    )


def test_imports_report_counts_and_refusals(
    store: Store, fixtures_dir: Path, tmp_path: Path
) -> None:
    run("org", "add", "Acme", "--id", "acme")
    run("project", "add", "acme", "Study", "--id", "study")
    out = run("import", "fhir-bulk", str(fixtures_dir / "fhir-bulk-10"), "--project", "study")
    assert "patients created 13" in out and "documents stored 13" in out
    [left_out] = [line for line in out.splitlines() if line.startswith("left out")]
    for kind in ("Location", "Organization", "Practitioner", "PractitionerRole"):
        assert f"{kind} " in left_out
    bad = tmp_path / "bad.xml"
    bad.write_text("<nope/>")
    files = [str(fixtures_dir / "ccda" / "CCD_1.xml"), str(bad)]
    out = run("import", "ccda", *files, "--project", "study", code=2)
    assert "documents stored 1" in out and "refused: bad.xml" in out


@pytest.mark.usefixtures("prefect_api")
def test_destination_deliver_and_ledger_from_the_command_line(store: Store, tmp_path: Path) -> None:
    run("org", "add", "Acme", "--id", "acme")
    run("project", "add", "acme", "Study", "--id", "study")
    patient = run("patient", "add", "study", "--external-id", "MRN-1").strip()
    run("document", "put", patient, "ccda", "-", input=CCDA)
    bad = run(
        "destination", "local", "cli-bad", "--root", str(tmp_path), "--template", "{x}", code=2
    )
    assert "unknown variable" in bad
    root = tmp_path / "org"
    made = run("destination", "local", "cli-folder", "--root", str(root)).split()
    assert made == ["local-destination/cli-folder", root.resolve().as_uri()]
    assert "ok remove probe file" in run("destination", "test", "local-destination/cli-folder")
    assert "1 deliveries queued" in run("subscribe", "study", "local-destination/cli-folder")

    out = run("deliver")
    assert "local-destination/cli-folder" in out

    files = [p for p in root.rglob("*") if p.is_file() and "_manifests" not in p.parts]
    assert [f.read_bytes() for f in files] == [CCDA]
    export = tmp_path / "ledger.csv"
    assert "1 rows written" in run("deliveries", "--patient", patient, "--csv", str(export))
    [row] = list(csv.DictReader(export.open()))
    assert row["status"] == "delivered" and row["org_name"] == "Acme"
    assert row["purpose"] == "Patient-directed sharing" and row["path"].endswith(".xml")
    history = tmp_path / "disclosures.csv"
    assert "1 rows written" in run("disclosures", "--patient", patient, "--csv", str(history))
    [sent] = list(csv.DictReader(history.open()))
    assert sent["org_name"] == "Acme" and sent["path"] == row["path"]
    status = run("status")
    assert "delivered" in status and "recent runs" in status
    assert "1" in run("deliveries", "--status", "delivered")


@pytest.mark.usefixtures("prefect_api")
def test_demo_delivers_then_nothing_then_only_the_change(store: Store) -> None:
    first = run("demo", "--patients", "3")
    assert "delivered 12 document(s) this run" in first
    assert "12 document(s) and 2 manifest(s)" in first.replace("\n", " ")  # one per project
    assert "delivered 0 document(s) this run" in run("demo")
    assert "delivered 1 document(s) this run" in run("demo", "--update", "1")


@pytest.mark.usefixtures("prefect_api")
def test_sftp_destination_from_the_command_line_without_echoing_secrets(
    store: Store,
    sshd,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    from loopback.servers import SFTP_PASSWORD, SFTP_USER

    folder = sshd.make_folder("cli-sftp")
    shown = run("destination", "host-key", f"127.0.0.1:{sshd.port}")
    line = next(x for x in shown.splitlines() if x.startswith(f"[127.0.0.1]:{sshd.port} "))
    assert line == sshd.host_key_line()
    monkeypatch.setenv("ORG_SFTP_PASSWORD", SFTP_PASSWORD)
    created = run(
        "destination", "sftp", "cli-sftp", "--host", "127.0.0.1", "--port", str(sshd.port),
        "--username", SFTP_USER, "--host-key", line, "--root", str(folder),
        "--password-env", "ORG_SFTP_PASSWORD", "--files-in-flight", "2",
    )  # fmt: skip
    assert f"sftp-destination/cli-sftp  sftp://{SFTP_USER}@127.0.0.1:{sshd.port}" in created
    from patient_delivery.blocks.sftp import SftpDestination

    saved = SftpDestination.load("cli-sftp")
    assert (saved.files_in_flight, saved.max_connections) == (2, 4)
    tested = run("destination", "test", "sftp-destination/cli-sftp")
    assert "ok write probe file" in tested and "ok remove probe file" in tested
    listed = run("destination", "list")
    shown = run("destination", "show", "sftp-destination/cli-sftp")
    assert "sftp-destination/cli-sftp" in listed and "********" in shown
    for output in (created, tested, listed, shown):
        assert SFTP_PASSWORD not in output
    refused = run("destination", "sftp", "cli-sftp", "--host", "h", "--username", "u",
                  "--host-key", line, "--password-env", "ORG_SFTP_PASSWORD", code=2)  # fmt: skip
    assert "--overwrite" in refused
    assert list(folder.iterdir()) == []


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("client", ["crt", "boto3", "curl"])
def test_s3_destination_from_the_command_line_on_either_transfer_client(
    store: Store,
    moto,
    monkeypatch: pytest.MonkeyPatch,
    client: str,  # type: ignore[no-untyped-def]
) -> None:
    import uuid

    from prefect_aws import AwsCredentials

    from tests.test_s3_destination import EXTERNAL_ID

    bucket = f"cli-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    role = moto.create_role(bucket, EXTERNAL_ID, ["s3:PutObject", "s3:DeleteObject"], bucket)
    access, secret = moto.deliverer_keys
    AwsCredentials(aws_access_key_id=access, aws_secret_access_key=secret).save(
        f"ours-{bucket}", overwrite=True
    )
    monkeypatch.setenv("ORG_EXTERNAL_ID", EXTERNAL_ID)
    arguments = ["destination", "s3", bucket, "--bucket", bucket, "--role-arn", role,
                 "--external-id-env", "ORG_EXTERNAL_ID", "--aws-credentials", f"ours-{bucket}",
                 "--endpoint-url", moto.url, "--sts-endpoint-url", moto.url,
                 "--transfer-client", client, "--files-in-flight", "3"]  # fmt: skip
    if client == "curl":
        refused = run(*arguments, code=2)
        assert "--transfer-client" in refused and "'crt', 'boto3'" in refused
        assert EXTERNAL_ID not in refused
        return
    created = run(*arguments)
    tested = run("destination", "test", f"s3-destination/{bucket}")
    assert "ok write probe file" in tested and "ok remove probe file" in tested
    shown = run("destination", "show", f"s3-destination/{bucket}")
    assert client in shown
    from patient_delivery.blocks.s3 import S3Destination

    assert S3Destination.load(bucket).files_in_flight == 3
    for output in (created, tested, shown):
        assert EXTERNAL_ID not in output and secret not in output


@pytest.mark.usefixtures("prefect_api")
def test_backfill_and_redeliver_from_the_command_line(store: Store, tmp_path: Path) -> None:
    run("org", "add", "Acme", "--id", "acme")
    run("project", "add", "acme", "Study", "--id", "study")
    patient = run("patient", "add", "study").strip()
    run("document", "put", patient, "ccda", "-", input=CCDA)
    run("destination", "local", "cli-backfill", "--root", str(tmp_path / "org"))
    run("subscribe", "study", "local-destination/cli-backfill")
    run("deliver")
    planned = run("backfill", "--project", "study", "--force", "--dry-run")
    assert "dry run" in planned and "resend" in planned
    assert "delivered" in run("redeliver", "--project", "study", "--destination",
                              "local-destination/cli-backfill", "--full")  # fmt: skip
    assert "--full: needs --project and --destination" in run("redeliver", "--full", code=2)


def with_a_disclosure(store: Store, path: str, organization: str = "Acme") -> str:
    """A patient of organization `acme` (named `organization`) with one disclosure whose path
    (text a server or caller chose) is `path`; the patient's ID."""
    from sqlalchemy import select

    from patient_delivery.store.models import Disclosure, DocumentVersion, utcnow

    run("org", "add", organization, "--id", "acme")
    run("project", "add", "acme", "Study", "--id", "study")
    patient = run("patient", "add", "study", "--external-id", "MRN-1").strip()
    run("document", "put", patient, "ccda", "-", input=CCDA)
    with store.session() as session:
        version = session.scalars(select(DocumentVersion)).one()
        session.add(Disclosure(
            patient_id=patient, organization_id="acme", project_id="study", destination="mcp",
            version_id=version.id, data_type="ccda", path=path, sha256=version.sha256,
            size=version.size, purpose="pull", disclosed_at=utcnow(), accessor="api-key:1",
        ))  # fmt: skip
    return patient


@pytest.mark.security
def test_ledger_views_show_control_characters_as_escapes_never_act_on_them(store: Store) -> None:
    """A stored value with ESC, a newline or Rich markup cannot clear the operator's screen,
    forge a row or recolour the table."""
    hostile = "Acme\x1b[2J\n| forged | row |[red]x[/red]\u202e"
    patient = with_a_disclosure(store, hostile, organization=hostile)
    shown = run("disclosures", "--patient", patient)
    assert "\x1b" not in shown and "\u202e" not in shown  # nothing for the terminal to act on
    assert "\\x1b" in shown and "\\u202e" in shown  # shown as escapes instead
    assert "[red]" in shown  # markup shown as text, not read
    assert not any(line.lstrip().startswith("| forged") for line in shown.splitlines())


@pytest.mark.security
def test_csv_exports_escape_control_characters_and_files_are_owner_only(
    store: Store, tmp_path: Path
) -> None:
    """`--csv -` on a terminal and `--csv FILE` alike: no raw escapes; the file, which names
    patients, is created owner-only (even replacing, with --overwrite, one that existed with
    wider modes)."""
    hostile = "Acme\x1b[2J\u202e"
    with_a_disclosure(store, hostile)
    exported = tmp_path / "ledger.csv"
    exported.write_text("")
    exported.chmod(0o644)

    shown = run("disclosures", "--csv", "-")
    run("disclosures", "--csv", str(exported), "--overwrite")
    run("deliveries", "--parquet", str(tmp_path / "ledger.parquet"))

    for text in (shown, exported.read_text()):
        assert "\x1b" not in text and "\u202e" not in text
        assert "Acme\\x1b[2J\\u202e" in text
    for written in (exported, tmp_path / "ledger.parquet"):
        assert oct(written.stat().st_mode & 0o777) == oct(0o600), written
    refused = run("deliveries", "--csv", str(tmp_path / "no" / "such" / "x.csv"), code=2)
    assert refused.strip().endswith("No such file or directory") and "--csv" in refused


@pytest.mark.bad_input
def test_parquet_without_pyarrow_is_one_line_naming_the_extra(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as an install without the extra
    refused = run("deliveries", "--parquet", str(tmp_path / "x.parquet"), code=2)
    assert refused.count("\n") == 1 and "install the `parquet` extra" in refused
    assert not (tmp_path / "x.parquet").exists()


def test_events_prefect_cannot_take_are_one_warning_and_the_document_is_stored(
    tmp_path: Path,
) -> None:
    closed = free_port()
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{closed}/api",
           "PATIENT_DELIVERY_HOME": str(tmp_path / "home"), "COLUMNS": "200"}  # fmt: skip
    command = str(Path(sys.executable).parent / "patient-delivery")

    def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([command, *args], env=env, cwd=tmp_path, input=stdin,
                              capture_output=True, timeout=120, check=False)  # fmt: skip

    run("org", "add", "Acme", "--id", "acme")
    run("project", "add", "acme", "Study", "--id", "study")
    patient = run("patient", "add", "study").stdout.decode().strip()
    ccda = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>t</title></ClinicalDocument>'
    done = run("document", "put", patient, "ccda", "-", stdin=ccda)
    assert done.returncode == 0, done.stderr.decode()[-2000:]  # stored: the schedule sends it
    assert done.stdout.decode().startswith("stored ccda version 1")
    lines = [line for line in done.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: 1 event(s) not sent to Prefect"), lines


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("address", "tls", "says"),
    [
        ("tls://127.0.0.1:1", {}, "set DASK_DISTRIBUTED__COMM__TLS__CA_FILE"),
        ("tls://127.0.0.1:1", {"ca-file": "MISSING", "client": {"cert": "MISSING"}},
         "DASK_DISTRIBUTED__COMM__TLS__CA_FILE cannot be read"),
        ("ftp://127.0.0.1:1", {}, "give `local`, tcp://host:port or tls://host:port"),
    ],
)  # fmt: skip
def test_a_dask_address_this_process_cannot_use_is_refused_before_anything_is_claimed(
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    address: str,
    tls: dict[str, object],
    says: str,
) -> None:
    import dask.config

    from patient_delivery.settings import get_settings
    from patient_delivery.store.models import Delivery

    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    ingest.subscribe(store, project, f"local-destination/t-{uuid.uuid4().hex[:8]}")
    ingest.put_document(store, ingest.add_patient(store, project), "ccda", CCDA)
    missing = str(tmp_path / "nowhere.pem")
    settings = {key: (missing if value == "MISSING" else value) for key, value in tls.items()}
    if "client" in settings:
        settings["client"] = {"cert": missing}
    with dask.config.set({"distributed.comm.tls": settings} if settings else {}):
        refused = run("deliver", "--dask", address, code=2)
        monkeypatch.setenv("PATIENT_DELIVERY_DASK_ADDRESS", address)  # or from the settings
        get_settings.cache_clear()
        try:
            from_settings = run("deliver", code=2)
        finally:
            monkeypatch.delenv("PATIENT_DELIVERY_DASK_ADDRESS")
            get_settings.cache_clear()
    assert refused.count("\n") == 1 and says in refused and missing not in refused
    assert from_settings == refused
    with store.session() as session:
        assert session.query(Delivery).filter(Delivery.claimed_by.is_not(None)).count() == 0
