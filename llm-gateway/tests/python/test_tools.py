"""Tool calling, structured output and agent-shaped histories through the official OpenAI
Python SDK, on every provider: the gateway (started by `conftest.py`) serves the aliases
`mock`, and `gemini` and `bedrock` over the Rust test fakes (`examples/fake_upstreams.rs`),
which speak each provider's wire format and answer from the request.

Run by `.ci/run`; by hand: `python3 -m venv target/py && target/py/bin/pip install openai
pytest && target/py/bin/pytest llm-gateway/tests/python`.
"""

import json

import openai
import pytest

PROVIDERS = ["mock", "gemini", "bedrock"]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
        },
    },
]


def ask(prompt: str):
    return [{"role": "user", "content": prompt}]


@pytest.mark.parametrize("model", PROVIDERS)
def test_a_tool_call_comes_back_with_finish_reason_tool_calls(client, model):
    reply = client.chat.completions.create(
        model=model, messages=ask("weather in Paris"), tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "weather in Paris", "unit": "c"}


@pytest.mark.parametrize("model", PROVIDERS)
def test_streamed_tool_call_deltas_accumulate_to_the_same_calls(client, model):
    messages = ask("weather and time [mock:parallel]")
    plain = client.chat.completions.create(model=model, messages=messages, tools=TOOLS)
    expected = [(c.id, c.function.name, json.loads(c.function.arguments))
                for c in plain.choices[0].message.tool_calls]
    assert [name for _, name, _ in expected] == ["get_weather", "get_time"]

    # By hand, as agent frameworks do: index, then id and name, then argument fragments.
    calls: dict[int, dict] = {}
    finish = None
    stream = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, stream=True)
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            if delta.id:
                assert call["id"] is None, "the id comes once"
                call["id"] = delta.id
            if delta.function and delta.function.name:
                call["name"] = delta.function.name
            if delta.function and delta.function.arguments:
                call["arguments"] += delta.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    streamed = [(calls[i]["id"], calls[i]["name"], json.loads(calls[i]["arguments"]))
                for i in sorted(calls)]
    assert streamed == expected

    # And with the SDK's own accumulator.
    with client.chat.completions.stream(model=model, messages=messages, tools=TOOLS) as s:
        final = s.get_final_completion()
    assert [(c.id, c.function.name) for c in final.choices[0].message.tool_calls] == \
        [(i, n) for i, n, _ in expected]


@pytest.mark.parametrize("model", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True])
def test_parallel_calls_round_trip_through_tool_messages(client, model, stream):
    messages = ask("weather and time [mock:parallel]")
    reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS)
    message = reply.choices[0].message
    assert len(message.tool_calls) == 2
    messages.append(message.model_dump(exclude_none=True))
    results = {"get_weather": "18C", "get_time": "10:00"}
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id,
                         "content": results[call.function.name]})
    if stream:
        chunks = list(client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS)
        text = answer.choices[0].message.content
        finish = answer.choices[0].finish_reason
    assert finish == "stop"
    assert "18C" in text and "10:00" in text, text


@pytest.mark.parametrize("model", PROVIDERS)
def test_tool_choice_named_none_and_single_call(client, model):
    named = client.chat.completions.create(
        model=model, messages=ask("what time is it"), tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]

    single = client.chat.completions.create(
        model=model, messages=ask("both [mock:parallel]"), tools=TOOLS,
        parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1

    none = client.chat.completions.create(
        model=model, messages=ask("weather in Paris"), tools=TOOLS, tool_choice="none")
    assert none.choices[0].finish_reason == "stop"
    assert not none.choices[0].message.tool_calls
    assert none.choices[0].message.content


@pytest.mark.parametrize("model", PROVIDERS)
def test_json_schema_output(client, model):
    schema = TOOLS[0]["function"]["parameters"]
    for stream in (False, True):
        kwargs = dict(model=model, messages=ask("weather in Paris"),
                      response_format={"type": "json_schema",
                                       "json_schema": {"name": "weather", "schema": schema}})
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        assert json.loads(text) == {"city": "weather in Paris", "unit": "c"}


@pytest.mark.parametrize("model", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True])
def test_agent_framework_histories_are_accepted(client, model, stream):
    # AG2's two-agent chat: the model's turn first; an executor's empty reply; and a
    # history ending with the model's turn.
    messages = [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "assistant", "content": "What should I do?"},
        {"role": "user", "content": ""},
        {"role": "user", "content": "Plan a trip."},
        {"role": "assistant", "content": ""},
    ]
    if stream:
        chunks = list(client.chat.completions.create(
            model=model, messages=messages, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        reply = client.chat.completions.create(model=model, messages=messages)
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert finish == "stop"
    assert text


REFUSALS = {
    # (alias, marker in the prompt): the finish reason, or None for a 502 error.
    ("gemini", "[fake:finish=SAFETY]"): "content_filter",
    ("gemini", "[fake:finish=MAX_TOKENS]"): "length",
    ("gemini", "[fake:finish=MALFORMED_FUNCTION_CALL]"): None,
    ("bedrock", "[fake:stop=guardrail_intervened]"): "content_filter",
    ("bedrock", "[fake:stop=content_filtered]"): "content_filter",
    ("bedrock", "[fake:stop=max_tokens]"): "length",
    ("bedrock", "[fake:stop=malformed_tool_use]"): None,
}


@pytest.mark.parametrize("model,marker", list(REFUSALS))
@pytest.mark.parametrize("stream", [False, True])
def test_provider_refusals_are_never_a_normal_stop(client, model, marker, stream):
    expected = REFUSALS[(model, marker)]
    kwargs = dict(model=model, messages=ask(f"weather {marker}"), tools=TOOLS)
    if expected is None:
        # Before the first chunk: a 502; after it (text already relayed): the stream's
        # error event, which the SDK raises too.
        with pytest.raises(openai.APIError) as failed:
            if stream:
                list(client.chat.completions.create(stream=True, **kwargs))
            else:
                client.chat.completions.create(**kwargs)
        if not stream:
            assert failed.value.status_code == 502
        assert failed.value.body["code"] == "upstream_malformed_output"
        return
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        finish = client.chat.completions.create(**kwargs).choices[0].finish_reason
    assert finish == expected


def test_fields_that_change_the_meaning_are_refused(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="mock", messages=ask("hi"), n=2)
    assert refused.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="mock", messages=ask("hi"),
            functions=[{"name": "f", "parameters": {"type": "object"}}])
    assert refused.value.body["param"] == "functions"
