"""`POST /v1/embeddings` through the official OpenAI Python SDK, on the mock and on the
Gemini (`batchEmbedContents`) and Bedrock (Titan Text Embeddings v2, Cohere Embed v3)
fakes, through the gateway `conftest.py` starts.

Run by `.ci/run`; by hand: `target/py/bin/pytest llm-gateway/tests/python`.
"""

import array
import base64
import math

import openai
import pytest

# Alias → the vector length without `dimensions`.
EMBEDDING_MODELS = {"mock-embed": 256, "gemini-embed": 3072, "titan": 1024, "cohere": 1024}


def as_f32(vector):
    """The numbers as the f32 values they stand for (JSON carries the shortest decimal)."""
    return array.array("f", vector).tolist()


@pytest.mark.parametrize("model", EMBEDDING_MODELS)
def test_a_string_gets_one_unit_vector(client, model):
    reply = client.embeddings.create(model=model, input="The cat sat on the mat.",
                                     encoding_format="float")
    assert reply.object == "list"
    assert reply.model == model
    [data] = reply.data
    assert data.object == "embedding" and data.index == 0
    assert len(data.embedding) == EMBEDDING_MODELS[model]
    assert math.isclose(math.sqrt(sum(x * x for x in data.embedding)), 1.0, rel_tol=1e-4)
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens


@pytest.mark.parametrize("model", EMBEDDING_MODELS)
def test_a_list_gets_vectors_in_order_equal_for_equal_texts(client, model):
    texts = ["alpha", "beta", "alpha"]
    reply = client.embeddings.create(model=model, input=texts, encoding_format="float")
    assert [d.index for d in reply.data] == [0, 1, 2]
    vectors = [d.embedding for d in reply.data]
    assert vectors[0] == vectors[2]
    assert vectors[0] != vectors[1]
    # The same text alone gets the same vector.
    alone = client.embeddings.create(model=model, input="beta", encoding_format="float")
    assert alone.data[0].embedding == vectors[1]


@pytest.mark.parametrize("model", EMBEDDING_MODELS)
def test_base64_decodes_to_the_float_vectors(client, model):
    texts = ["round", "trip"]
    floats = [as_f32(d.embedding) for d in client.embeddings.create(
        model=model, input=texts, encoding_format="float").data]
    # The SDK's default asks for base64 and decodes it itself.
    default = client.embeddings.create(model=model, input=texts)
    assert [d.embedding for d in default.data] == floats
    # Asked for explicitly, the SDK hands the base64 text over as it came.
    explicit = client.embeddings.create(model=model, input=texts, encoding_format="base64")
    for data, expected in zip(explicit.data, floats):
        assert isinstance(data.embedding, str)
        assert array.array("f", base64.b64decode(data.embedding)).tolist() == expected


@pytest.mark.parametrize("model,dimensions", [("mock-embed", 64), ("gemini-embed", 768),
                                              ("titan", 256), ("titan", 512)])
def test_dimensions_shorten_the_vectors(client, model, dimensions):
    reply = client.embeddings.create(model=model, input=["a", "b"], dimensions=dimensions)
    assert [len(d.embedding) for d in reply.data] == [dimensions, dimensions]


@pytest.mark.parametrize("model,dimensions", [("cohere", 256), ("titan", 300)])
def test_dimensions_a_model_lacks_are_refused(client, model, dimensions):
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=model, input="a", dimensions=dimensions)
    assert refused.value.body["param"] == "dimensions"


def test_failing_targets_fall_back(client):
    # The Gemini fake fails a text with `[fake:fail=503]`, the Bedrock one `[fake:fail]`.
    text = "[fake:fail=503] [fake:fail]"
    raw = client.embeddings.with_raw_response.create(model="embed-fallback", input=text)
    assert raw.headers["x-ensemble-provider"] == "mock"
    reply = raw.parse()
    assert reply.model == "embed-fallback"
    assert len(reply.data[0].embedding) == 256
    raw = client.embeddings.with_raw_response.create(model="embed-fallback", input="fine")
    assert raw.headers["x-ensemble-provider"] == "gemini"


@pytest.mark.parametrize("bad", ["", [], ["a", ""], [1, 2, 3], [[1, 2]]])
def test_bad_input_is_refused_naming_it(client, bad):
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="mock-embed", input=bad)
    assert refused.value.body["param"] == "input"
    assert refused.value.body["type"] == "invalid_request_error"


def test_embedding_aliases_are_listed(client):
    ids = {m.id for m in client.models.list()}
    assert set(EMBEDDING_MODELS) | {"embed-fallback"} <= ids
