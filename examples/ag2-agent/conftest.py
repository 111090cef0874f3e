"""The cluster the end-to-end test runs against: real processes on free loopback ports.

A `redis-server` (never 6379), the llm-gateway with its mock provider, the master with
`pipeline.toml`, a Rust worker with the built-in `llm` agent for `plan` and `finalize`, the
AG2 service (`service.py`, from this interpreter's environment) and a worker with
`AGENT_KIND=http` forwarding `critique` to it. The binaries come from
`${CARGO_TARGET_DIR:-target}/debug/` (`cargo build -p master -p worker -p llm-gateway`).

Every process is stopped at the end, whatever happened; every wait is bounded; a failed
test's report carries the log of every process (a section per process).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")).resolve() / "debug"

API_KEY = "e2e-client-key"
OPERATOR_KEY = "e2e-operator-key"
WORKER_TOKEN = "e2e-worker-token"
GATEWAY_TOKEN = "e2e-gateway-token"
#: The worker ids, fixed so the test can say which worker ran a step.
LLM_WORKER = "worker-llm"
CRITIQUE_WORKER = "worker-critique"
#: The finalize prompt of the test's Rust worker. The mock model quotes the first words of
#: the prompt and counts its words, so with the critique first the final answer shows
#: exactly what `finalize` was given.
FINALIZE_SUFFIX = "Write the final answer to the task, taking this critique into account."
FINALIZE_PROMPT = "{{input}}\n\n" + FINALIZE_SUFFIX

#: Clusters started by this session, so a failed report can carry their logs.
CLUSTERS: list["Cluster"] = []


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float, cluster: "Cluster | None" = None) -> Any:
    """Poll `check` every 100 ms until it returns something truthy, at most `timeout` seconds;
    fail naming `what` (and a process that exited meanwhile) otherwise."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 — any failure to check means "not yet"
            last_error = e
        if cluster is not None:
            cluster.assert_running()
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})")


def http(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 10) -> tuple[int, Any]:
    """One request; the status and the JSON body (or the text when it is not JSON)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def status_of(url: str) -> int:
    """The status of `GET url`; an exception when nothing answers."""
    return http("GET", url, timeout=2)[0]


class Cluster:
    """The processes of one test cluster, by name, with their logs in a temp dir."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports = {name: free_port() for name in ("redis", "gateway", "master", "worker", "agent", "critique")}
        self.master = f"http://127.0.0.1:{self.ports['master']}"
        self.gateway = f"http://127.0.0.1:{self.ports['gateway']}"
        self.worker = f"http://127.0.0.1:{self.ports['worker']}"
        self.agent = f"http://127.0.0.1:{self.ports['agent']}"
        self.critique_worker = f"http://127.0.0.1:{self.ports['critique']}"

    # --- processes -------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        """Start a process with only the environment given (plus PATH and HOME), its output
        going to `{dir}/{name}.log`."""
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
        log = open(self.dir / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            [str(a) for a in argv], env={**base, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
        )
        log.close()

    def stop(self, name: str) -> None:
        """SIGTERM, then SIGKILL after 10 s; waits for the exit either way."""
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        process.stopped_on_purpose = True
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def stop_all(self) -> None:
        """Every process, the clients of Redis before Redis."""
        for name in reversed(list(self.processes)):
            try:
                self.stop(name)
            except Exception:  # noqa: BLE001 — keep stopping the others
                self.processes[name].kill()

    def assert_running(self) -> None:
        """Fail at once, naming it, when a process has exited (a wait would only time out)."""
        for name, process in self.processes.items():
            if process.poll() is not None and not getattr(process, "stopped_on_purpose", False):
                raise AssertionError(f"{name} exited with code {process.returncode}; its log:\n{self.log(name)}")

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else "(no log)"

    # --- the services ----------------------------------------------------------------

    def redis_env(self) -> dict[str, str]:
        return {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(self.ports["redis"])}

    def start(self) -> None:
        """Start everything, each once the one it needs is ready."""
        for binary in ("llm-gateway", "master", "worker"):
            if not (BIN / binary).exists():
                raise AssertionError(
                    f"{BIN / binary} is missing: run `cargo build -p master -p worker -p llm-gateway` first"
                )
        self.spawn(
            "redis",
            ["redis-server", "--port", self.ports["redis"], "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            {},
        )
        wait_for("redis-server to answer PING", self.redis_ping, 20, self)
        rust = {"RUST_LOG": "info", "HOST": "127.0.0.1", "NO_COLOR": "1"}
        self.spawn(
            "gateway",
            [BIN / "llm-gateway"],
            {**rust, "PORT": str(self.ports["gateway"]), "LLM_PROVIDER": "mock", "GATEWAY_TOKEN": GATEWAY_TOKEN},
        )
        self.spawn(
            "master",
            [BIN / "master"],
            {
                **rust, **self.redis_env(),
                "PORT": str(self.ports["master"]),
                "ENSEMBLE_CONFIG": str(HERE / "pipeline.toml"),
                "API_KEYS": f"e2e:{API_KEY}",
                "OPERATOR_API_KEYS": f"ops:{OPERATOR_KEY}",
                "WORKER_TOKEN": WORKER_TOKEN,
            },
        )
        worker_toml = self.dir / "worker-llm.toml"
        worker_toml.write_text(f"[prompts]\nfinalize = {json.dumps(FINALIZE_PROMPT)}\n")
        self.spawn_worker(LLM_WORKER, "worker", {
            "CAPABILITIES": "plan,finalize",
            "LLM_GATEWAY_URL": self.gateway,
            "GATEWAY_TOKEN": GATEWAY_TOKEN,
            "LLM_MODEL": "default",
            "ENSEMBLE_CONFIG": str(worker_toml),
        })
        self.start_agent()
        self.spawn_worker(CRITIQUE_WORKER, "critique", {
            "CAPABILITIES": "critique",
            "AGENT_KIND": "http",
            "AGENT_URL": f"{self.agent}/step",
        })
        for name, url in (("gateway", self.gateway), ("master", self.master), (LLM_WORKER, self.worker),
                          ("the AG2 service", self.agent), (CRITIQUE_WORKER, self.critique_worker)):
            path = "/health" if url == self.agent else "/ready"
            wait_for(f"{name} to be ready ({url}{path})", lambda: status_of(url + path) == 200, 60, self)
        wait_for("the master to list both workers", self.workers_registered, 30, self)

    def spawn_worker(self, agent_id: str, port: str, env: dict[str, str]) -> None:
        self.spawn(agent_id, [BIN / "worker"], {
            "RUST_LOG": "info", "NO_COLOR": "1", **self.redis_env(),
            "HOST": "127.0.0.1",
            "PORT": str(self.ports[port]),
            "ADVERTISE_URL": f"http://127.0.0.1:{self.ports[port]}",
            "AGENT_ID": agent_id,
            "MASTER_URL": self.master,
            "WORKER_TOKEN": WORKER_TOKEN,
            **env,
        })

    def start_agent(self) -> None:
        """The AG2 service, with the Python running this test (the venv with its
        requirements), on its fixed port, so a restart is found at the same address."""
        self.spawn("agent", [sys.executable, HERE / "service.py"], {
            "HOST": "127.0.0.1",
            "PORT": str(self.ports["agent"]),
            "OPENAI_BASE_URL": f"{self.gateway}/v1",
            "OPENAI_API_KEY": GATEWAY_TOKEN,
            "AG2_MODEL": "default",
            "PYTHONUNBUFFERED": "1",
        })

    def redis_ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.ports["redis"]), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    def workers_registered(self) -> bool:
        status, body = http("GET", f"{self.master}/workers", token=OPERATOR_KEY)
        by_capability = body.get("by_capability", {}) if status == 200 else {}
        return all(
            worker in by_capability.get(capability, [])
            for capability, worker in (("plan", LLM_WORKER), ("finalize", LLM_WORKER), ("critique", CRITIQUE_WORKER))
        )

    # --- the master's API ------------------------------------------------------------

    def submit(self, body: dict[str, Any]) -> str:
        status, answer = http("POST", f"{self.master}/task", body, token=API_KEY)
        assert status == 202, f"POST /task answered {status}: {answer}"
        return answer["task_id"]

    def task(self, task_id: str) -> dict[str, Any]:
        status, view = http("GET", f"{self.master}/task/{task_id}", token=API_KEY)
        assert status == 200, f"GET /task/{task_id} answered {status}: {view}"
        return view

    def wait_finished(self, task_id: str, timeout: float = 60) -> dict[str, Any]:
        """The task's view once it has finished (long polls of at most 5 s, `timeout` in all)."""

        def finished() -> bool:
            status, _ = http("GET", f"{self.master}/result/{task_id}?wait=5", token=API_KEY, timeout=10)
            return status == 200

        wait_for(f"task {task_id} to finish", finished, timeout, self)
        return self.task(task_id)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A started cluster for the module's tests, stopped (every process) at the end. Its
    logs stay in pytest's temp dir (the last three runs are kept)."""
    c = Cluster(tmp_path_factory.mktemp("ag2-e2e"))
    CLUSTERS.append(c)
    try:
        c.start()
        yield c
    finally:
        c.stop_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach every process's log to a failed test's report (set-up failures included)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for c in CLUSTERS[-1:]:
            for name in c.processes:
                report.sections.append((f"log of {name}", c.log(name)[-20000:]))
