"""`Idempotency-Key` replay and the response cache through the official OpenAI Python SDK,
on every provider, streamed and not. The mock (and the fakes' automatic replies) answer
deterministically, so an equal second answer proves nothing alone: each test also reads
the `idempotent-replayed` / `x-ensemble-cache` header and checks in `/metrics` that the
second answer did not reach a provider.

Run by `.ci/run`; by hand: see `test_tools.py`.
"""

import re
import urllib.request
import uuid

import openai
import pytest

PROVIDERS = ["mock", "gemini", "bedrock"]


def provider_calls(base_url: str, provider: str) -> float:
    """Chat requests the gateway sent to `provider`, from its Prometheus text."""
    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics").read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ensemble_gateway_requests_total{") and \
                f'provider="{provider}"' in line and 'endpoint="chat"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def provider_of(model: str) -> str:
    return "gemini" if model == "gemini-cached" else model


def create(client, model, prompt, stream, key=None):
    """One chat completion through the SDK's raw-response API: (headers, text, finish)."""
    headers = {"Idempotency-Key": key} if key else {}
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], stream=stream,
        extra_headers=headers)
    parsed = raw.parse()
    if stream:
        text, finish = "", None
        for chunk in parsed:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return raw.headers, text, finish
    return raw.headers, parsed.choices[0].message.content, parsed.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", PROVIDERS)
def test_replay_answers_the_recorded_completion_without_calling_the_provider(
        client, base_url, model, stream):
    key = f"step-{uuid.uuid4()}"
    headers, text, finish = create(client, model, "replay me", stream, key)
    assert headers.get("idempotent-replayed") is None
    assert text and finish == "stop"
    before = provider_calls(base_url, model)
    # Replayed in both shapes: the first call's `stream` does not matter.
    for again in (stream, not stream):
        headers, replayed, replayed_finish = create(client, model, "replay me", again, key)
        assert headers["idempotent-replayed"] == "true"
        assert (replayed, replayed_finish) == (text, finish)
    assert provider_calls(base_url, model) == before


@pytest.mark.parametrize("model", PROVIDERS)
def test_replay_refuses_the_same_key_with_another_request(client, model):
    key = f"step-{uuid.uuid4()}"
    create(client, model, "first request", False, key)
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        create(client, model, "another request", False, key)
    assert raised.value.code == "idempotency_key_reused"


def test_replay_refuses_a_malformed_key(client):
    with pytest.raises(openai.BadRequestError) as raised:
        create(client, "mock", "hi", False, "k" * 256)
    assert raised.value.param == "Idempotency-Key"


@pytest.mark.parametrize("stream", [False, True])
def test_replay_cache_hit_on_an_alias_with_cache_ttl(client, base_url, stream):
    prompt = f"cache me {uuid.uuid4()}"
    headers, text, finish = create(client, "gemini-cached", prompt, stream)
    assert headers["x-ensemble-cache"] == "miss"
    before = provider_calls(base_url, "gemini")
    headers, cached, cached_finish = create(client, "gemini-cached", prompt, not stream)
    assert headers["x-ensemble-cache"] == "hit"
    assert (cached, cached_finish) == (text, finish)
    assert provider_calls(base_url, "gemini") == before
    # Aliases without cache_ttl_s have no cache at all.
    headers, _, _ = create(client, "gemini", prompt, stream)
    assert "x-ensemble-cache" not in headers
