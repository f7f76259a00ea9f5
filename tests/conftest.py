"""Shared fixtures: real models and real data, built once per test session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import textwrap
from pathlib import Path

import pytest
import torch

from mpsearch.spec import Spec
from mpsearch.workload import Workload, minilm_dir

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STUDY = REPO / "studies" / "minilm.toml"

FACTORIES = textwrap.dedent(
    '''
    """Small model factories for `python:` model sources in tests."""
    import torch
    from torch import nn


    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 10))


    def small_mlp():
        """Small enough for exact per-layer Hessian blocks (512 and 264 weights)."""
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


    def convnet():
        torch.manual_seed(0)
        return ConvNet()


    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, kernel_size=3)
            self.conv1d = nn.Conv1d(8, 8, kernel_size=5)
            self.head = nn.Linear(8, 4)

        def forward(self, images):
            x = torch.relu(self.conv(images))           # (B, 8, 6, 6)
            x = torch.relu(self.conv1d(x.flatten(2)))    # (B, 8, 32)
            return self.head(x.mean(-1))


    class TextClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(30522, 32)
            self.hidden = nn.Linear(32, 32)
            self.head = nn.Linear(32, 2)

        def forward(self, input_ids, attention_mask):
            mask = attention_mask[..., None].float()
            pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
            return {"logits": self.head(torch.tanh(self.hidden(pooled)))}


    def text_classifier():
        torch.manual_seed(0)
        return TextClassifier()


    def not_a_model():
        return 42


    def first_token_mse(output, reference, batch):
        """A user loss: squared error of the first output column, summed over the batch."""
        diff = (output.value[:, 0] - reference.value[:, 0]) ** 2
        return diff.sum(), torch.tensor(float(diff.numel()))
    '''
)


@pytest.fixture(scope="session", autouse=True)
def bank_cache(tmp_path_factory) -> Path:
    """Candidate banks cache into a folder of this test session, never the user's cache."""
    import os

    folder = tmp_path_factory.mktemp("bank-cache")
    os.environ["MPSEARCH_CACHE_DIR"] = str(folder)  # inherited by the CLI subprocesses
    return folder


@pytest.fixture(scope="session")
def minilm_spec() -> Spec:
    """The default study with small data, so the real model runs in seconds."""
    spec = Spec.load(DEFAULT_STUDY)
    # Its scheme options are left out to keep the many tests on it quick; tests/export/test_scheme_options.py covers them.
    # So is its clipping: the thresholds of the tests on this spec were measured without it (it costs the bank a
    # third more time, too); tests/quant/test_rtn.py, test_gptq.py and test_bank.py cover it.
    return spec.with_overrides(
        data={"source": "stdlib-docs", "calibration": 16, "evaluation": 32, "max_length": 64, "batch_size": 16, "seed": 0},
        quant={**spec.quant.model_dump(), "options": [], "clip": "none"},
    )


@pytest.fixture(scope="session")
def minilm_workload(minilm_spec) -> Workload:
    return Workload(minilm_spec, device="cpu")


@pytest.fixture(scope="session")
def factories_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("factories")
    (folder / "mpsearch_test_factories.py").write_text(FACTORIES)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A GPT-2 (Conv1D layers, tied lm_head) from a tiny config, with MiniLM's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=30522, bos_token_id=101, eos_token_id=102)
    GPT2LMHeadModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, folder / name)
    return folder


def write_spec(folder: Path, text: str, name: str = "study.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def tiny_spec_text(bits=(3, 8)) -> str:
    """MiniLM on 8 + 8 sentences of up to 32 tokens, rtn: a spec that runs in seconds."""
    return textwrap.dedent(f"""
        [data]
        calibration = 8
        evaluation = 8
        max_length = 32
        batch_size = 8
        [quant]
        method = "rtn"
        bits = {list(bits)}
    """)


def tiny_study(folder: Path, bits=(3, 8)) -> Path:
    """:func:`tiny_spec_text`, with its own SQLite file in ``folder``."""
    return write_spec(folder, tiny_spec_text(bits) + f'[storage]\nurl = "sqlite:///{folder / "mpsearch.db"}"\n')


# -- databases -----------------------------------------------------------------------------

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def fresh_postgres():
    """A new PostgreSQL database's URL, dropped on exit."""
    import uuid

    import psycopg

    name = f"mpsearch_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database for one test, dropped afterwards. Never skipped: if the
    server is down, the test errors (``.ci/run`` starts it)."""
    with fresh_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    """Each storage test runs on a fresh SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mpsearch.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture
def password_refusing_server():
    """A TCP server that speaks just enough of PostgreSQL's wire protocol to ask for a
    password and refuse it (SQLSTATE 28P01).

    This is a fake, on purpose: the machine's PostgreSQL uses trust auth, so a real server
    cannot produce a wrong-password failure here. Yields its port.
    """
    import socket
    import struct
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()

    def read_message(conn, typed):
        head = conn.recv(5 if typed else 4, socket.MSG_WAITALL)
        length = struct.unpack("!I", head[-4:])[0]
        return head, conn.recv(length - 4, socket.MSG_WAITALL)

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    _, body = read_message(conn, typed=False)
                    while struct.unpack("!I", body[:4])[0] in (80877103, 80877104):  # SSL / GSS requests
                        conn.sendall(b"N")
                        _, body = read_message(conn, typed=False)
                    conn.sendall(b"R" + struct.pack("!II", 8, 3))  # AuthenticationCleartextPassword
                    read_message(conn, typed=True)  # the password
                    fields = b"".join(
                        code + text.encode() + b"\0"
                        for code, text in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", "28P01"), (b"M", 'password authentication failed for user "alice"'))
                    ) + b"\0"
                    conn.sendall(b"E" + struct.pack("!I", len(fields) + 4) + fields)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


# -- a Ray cluster -------------------------------------------------------------------------

RAY = Path(sys.executable).with_name("ray")


class RayCluster:
    def __init__(self, address: str, dashboard: str):
        self.address, self.dashboard = address, dashboard  # GCS HOST:PORT, and the Jobs API URL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, alive=lambda: True, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert alive() and time.monotonic() < deadline, f"nothing came up on port {port}"
            time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_cluster():
    """The single-node cluster .ci/run started (``$MPSEARCH_TEST_RAY_ADDRESS`` and
    ``$MPSEARCH_TEST_RAY_DASHBOARD``), or one started here with DESIGN.md's command.

    One started here runs in the foreground (``--block``) in its own session and is stopped
    by signalling that session: ``ray stop`` would kill every Ray process on the machine,
    this test process's own local Ray included. It starts with this environment's ``bin``
    first on PATH, so a Ray job's ``python -m mpsearch`` is this install.
    """
    address = os.environ.get("MPSEARCH_TEST_RAY_ADDRESS")
    if address:
        yield RayCluster(address, os.environ.get("MPSEARCH_TEST_RAY_DASHBOARD", "http://127.0.0.1:8265"))
        return
    port, dashboard = 6391, 8275
    with ray_head(port, "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)) as head:
        wait_for_port(dashboard, lambda: head.poll() is None)
        time.sleep(3)  # the dashboard's modules (state and Jobs API) come up after its port
        yield RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}")


@contextlib.contextmanager
def ray_head(port: int, *args: str, env: dict | None = None):
    """A Ray head on ``port`` in the foreground of its own session, stopped by signalling it
    (``ray stop`` would stop every Ray on the machine)."""
    env = {**os.environ, **(env or {}), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2", "--disable-usage-stats", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )
    try:
        wait_for_port(port, lambda: head.poll() is None)
        yield head
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)
