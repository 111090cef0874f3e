"""The usage ledger and budgets through the official OpenAI Python SDK: what chat calls
(streamed and not) on the mock, Gemini and Bedrock aliases record in `GET /v1/usage`, a
task's usage hash filled from the `x-ensemble-*` headers, and a spent daily budget raising
`openai.RateLimitError` with `code == "budget_exceeded"`.

Needs the `redis` package (to read the task's hash as the master would).
"""

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid

import openai
import pytest
import redis
from openai import OpenAI

from conftest import OPERATOR_TOKEN

KEY = "ledger-test"
# Alias → the ledger's `<provider>/<model>` for it (conftest's aliases).
MODELS = {
    "mock": "mock/mock-1",
    "gemini": "gemini/gemini-2.5-flash",
    "bedrock": "bedrock/anthropic.claude-test",
}
# USD per million tokens, as priced in conftest's `ledger` TOML: (input, output).
PRICES = {
    "mock": (0.5, 1.5),
    "gemini": (0.3, 2.5),
    "bedrock": (0.8, 4.0),
}


def client_for(base_url, token):
    return OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=30)


def usage_report(base_url, **query):
    """`GET /v1/usage` with the operator token."""
    url = f"{base_url}/usage?{urllib.parse.urlencode(query)}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def row(base_url, model):
    """Today's figures of the test key on `model` (zeros before its first call)."""
    report = usage_report(base_url, key=KEY, model=model)
    rows = [r for r in report["data"] if r["model"] == model]
    assert len(rows) <= 1, report
    if rows:
        return rows[0]
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "calls": 0,
            "cost_usd": 0.0}


def call(client, alias, stream, **kwargs):
    """One chat call; its usage (streamed: from the chunk that carries it)."""
    messages = [{"role": "user", "content": f"count the cost of {alias}"}]
    if not stream:
        reply = client.chat.completions.create(model=alias, messages=messages, **kwargs)
        return reply.usage
    usage = None
    for chunk in client.chat.completions.create(model=alias, messages=messages, stream=True,
                                                **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    return usage


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("alias", MODELS)
def test_a_call_is_recorded_under_its_key_model_and_day(base_url, alias, stream):
    model = MODELS[alias]
    before = row(base_url, model)
    usage = call(client_for(base_url, "ledger-test-token"), alias, stream)
    after = row(base_url, model)
    assert after["calls"] == before["calls"] + 1
    assert after["prompt_tokens"] - before["prompt_tokens"] == usage.prompt_tokens
    assert after["completion_tokens"] - before["completion_tokens"] == usage.completion_tokens
    assert after["total_tokens"] - before["total_tokens"] == usage.total_tokens
    price_in, price_out = PRICES[alias]
    cost = (usage.prompt_tokens * price_in + usage.completion_tokens * price_out) / 1e6
    assert after["cost_usd"] - before["cost_usd"] == pytest.approx(cost, abs=2e-9)
    assert after["date"] == usage_report(base_url)["to"]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_task_headers_fill_the_tasks_usage_hash(base_url, redis_url, stream):
    client = client_for(base_url, "ledger-test-token")
    task = str(uuid.uuid4())
    plan = call(client, "gemini", stream,
                extra_headers={"x-ensemble-task-id": task, "x-ensemble-step-id": "plan"})
    step = call(client, "bedrock", stream,
                extra_headers={"x-ensemble-task-id": task, "x-ensemble-step": "1"})
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    key = f"pytest:usage:{{{task}}}"
    fields = {k: int(v) for k, v in store.hgetall(key).items()}
    assert fields["calls"] == 2
    assert fields["in"] == plan.prompt_tokens + step.prompt_tokens
    assert fields["out"] == plan.completion_tokens + step.completion_tokens
    assert fields["step:plan:in"] == plan.prompt_tokens
    assert fields["step:1:out"] == step.completion_tokens
    assert fields["cost_nanos"] == fields["step:plan:cost_nanos"] + fields["step:1:cost_nanos"] > 0
    assert store.ttl(key) > 0


def test_an_invalid_task_header_is_a_bad_request(base_url):
    client = client_for(base_url, "ledger-test-token")
    with pytest.raises(openai.BadRequestError) as raised:
        call(client, "mock", False, extra_headers={"x-ensemble-task-id": "not:a:task"})
    assert raised.value.code == "invalid_request"
    assert "x-ensemble-task-id" in str(raised.value)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_spent_daily_budget_raises_rate_limit_error(base_url, stream):
    # The key's budget is one token: its first call of the session spends it.
    client = client_for(base_url, "ledger-capped-token")
    if usage_report(base_url, key="ledger-capped")["total"]["total_tokens"] == 0:
        call(client, "mock", False)
    with pytest.raises(openai.RateLimitError) as raised:
        call(client, "mock", stream)
    assert raised.value.code == "budget_exceeded"
    assert raised.value.body["type"] == "insufficient_quota"
    assert "daily token budget of gateway key `ledger-capped`" in raised.value.message
    assert raised.value.response.headers.get("retry-after")


def test_the_usage_report_wants_the_operator_token(base_url):
    request = urllib.request.Request(f"{base_url}/usage",
                                     headers={"Authorization": "Bearer ledger-test-token"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 401
