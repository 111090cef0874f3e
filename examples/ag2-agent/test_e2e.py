"""End to end: an AG2 agent (service.py) serving the `critique` step of a pipeline that
also runs Ensemble's built-in Rust agents, through a worker with `AGENT_KIND=http`.

The cluster (conftest.py) is real processes: redis-server, the llm-gateway's mock model,
the master, a Rust `llm` worker for `plan` and `finalize`, the AG2 service and its `http`
worker. The mock model answers `Mock reply from mock-1 to "<the first 8 words of the last
user message>" (<its word count> words, ref <hash of the conversation>).`, so each answer
shows what its step was given.
"""

import json
import urllib.request
from typing import Any

from conftest import CRITIQUE_WORKER, FINALIZE_SUFFIX, LLM_WORKER, OPERATOR_KEY, Cluster, http, status_of, wait_for

QUESTION = "What should a small team check before moving a web service to containers?"


def first_words(text: str, n: int = 8) -> str:
    """What the mock model quotes of a message: its first `n` words, single-spaced."""
    return " ".join(text.split()[:n])


def step_of(view: dict[str, Any], capability: str) -> dict[str, Any]:
    return next(s for s in view["steps"] if s["capability"] == capability)


def critique_worker_record(cluster: Cluster) -> dict[str, Any]:
    status, body = http("GET", f"{cluster.master}/workers", token=OPERATOR_KEY)
    assert status == 200, body
    return next(w for w in body["workers"] if w["id"] == CRITIQUE_WORKER)


def assert_critiqued_by_ag2(view: dict[str, Any]) -> None:
    """The task went plan → critique → finalize, the critique written by the AG2 agent from
    the plan, and the final answer written from that critique."""
    assert view["status"] == "succeeded", view
    plan, critique, final = (step_of(view, c) for c in ("plan", "critique", "finalize"))
    assert plan["worker_id"] == LLM_WORKER and final["worker_id"] == LLM_WORKER, view
    assert critique["worker_id"] == CRITIQUE_WORKER, view

    output = critique["output"]
    assert output["agent"] == "ag2-critic", output
    assert output["model"] == "default", output
    assert output["usage"]["total_tokens"] > 0, output
    # The critic was given the plan's text (an object's `text` field), first in its message;
    # the plan's first words carry the plan's own reference hash, so no other text matches.
    plan_text = plan["output"]["text"]
    assert plan_text.startswith("Mock plan from mock-1"), plan
    assert output["text"].startswith(f'Mock reply from mock-1 to "{first_words(plan_text)}"'), (output, plan_text)

    # finalize's prompt is the critique's text then FINALIZE_SUFFIX: the quote and the word
    # count show it was given exactly the AG2 agent's output.
    words = len(output["text"].split()) + len(FINALIZE_SUFFIX.split())
    expected = f'Mock reply from mock-1 to "{first_words(output["text"])}" ({words} words, ref '
    assert final["output"]["text"].startswith(expected), (final["output"], expected)
    assert view["result"] == final["output"], view


def test_a_pipeline_runs_its_critique_step_on_the_ag2_agent(cluster: Cluster) -> None:
    task_id = cluster.submit({"pipeline": "critiqued", "input": {"question": QUESTION}})
    view = cluster.wait_finished(task_id)
    assert_critiqued_by_ag2(view)
    assert step_of(view, "critique")["attempts"] == 1, view


def test_a_step_waits_while_the_agent_is_down_and_runs_when_it_is_back(cluster: Cluster) -> None:
    cluster.stop("agent")
    wait_for(
        "the critique worker to turn not ready with its agent down",
        lambda: status_of(f"{cluster.critique_worker}/ready") == 503,
        30,
        cluster,
    )
    status, ready = http("GET", f"{cluster.critique_worker}/ready")
    assert status == 503, ready
    # The other worker is not affected.
    assert status_of(f"{cluster.worker}/ready") == 200
    wait_for(
        "the critique worker's record to say it takes no steps",
        lambda: critique_worker_record(cluster).get("unavailable"),
        30,
        cluster,
    )

    task_id = cluster.submit({"pipeline": "critiqued", "input": {"question": QUESTION + " (retry)"}})
    wait_for(
        "the plan step to succeed",
        lambda: step_of(cluster.task(task_id), "plan")["status"] == "succeeded",
        30,
        cluster,
    )
    # The critique is not sent to a worker whose agent is down: it waits in the queue, and
    # spends no attempt.
    view = cluster.task(task_id)
    critique = step_of(view, "critique")
    assert view["status"] == "running", view
    assert critique["status"] == "queued" and critique["attempts"] == 0, critique

    cluster.start_agent()
    wait_for(
        "the critique worker to be ready again",
        lambda: status_of(f"{cluster.critique_worker}/ready") == 200,
        30,
        cluster,
    )
    view = cluster.wait_finished(task_id)
    assert_critiqued_by_ag2(view)
    assert step_of(view, "critique")["attempts"] == 1, view


def test_bad_input_fails_the_step_at_once_with_the_agents_message(cluster: Cluster) -> None:
    # A 422 from the agent is a permanent failure: one attempt, whatever max_attempts says.
    task_id = cluster.submit({"steps": [{"capability": "critique", "max_attempts": 3}], "input": ""})
    view = cluster.wait_finished(task_id)
    assert view["status"] == "failed", view
    critique = step_of(view, "critique")
    assert critique["attempts"] == 1, critique
    assert "nothing to critique" in critique["error"]["message"], critique
    assert critique["error"]["retryable"] is False, critique


def test_a_failing_model_is_retried_then_fails_the_step(cluster: Cluster) -> None:
    # The mock fails any call whose prompt holds `[mock:fail=503]`; the agent answers 503,
    # and the master retries the step until its attempts are spent.
    task_id = cluster.submit({
        "steps": [{"capability": "critique", "max_attempts": 2}],
        "input": "A plan that the model cannot read [mock:fail=503]",
    })
    view = cluster.wait_finished(task_id)
    assert view["status"] == "failed", view
    critique = step_of(view, "critique")
    assert critique["attempts"] == 2, critique
    assert "the LLM gateway answered 503" in critique["error"]["message"], critique


def test_the_agent_streams_when_asked_and_ends_with_the_same_output(cluster: Cluster) -> None:
    # Straight to the service, as a worker that asks for Server-Sent Events would.
    step = {"task_id": "stream-test", "step": 1, "attempt": 1, "capability": "critique",
            "input": {"text": "1. Containerise the service. 2. Move it to ECS.", "queries": []},
            "context": {"task_input": {"question": QUESTION}}}
    request = urllib.request.Request(f"{cluster.agent}/step", data=json.dumps(step).encode(), method="POST")
    request.add_header("content-type", "application/json")
    request.add_header("accept", "text/event-stream")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    events = [e for e in body.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), body
    outputs = [json.loads(e[len("data: "):]) for e in events]
    assert len(outputs) > 2, outputs
    # Each message is the output so far; the last is the whole output, as a plain answer.
    texts = [o["text"] for o in outputs]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:])), texts
    status, plain = http("POST", f"{cluster.agent}/step", step)
    assert status == 200, plain
    assert outputs[-1] == plain, (outputs[-1], plain)
