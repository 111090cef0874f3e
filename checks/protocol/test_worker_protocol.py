"""Conformance test of the worker protocol (docs/worker-protocol.md), from outside the Rust
crates: it plays the master against any worker and checks what the master relies on.

Against a running worker, set:
  WORKER_URL        the worker's base URL (`{WORKER_URL}/work`), as in its registry record
  REDIS_URL         the Redis the worker registers in; REDIS_KEY_PREFIX (default `ensemble`)
  WORKER_TOKEN      the shared token
  RESULT_PORT       the loopback port this test listens on for `POST /result`; the
                    worker's MASTER_URL must be http://127.0.0.1:$RESULT_PORT
  WORKER_STOP_CMD   optional: a shell command that sends the worker SIGTERM (without it
                    the drain test is skipped)
  HEARTBEAT_INTERVAL_MS  optional: the worker's interval, to check TTL = 3 x interval
  CONFORMANCE_CAPABILITY the capability to use (default `echo`): its agent must return its
                    input, first waiting `echo_delay_ms` when the input has it.
Without WORKER_URL the test starts its own redis-server on a free port and the Rust worker
from ${CARGO_TARGET_DIR:-target}/debug/worker (`AGENT_KIND=echo`), and stops both.

Every record, `/work` answer, error body and report seen is validated against the schemas
generated from the Rust types (docs/schemas/).
"""

import http.server
import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import jsonschema
import pytest
import redis

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "docs" / "schemas"
CAPABILITY = os.environ.get("CONFORMANCE_CAPABILITY", "echo")
# Every wait below is a bounded poll; this is its upper bound.
PATIENCE_S = 20.0
# How long a "slow" step runs: long enough to look at it while it runs.
SLOW_MS = 1500


def schema(name):
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def validate(name, instance):
    jsonschema.Draft202012Validator(schema(name)).validate(instance)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout=PATIENCE_S, every=0.05):
    """Polls `check` until it returns something truthy; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class FakeMaster:
    """`POST /result` and `GET /health` of a master: keeps every report with its headers,
    answers `200 {"status": "recorded"}`."""

    def __init__(self, port):
        self.reports = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._answer(200, {"status": "ok", "service": "master"})

            def do_POST(self):
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                if self.path != "/result":
                    self._answer(404, {"error": {"code": "not_found", "message": self.path}})
                    return
                with outer.lock:
                    outer.reports.append(
                        {
                            "body": json.loads(body),
                            "authorization": self.headers.get("authorization"),
                            "request_id": self.headers.get("x-request-id"),
                        }
                    )
                self._answer(200, {"status": "recorded"})

            def _answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reports_for(self, ref):
        with self.lock:
            return [
                r
                for r in self.reports
                if (r["body"].get("task_id"), r["body"].get("step"), r["body"].get("attempt"))
                == (ref["task_id"], ref["step"], ref["attempt"])
            ]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Harness:
    """The worker under test, its Redis and the fake master."""

    def __init__(self):
        self.cleanups = []
        self.worker_process = None
        self.stop_cmd = os.environ.get("WORKER_STOP_CMD")
        self.token = os.environ.get("WORKER_TOKEN", "conformance-worker-token")
        self.prefix = os.environ.get("REDIS_KEY_PREFIX", "ensemble")
        self.interval_ms = int(os.environ.get("HEARTBEAT_INTERVAL_MS", "0")) or None
        if os.environ.get("WORKER_URL"):
            self.url = os.environ["WORKER_URL"].rstrip("/")
            self.redis = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
            self.master = FakeMaster(int(os.environ["RESULT_PORT"]))
            self.cleanups.append(self.master.close)
        else:
            self.launch()
        self.record = wait_for("the worker's registry record", self.find_record)
        self.id = self.record["id"]

    def launch(self):
        binary = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug" / "worker"
        if not binary.exists():
            pytest.fail(f"{binary} does not exist: build it first (cargo build -p worker)")
        server = shutil.which("redis-server")
        if not server:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        tmp = tempfile.mkdtemp(prefix="worker-protocol-")
        self.cleanups.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
        redis_port = free_port()
        redis_proc = subprocess.Popen(
            [server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        self.cleanups.append(lambda: (redis_proc.terminate(), redis_proc.wait(10)))
        self.redis = redis.Redis(port=redis_port, decode_responses=True)
        wait_for("redis-server to answer", self._redis_up)
        self.prefix = f"conformance-{uuid.uuid4().hex[:8]}"
        self.interval_ms = 200
        master_port = free_port()
        self.master = FakeMaster(master_port)
        self.cleanups.append(self.master.close)
        worker_port = free_port()
        self.url = f"http://127.0.0.1:{worker_port}"
        env = dict(
            os.environ,
            HOST="127.0.0.1",
            PORT=str(worker_port),
            ADVERTISE_URL=self.url,
            REDIS_URL=f"redis://127.0.0.1:{redis_port}",
            REDIS_KEY_PREFIX=self.prefix,
            WORKER_TOKEN=self.token,
            MASTER_URL=f"http://127.0.0.1:{master_port}",
            AGENT_KIND="echo",
            CAPABILITIES=CAPABILITY,
            MAX_CONCURRENCY="2",
            AGENT_ID=f"conformance-{uuid.uuid4().hex[:8]}",
            HEARTBEAT_INTERVAL_MS=str(self.interval_ms),
            SHUTDOWN_GRACE_MS="15000",
            RUST_LOG=os.environ.get("RUST_LOG", "warn"),
        )
        self.log = open(pathlib.Path(tmp) / "worker.log", "wb")
        self.worker_process = subprocess.Popen([str(binary)], env=env, stdout=self.log, stderr=subprocess.STDOUT)

        def stop_worker():
            if self.worker_process.poll() is None:
                self.worker_process.kill()
                self.worker_process.wait(10)
            self.log.close()

        self.cleanups.append(stop_worker)

    def _redis_up(self):
        try:
            return self.redis.ping()
        except redis.exceptions.ConnectionError:
            return False

    def key(self, worker_id):
        return f"{self.prefix}:{{registry}}:worker:{worker_id}"

    @property
    def live_set(self):
        return f"{self.prefix}:{{registry}}:workers"

    @property
    def events(self):
        return f"{self.prefix}:events"

    def find_record(self):
        """The record whose `url` is the worker's URL, among the live ones."""
        for worker_id in self.redis.zrange(self.live_set, 0, -1):
            raw = self.redis.get(self.key(worker_id))
            if raw and json.loads(raw).get("url", "").rstrip("/") == self.url:
                return json.loads(raw)
        return None

    def current_record(self):
        raw = self.redis.get(self.key(self.id))
        if raw is None:
            return None
        record = json.loads(raw)
        validate("WorkerRecord", record)
        return record

    def can_stop(self):
        return self.worker_process is not None or bool(self.stop_cmd)

    def stop(self):
        if self.worker_process is not None:
            self.worker_process.send_signal(signal.SIGTERM)
        else:
            subprocess.run(shlex.split(self.stop_cmd), check=True)

    def close(self):
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception as e:  # a failed cleanup must not hide the others
                print(f"cleanup failed: {e}")


@pytest.fixture(scope="module")
def h():
    harness = Harness()
    yield harness
    harness.close()


def post_work(h, body, token="default", request_id=None):
    """`POST {worker}/work`; returns (status, headers, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{h.url}/work", data=data, method="POST")
    request.add_header("content-type", "application/json")
    if token == "default":
        token = h.token
    if token is not None:
        request.add_header("authorization", f"Bearer {token}")
    if request_id:
        request.add_header("x-request-id", request_id)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read() or b"null")


def work_request(h, input_value=None, schema_valid=True, **overrides):
    """A `WorkRequest` for the test's capability; checked against its schema unless the
    test means it to be invalid."""
    task_id = str(uuid.uuid4())
    value = {"n": 1} if input_value is None else input_value
    body = {
        "task_id": task_id,
        "step": 0,
        "attempt": 1,
        "capability": CAPABILITY,
        "input": value,
        "context": {"task_input": value, "previous": [], "pipeline": None, "total_steps": 1},
        "deadline_ms": int(time.time() * 1000) + 60_000,
        "worker_id": h.id,
    }
    body.update(overrides)
    if schema_valid:
        validate("WorkRequest", body)
    else:
        with pytest.raises(jsonschema.ValidationError):
            validate("WorkRequest", body)
    return body


def ref(body):
    return {"task_id": body["task_id"], "step": body["step"], "attempt": body["attempt"]}


def assert_error(status, headers, body, expected_status, code):
    assert status == expected_status, f"expected {expected_status} {code}, got {status}: {body}"
    validate("ErrorBody", body)
    assert body["error"]["code"] == code, body
    if status in (429, 503):
        assert int(headers["retry-after"]) >= 1, "429 and 503 carry Retry-After"


def wait_for_report(h, body):
    reports = wait_for(f"the report of {ref(body)}", lambda: h.master.reports_for(ref(body)))
    report = reports[0]
    validate("ResultReport", report["body"])
    return report


# The registry


def test_record_matches_its_schema_and_the_registry_rules(h):
    record = h.current_record()
    assert record["id"] == h.id
    assert CAPABILITY in record["capabilities"], f"the worker must serve `{CAPABILITY}`"
    assert record["max_concurrency"] >= 1
    assert not record.get("draining", False)
    assert not record.get("degraded")
    # The live set's score is the record's expiry by the Redis server's clock (TIME + TTL):
    # read together, score - TIME is the record's remaining PTTL.
    with h.redis.pipeline(transaction=True) as p:
        p.zscore(h.live_set, h.id)
        p.pttl(h.key(h.id))
        p.time()
        score, pttl, (secs, micros) = p.execute()
    now_ms = secs * 1000 + micros // 1000
    assert pttl > 0, "the record must be written with a TTL (SET ... PX)"
    assert abs((score - now_ms) - pttl) <= 50, (
        f"live-set score {score} is not Redis TIME ({now_ms}) + the record's PTTL ({pttl}): "
        "score it with the Redis server's clock, as the heartbeat script does"
    )
    if h.interval_ms:
        seen = []
        deadline = time.monotonic() + 3 * h.interval_ms / 1000
        while time.monotonic() < deadline:
            seen.append(h.redis.pttl(h.key(h.id)))
            time.sleep(h.interval_ms / 10_000)
        assert max(seen) <= 3 * h.interval_ms, f"TTL must be 3 x {h.interval_ms} ms, saw {max(seen)}"
        assert max(seen) > 2 * h.interval_ms, f"TTL must be 3 x {h.interval_ms} ms, saw {max(seen)}"
        assert min(seen) > 0, "the record must not lapse between beats"


# POST /work: refusals


def test_work_without_the_token_is_401(h):
    assert_error(*post_work(h, work_request(h), token=None), 401, "unauthorized")
    assert_error(*post_work(h, work_request(h), token="not-the-token"), 401, "unauthorized")


def test_a_bad_body_is_422_and_an_unserved_capability_too(h):
    body = work_request(h)
    del body["deadline_ms"]
    assert_error(*post_work(h, body), 422, "invalid")
    assert_error(*post_work(h, work_request(h, schema_valid=False, attempt=0)), 422, "invalid")
    assert_error(*post_work(h, work_request(h, schema_valid=False, task_id="not a task id")), 422, "invalid")
    assert_error(
        *post_work(h, work_request(h, capability="no-such-capability-here")),
        422,
        "capability_not_served",
    )


def test_a_step_leased_to_another_worker_is_421(h):
    body = work_request(h, worker_id=f"{h.id}-someone-else")
    assert_error(*post_work(h, body), 421, "misdirected")


# POST /work then POST /result


def test_an_accepted_step_is_reported_with_its_attempt_request_id_and_output(h):
    body = work_request(h, {"hello": ["world", 1, None]}, attempt=3, step=0)
    request_id = f"conformance-{uuid.uuid4()}"
    status, _, answer = post_work(h, body, request_id=request_id)
    assert status == 202, answer
    validate("WorkAccepted", answer)
    assert answer["accepted"] is True and not answer.get("duplicate", False)
    report = wait_for_report(h, body)
    sent = report["body"]
    assert sent["task_id"] == body["task_id"]
    assert sent["step"] == body["step"]
    assert sent["attempt"] == 3, "the report carries the request's attempt (the fencing token)"
    assert sent["worker_id"] == h.id
    assert sent["status"] == "succeeded"
    assert sent["output"] == body["input"]
    assert report["authorization"] == f"Bearer {h.token}"
    assert report["request_id"] == request_id, "the report carries the /work request's x-request-id"


def test_a_step_is_listed_in_flight_while_it_runs_and_a_duplicate_is_not_run_twice(h):
    body = work_request(h, {"echo_delay_ms": SLOW_MS})
    status, _, answer = post_work(h, body)
    assert status == 202, answer
    status, _, answer = post_work(h, body)
    assert status == 202, answer
    validate("WorkAccepted", answer)
    assert answer.get("duplicate") is True, "the same attempt, already held, is a duplicate"
    wait_for(
        "the record to list the running step in in_flight",
        lambda: ref(body) in (h.current_record() or {}).get("in_flight", []),
    )
    wait_for_report(h, body)
    wait_for(
        "the record to drop the reported step from in_flight",
        lambda: ref(body) not in (h.current_record() or {}).get("in_flight", []),
    )
    # A second run would report as late as the first did after its start: wait as long.
    time.sleep(SLOW_MS / 1000 + 0.5)
    assert len(h.master.reports_for(ref(body))) == 1, "a duplicate delivery ran the step twice"


def test_past_max_concurrency_a_step_is_429(h):
    capacity = h.current_record()["max_concurrency"]
    held = [work_request(h, {"echo_delay_ms": SLOW_MS * 2}) for _ in range(capacity)]
    for body in held:
        status, _, answer = post_work(h, body)
        assert status == 202, answer
    assert_error(*post_work(h, work_request(h)), 429, "at_capacity")
    for body in held:
        wait_for_report(h, body)


# Drain (last: it stops the worker)


def test_a_drain_publishes_draining_refuses_work_reports_held_steps_and_deregisters(h):
    if not h.can_stop():
        pytest.skip("set WORKER_STOP_CMD to test the drain")
    events = h.redis.pubsub()
    events.subscribe(h.events)
    held = work_request(h, {"echo_delay_ms": SLOW_MS * 2})
    status, _, answer = post_work(h, held)
    assert status == 202, answer
    wait_for("the held step in in_flight", lambda: ref(held) in h.current_record().get("in_flight", []))
    h.stop()
    record = wait_for(
        "a record with draining: true",
        lambda: (lambda r: r if r and r.get("draining") else None)(h.current_record()),
    )
    assert ref(held) in record["in_flight"], "a draining worker still lists what it holds"
    assert_error(*post_work(h, work_request(h)), 503, "draining")
    wait_for_report(h, held)
    wait_for(
        "the record to be removed",
        lambda: h.redis.get(h.key(h.id)) is None and h.redis.zscore(h.live_set, h.id) is None,
    )

    def gone():
        message = events.get_message(timeout=0.05)
        return message and message["type"] == "message" and message["data"] == f"gone:{h.id}"

    wait_for(f"`gone:{h.id}` on {h.events}", gone)
    events.close()
    if h.worker_process is not None:
        assert h.worker_process.wait(PATIENCE_S) == 0, "the worker exits cleanly after a drain"
