"""The cluster manifests cannot run here (no Kubernetes, no cloud), so they are checked as data:
each parses, and each mpsearch command in them names a real command and real options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import sqlalchemy as sa
import yaml

from mpsearch.cli import cli

from conftest import REPO

CLUSTER = REPO / "cluster"


def mpsearch_commands(text: str) -> list[list[str]]:
    """Every ``mpsearch …`` invocation in ``text`` (shell lines, comments, strings), as argv after ``mpsearch``.

    Markdown usage brackets are dropped (``[--trials N]`` checks ``--trials``); a command ends
    at ``&&``, ``|``, a backtick or a comment.
    """
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip().lstrip("#").strip()
        # At the start of a line (or comment), or after `&&`, `|`, `;`, `(`, a prompt or `python -m`: not in prose.
        for match in re.finditer(r"(?:^|&&|\|\||[;|(`]|\$ |-m )\s*mpsearch\s+([a-z][^`]*)", line):
            chunk = re.split(r"\s(?:&&|\|\||\||#)\s", match.group(1).replace("\\|", " "))[0]
            words = [w.strip("[]") for w in shlex.split(chunk.replace("[", " ").replace("]", " "), comments=False)]
            commands.append([w for w in words if w])
    return commands


def strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def prose_code(markdown: str) -> str:
    """The code of a Markdown file: fenced blocks and inline code spans, one per line."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", markdown, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", markdown, flags=re.S))
    return "\n".join(fenced + inline)


def check_command(argv: list[str]) -> None:
    """``argv`` names an existing (sub)command of the CLI and only options it has."""
    command: click.Command = cli
    args = list(argv)
    while isinstance(command, click.Group) and args and args[0] in command.commands:
        command = command.commands[args.pop(0)]
    assert command is not cli, f"no such command: mpsearch {' '.join(argv)}"
    known = {opt for p in command.params for opt in getattr(p, "opts", [])} | {"--help"}
    for word in args:
        if word.startswith("--"):
            assert word.split("=", 1)[0] in known, f"mpsearch {command.name} has no option {word} (in: mpsearch {' '.join(argv)})"


def test_every_manifest_parses_and_every_mpsearch_command_in_them_is_real():
    documents = {}
    for path in sorted(CLUSTER.glob("*.yaml")):
        documents[path.name] = list(yaml.safe_load_all(path.read_text()))
        assert all(isinstance(d, dict) for d in documents[path.name]), path
    assert set(documents) == {"ray-cluster.yaml", "rayjob.yaml", "postgres.yaml"}
    texts = [(CLUSTER / "Dockerfile").read_text(), prose_code((CLUSTER / "README.md").read_text()), prose_code((REPO / "README.md").read_text())]
    for name, docs in documents.items():
        texts.append((CLUSTER / name).read_text())  # the comments
        texts += [s for d in docs for s in strings(d)]  # the values, folded lines joined
    commands = [argv for text in texts for argv in mpsearch_commands(text)]
    for argv in commands:
        check_command(argv)
    named = {argv[0] for argv in commands}
    assert {"search", "submit", "jobs", "serve", "export", "trials", "db"} <= named, named


def test_the_rayjob_runs_the_search_on_its_cluster_against_the_postgres_service():
    (job,) = yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["mpsearch", "search"] and "--resume" in argv and argv[argv.index("--address") + 1] == "auto"
    spec_in_image = Path(argv[2])
    assert spec_in_image.is_relative_to("/opt/mpsearch") and (REPO / spec_in_image.relative_to("/opt/mpsearch")).is_file()
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (env,) = [e for e in head["env"] if e["name"] == "MPSEARCH_STORAGE"]
    ref = env["valueFrom"]["secretKeyRef"]

    secret, statefulset, service = yaml.safe_load_all((CLUSTER / "postgres.yaml").read_text())
    assert secret["kind"] == "Secret" and ref["name"] == secret["metadata"]["name"]
    url = sa.engine.make_url(secret["stringData"][ref["key"]])
    assert url.get_backend_name() == "postgresql" and url.host == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"] and url.database == secret["stringData"]["POSTGRES_DB"]
    assert statefulset["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def test_the_launcher_config_starts_a_head_with_the_jobs_api_from_the_installed_environment():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert config["provider"]["type"] == "local" and config["file_mounts"]
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-port=8265" in head and "activate" in head
    assert all("activate" in c for c in config["worker_start_ray_commands"])


def test_the_image_installs_this_checkout():
    text = (CLUSTER / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (.+) \S+$", text, re.M)
    for sources in copied:
        for source in sources.split():
            assert (REPO / source).exists(), source
    assert re.search(r"^RUN pip install \. ", text, re.M) and "mpsearch --version" in text
    assert re.search(r"^WORKDIR /opt/mpsearch$", text, re.M)  # where rayjob.yaml finds the studies


@pytest.mark.parametrize("argv", [["search", "--nope"], ["nope"]])
def test_the_checker_itself_catches_a_wrong_command(argv):
    with pytest.raises(AssertionError):
        check_command(argv)
