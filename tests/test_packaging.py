"""How the project installs: one top-level package, `patient_delivery`, with the design card's
folders (`flows/`, `blocks/`, `cli/`) mapped into it, so a Prefect project with folders of its
own by those names neither shadows ours nor is shadowed by it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_one_top_level_package_with_every_module(tmp_path: Path) -> None:
    built = subprocess.run(
        ["bash", str(ROOT / ".ci" / "build-wheel"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"patient_delivery"}
    for folder, package in (("flows", "flows"), ("blocks", "blocks"), ("cli", "cli"),
                            ("patient_delivery", "")):  # fmt: skip
        shipped = {
            f"patient_delivery/{package}/{path.relative_to(ROOT / folder)}".replace("//", "/")
            for path in (ROOT / folder).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        }
        assert shipped <= set(names), sorted(shipped - set(names))  # nothing left behind


def test_the_core_contract_names_every_core_module() -> None:
    """import-linter's "the core imports neither flows nor blocks" lists the core's modules;
    a module added to the core and not to the list would escape it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    [core] = [c for c in config["contracts"] if c["name"].startswith("The core imports")]
    modules = {
        f"patient_delivery.{path.stem}" for path in (ROOT / "patient_delivery").iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()
    }  # fmt: skip
    assert set(core["source_modules"]) == modules


def test_a_folder_with_its_own_flows_and_blocks_shadows_nothing(tmp_path: Path) -> None:
    for own in ("flows", "blocks", "cli"):
        (tmp_path / own).mkdir()
        (tmp_path / own / "__init__.py").write_text(f"MINE = {own!r}\n")
    code = (
        "import blocks, flows, cli\n"
        "import patient_delivery.flows.deliver, patient_delivery.blocks.local\n"
        "from patient_delivery.cli import app\n"
        "print(blocks.MINE, flows.MINE, cli.MINE, patient_delivery.blocks.local.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["blocks", "flows", "cli", "patient_delivery.blocks.local"]
