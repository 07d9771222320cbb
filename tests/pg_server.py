"""A throwaway PostgreSQL server for tests: initdb + pg_ctl in a temporary folder, on a free local port.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user (or ``nobody``) in a folder
that user owns. Tests skip with a message when the binaries are missing (Debian's ``postgresql`` package
installs them; ``.ci/run`` does). When ``LORA_TEST_POSTGRES_URL`` names a running server (``.ci/run`` starts
one and sets it), the tests use a fresh database on it instead of starting their own."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SERVER_URL_VARIABLE = "LORA_TEST_POSTGRES_URL"


def available() -> bool:
    return bool(os.environ.get(SERVER_URL_VARIABLE)) or find_binaries() is not None


def find_binaries() -> tuple[str, str] | None:
    """(initdb, pg_ctl) on PATH, else in /usr/lib/postgresql/<version>/bin (the newest); None when missing."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    for folder in sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(v) if (v := p.split("/")[-2]).isdigit() else -1,
        reverse=True,
    ):
        if os.access(f"{folder}/initdb", os.X_OK) and os.access(f"{folder}/pg_ctl", os.X_OK):
            return f"{folder}/initdb", f"{folder}/pg_ctl"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_user() -> tuple[list[str], pwd.struct_passwd | None]:
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"], user
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


@contextlib.contextmanager
def postgres_server():
    """Yields a SQLAlchemy URL (psycopg 3) of an empty database: a new one on the server ``.ci/run`` started
    (dropped after), else a fresh server's ``postgres`` database (stopped and removed after)."""
    if os.environ.get(SERVER_URL_VARIABLE):
        with _database_on(os.environ[SERVER_URL_VARIABLE]) as url:
            yield url
        return
    binaries = find_binaries()
    if binaries is None:
        raise FileNotFoundError("initdb/pg_ctl")
    initdb, pg_ctl = binaries
    prefix, user = _as_user()
    root = Path(tempfile.mkdtemp(prefix="lora-pg-"))
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    data, port = root / "data", _free_port()
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120, "cwd": root}
    try:
        subprocess.run(
            [*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "lora", "--no-sync", "-E", "UTF8", "--no-locale"],
            **run,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=50"
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"], **run)
        try:
            yield f"postgresql+psycopg://lora@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], **{**run, "check": False}
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _database_on(server_url: str):
    """A new database on a running server, dropped after (so a rerun starts from nothing)."""
    import secrets

    import sqlalchemy

    name = f"lora_test_{secrets.token_hex(4)}"
    admin = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        try:
            yield str(sqlalchemy.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False))
        finally:
            with admin.connect() as connection:
                connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
