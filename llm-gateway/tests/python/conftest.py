"""The gateway the Python SDK tests talk to: the `llm-gateway` binary over the Rust test
fakes of Gemini and Bedrock (`examples/fake_upstreams.rs`), one per test session, with
chat aliases (`mock`, `gemini`, `bedrock`) and embedding aliases (`mock-embed`,
`gemini-embed`, `titan`, `cohere`, `embed-fallback`). It keeps its ledger, cache and
replay records in a `redis-server` of its own (`redis_url`), started on a free port.

Each feature's test module may add TOML to the gateway's configuration: the
`GATEWAY_TOML` fragments below are joined into one file.
"""

import json
import os
import select
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[3]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
TOKEN = "python-sdk-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_line(process: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("the fakes did not report their addresses")
    return process.stdout.readline()


GATEWAY_TOML = {
    "aliases": (
        '[models.mock]\ntargets = [{ provider = "mock", model = "mock-1" }]\n'
        '[models.gemini]\ntargets = [{ provider = "gemini", model = "gemini-2.5-flash" }]\n'
        '[models.bedrock]\ntargets = [{ provider = "bedrock", model = "anthropic.claude-test" }]\n'
        # Embedding models (test_embeddings.py).
        '[models.mock-embed]\ntargets = [{ provider = "mock", model = "mock-embed" }]\n'
        '[models.gemini-embed]\ntargets = [{ provider = "gemini", model = "gemini-embedding-001" }]\n'
        '[models.titan]\ntargets = [{ provider = "bedrock", model = "amazon.titan-embed-text-v2:0" }]\n'
        '[models.cohere]\ntargets = [{ provider = "bedrock", model = "cohere.embed-english-v3" }]\n'
        '[models.embed-fallback]\ntargets = [{ provider = "gemini", model = "gemini-embedding-001" },'
        ' { provider = "bedrock", model = "amazon.titan-embed-text-v2:0" },'
        ' { provider = "mock", model = "mock-embed" }]\n'
    ),
    # The usage ledger (test_ledger.py): keys of its own, so other modules' calls do not
    # disturb its figures, one with a daily budget of one token; prices for the chat models.
    "ledger": (
        '[keys.ledger-test]\ntoken = "ledger-test-token"\n'
        '[keys.ledger-capped]\ntoken = "ledger-capped-token"\ndaily_max_tokens = 1\n'
        '[prices."mock-1"]\ninput_usd_per_mtok = 0.5\noutput_usd_per_mtok = 1.5\n'
        '[prices."gemini-2.5-flash"]\ninput_usd_per_mtok = 0.3\noutput_usd_per_mtok = 2.5\n'
        '[prices."anthropic.claude-test"]\ninput_usd_per_mtok = 0.8\noutput_usd_per_mtok = 4.0\n'
    ),
    # Response cache (test_replay.py).
    "replay": (
        '[models.gemini-cached]\ntargets = [{ provider = "gemini", model = "gemini-2.5-flash" }]\n'
        'cache_ttl_s = 60\n'
    ),
}

# `GET /v1/usage`'s bearer token (test_ledger.py).
OPERATOR_TOKEN = "python-sdk-operator-token"


@pytest.fixture(scope="session")
def redis_url():
    """A `redis-server` of the session's own on a free loopback port, keeping nothing on
    disk. Fails (never skips) when `redis-server` is missing."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def base_url(redis_url):
    subprocess.run(
        ["cargo", "build", "-q", "-p", "llm-gateway", "--bin", "llm-gateway",
         "--example", "fake_upstreams"],
        cwd=ROOT, check=True, timeout=1800,
    )
    fakes = subprocess.Popen(
        [TARGET / "debug" / "examples" / "fake_upstreams"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    gateway = None
    config = None
    try:
        upstreams = json.loads(read_line(fakes, 30))
        config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        config.write("".join(GATEWAY_TOML.values()))
        config.close()
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "GATEWAY_TOKEN": TOKEN,
            "ENSEMBLE_CONFIG": config.name,
            "GEMINI_API_KEY": upstreams["gemini_api_key"],
            "GEMINI_BASE_URL": upstreams["gemini_base_url"],
            "BEDROCK_ENDPOINT_URL": upstreams["bedrock_endpoint_url"],
            "AWS_REGION": upstreams["aws_region"],
            "AWS_ACCESS_KEY_ID": upstreams["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": upstreams["aws_secret_access_key"],
            "AWS_EC2_METADATA_DISABLED": "true",
            "MAX_RETRIES": "0",
            "USE_REDIS": "true",
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": "pytest",
            "GATEWAY_OPERATOR_TOKEN": OPERATOR_TOKEN,
            "RUST_LOG": "warn",
        })
        gateway = subprocess.Popen([TARGET / "debug" / "llm-gateway"], env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or gateway.poll() is not None:
                    raise RuntimeError("the gateway did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        for process in (gateway, fakes):
            if process is not None:
                process.terminate()
                process.wait(timeout=10)
        if config is not None:
            os.unlink(config.name)


@pytest.fixture
def client(base_url):
    return OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0, timeout=30)
