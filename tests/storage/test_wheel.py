"""The migrations and FORMAT.md ship in the wheel: `mpsearch db upgrade` works from an installed package."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[2]


def test_db_upgrade_runs_from_the_installed_wheel_not_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("mpsearch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mpsearch/storage/migrations/env.py" in names
    assert {
        "mpsearch/storage/migrations/versions/0001_jobs.py",
        "mpsearch/storage/migrations/versions/0002_profiles_and_exports.py",
        "mpsearch/storage/migrations/versions/0003_study_leases.py",
    } <= set(names)

    # FORMAT.md, which every export copies beside its files, ships too (the repo's docs/ copy).
    assert zipfile.ZipFile(wheel).read("mpsearch/export/FORMAT.md") == (REPO / "docs" / "FORMAT.md").read_bytes()

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a wheel is installed by unpacking it
    workdir = tmp_path / "elsewhere"  # away from the checkout, so nothing can come from it
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import mpsearch; print(mpsearch.__file__)"], capture_output=True, text=True, cwd=workdir, env=env)
    assert where.stdout.strip() == str(site / "mpsearch" / "__init__.py")
    out = subprocess.run(
        [sys.executable, "-m", "mpsearch", "db", "upgrade", "--storage", "sqlite:///installed.db"],
        capture_output=True, text=True, cwd=workdir, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    engine = sa.create_engine(f"sqlite:///{workdir / 'installed.db'}")
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM mpsearch_alembic_version")).scalar() == "0004"
    engine.dispose()
