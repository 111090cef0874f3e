"""An AG2 agent serving Ensemble steps: the `critique` capability over HTTP.

A worker started with `AGENT_KIND=http AGENT_URL=http://127.0.0.1:9000/step
CAPABILITIES=critique` forwards each step it is given to `POST /step` here and reports
what this service answers: a 2xx JSON body is the step's output, a 4xx fails the step for
good, a 5xx (or no answer) is retried by the master. `GET /health` tells the worker whether
it may take steps at all.

The agent is an `ag2.Agent` (the `ag2` package, 1.x) with a critic's system prompt, calling
the Ensemble llm-gateway (or any OpenAI-compatible API) through AG2's OpenAI client.

Settings (environment):
  OPENAI_BASE_URL  the gateway's OpenAI API root (default http://127.0.0.1:7000/v1)
  OPENAI_API_KEY   a gateway key (GATEWAY_TOKEN); any non-empty text when the gateway has none
  AG2_MODEL        the model alias asked for (default `default`)
  HOST, PORT       where to listen (default 127.0.0.1:9000: the worker is on the same host)
"""

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
import uvicorn
from ag2 import Agent
from ag2.config.openai import OpenAIConfig
from ag2.events.types import ModelMessageChunk
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

log = logging.getLogger("ag2-agent")

#: The one capability this service serves; a step for another is refused (422).
CAPABILITY = "critique"
#: The agent's name, also returned in every output so a reader of the task sees who wrote it.
AGENT_NAME = "ag2-critic"
SYSTEM_MESSAGE = (
    "You are a careful critic in a multi-agent pipeline. You are given a piece of work "
    "(a plan or a draft) and the task it serves. Name its weaknesses, gaps and risks, most "
    "important first, and say concretely how to fix each one. Be brief; do not rewrite the "
    "work yourself."
)
#: Time kept back from the step's deadline so that a timeout is answered (504) before the
#: worker gives up waiting, and the step's error says what happened.
DEADLINE_MARGIN_S = 0.2


@dataclass(frozen=True)
class Settings:
    """What the service reads from the environment, once, at start."""

    #: The OpenAI-compatible API root the agent calls (the llm-gateway's `/v1`).
    base_url: str
    #: Sent as the bearer token; the OpenAI client refuses to run without one.
    api_key: str
    #: The model alias asked for; the gateway maps it to a provider and model.
    model: str
    host: str
    port: int

    @classmethod
    def from_env(cls) -> "Settings":
        """Read the settings, failing with the name of the one that is wrong."""
        api_key = os.environ.get("OPENAI_API_KEY", "")
        if not api_key.strip():
            raise SystemExit(
                "OPENAI_API_KEY is not set: give it the gateway's GATEWAY_TOKEN, or any "
                "non-empty text when the gateway runs with AUTH_DISABLED=true"
            )
        port = os.environ.get("PORT", "9000")
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise SystemExit(f"PORT={port!r} is not a port number (0 to 65535)")
        return cls(
            base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:7000/v1").rstrip("/"),
            api_key=api_key,
            model=os.environ.get("AG2_MODEL", "default"),
            host=os.environ.get("HOST", "127.0.0.1"),
            port=int(port),
        )


class Step(BaseModel):
    """The step the worker forwards (the `http` agent's request body).

    Fields this service does not use are still accepted, so a newer worker that sends more
    does not break it.
    """

    model_config = ConfigDict(extra="allow")

    task_id: str
    step: int
    step_id: str | None = None
    attempt: int = 1
    capability: str
    #: The needed step's output, or the task input for a first step: any JSON.
    input: Any = None
    #: `task_input`, `previous`, `pipeline`, `total_steps`, …
    context: dict[str, Any] = {}
    #: The step's deadline, milliseconds since the epoch.
    deadline_ms: int | None = None
    request_id: str | None = None


class StepFailed(Exception):
    """A step that cannot be answered with an output: its HTTP status and a message.

    The status decides what the master does: a 4xx fails the step for good, a 5xx lets it
    be retried.
    """

    def __init__(self, status: int, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def text_of(value: Any) -> str:
    """A step input as text, by the rule of the worker's prompt templates: a string as it
    is, an object with a string `text` field (an `llm` agent's output) as that text, and
    anything else as pretty-printed JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return value["text"]
    return json.dumps(value, indent=2, ensure_ascii=False)


def seconds_left(step: Step, timeout_ms: str | None) -> float | None:
    """How long the agent may take: the worker's `x-ensemble-timeout-ms` (milliseconds left
    when it sent the step), else the body's `deadline_ms`; `None` when neither is given."""
    if timeout_ms is not None:
        try:
            return int(timeout_ms) / 1000 - DEADLINE_MARGIN_S
        except ValueError:
            raise StepFailed(422, f"x-ensemble-timeout-ms={timeout_ms!r} is not a whole number of milliseconds")
    if step.deadline_ms is not None:
        return step.deadline_ms / 1000 - time.time() - DEADLINE_MARGIN_S
    return None


class Critic:
    """The AG2 agent and what it needs to call the gateway."""

    def __init__(self, settings: Settings, http: httpx2.AsyncClient):
        self.settings = settings
        #: One connection pool for every step (AG2 builds an OpenAI client per turn).
        self.http = http
        #: Stateless between steps: each `ask` starts its own conversation.
        self.agent = Agent(AGENT_NAME, SYSTEM_MESSAGE, config=self.model_config(None))

    def model_config(self, request_id: str | None) -> OpenAIConfig:
        """The gateway settings for one step; the step's request id goes along so the
        gateway's log lines for this call carry it."""
        return OpenAIConfig(
            model=self.settings.model,
            base_url=self.settings.base_url,
            api_key=self.settings.api_key,
            # The gateway retries its providers, and the master retries the step (a 503
            # here): a third layer of retries would only spend the step's deadline.
            max_retries=0,
            http_client=self.http,
            default_headers={"x-request-id": request_id} if request_id else None,
        )

    def message_for(self, step: Step) -> str:
        """The critic's message for a step, or `StepFailed` (422) when the step is not one
        this agent can take."""
        if step.capability != CAPABILITY:
            raise StepFailed(422, f"this agent serves only `{CAPABILITY}`, not `{step.capability}`")
        work = text_of(step.input).strip()
        if not work or work == "null":
            raise StepFailed(
                422,
                "nothing to critique: `input` is empty (give the step a plan or a draft: a "
                "string, or an object with a `text` field)",
            )
        # The work comes first: it is what the critic is asked about. The task follows for
        # context, when it is not the work itself (a first step gets the task as input).
        task = step.context.get("task_input")
        if task is not None and task != step.input:
            return f"{work}\n\nThe task this serves:\n{text_of(task)}"
        return work

    def output(self, text: str, model: str | None, usage: Any = None) -> dict[str, Any]:
        """The step's output: the critique and who wrote it (with the token counts once known)."""
        output: dict[str, Any] = {"text": text, "agent": AGENT_NAME, "model": model or self.settings.model}
        if usage is not None:
            output["usage"] = {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            }
        return output

    @contextmanager
    def gateway_errors(self) -> Iterator[None]:
        """Turn the OpenAI client's errors into `StepFailed`, sorted by what the master
        should do with the step."""
        try:
            yield
        except openai.APIConnectionError as e:  # includes the client's own timeout
            raise StepFailed(503, f"the LLM gateway at {self.settings.base_url} cannot be reached: {e}")
        except openai.APIStatusError as e:
            raise self.gateway_error(e)
        except openai.APIError as e:  # an error event in the middle of a stream
            raise StepFailed(503, f"the LLM gateway's stream failed: {e.message}")

    def finished(self, reply: Any) -> dict[str, Any]:
        """The output of a finished turn; a turn without text is an error worth retrying."""
        if not reply.body:
            raise StepFailed(503, "the model answered no text (its finish reason may say it was filtered)")
        return self.output(reply.body, reply.response.model, reply.response.usage)

    async def critique(self, step: Step, request_id: str | None) -> dict[str, Any]:
        """Critique the step's input, or raise `StepFailed` saying why not."""
        message = self.message_for(step)
        with self.gateway_errors():
            reply = await self.agent.ask(message, config=self.model_config(request_id))
        return self.finished(reply)

    async def critique_stream(self, step: Step, request_id: str | None) -> AsyncIterator[dict[str, Any]]:
        """The same, streamed: the output so far after each piece of text from the model,
        then the whole output (with `usage`) last. Raises `StepFailed` like `critique`."""
        message = self.message_for(step)
        config = self.model_config(request_id).copy(streaming=True)
        pieces: asyncio.Queue[str] = asyncio.Queue()

        async def on_piece(event: ModelMessageChunk) -> None:
            await pieces.put(event.content)

        async with self.agent.run(message, config=config) as run:
            run.stream.where(ModelMessageChunk).subscribe(on_piece)
            turn = asyncio.ensure_future(run.result())
            text = ""
            try:
                while True:
                    piece = asyncio.ensure_future(pieces.get())
                    await asyncio.wait({piece, turn}, return_when=asyncio.FIRST_COMPLETED)
                    if not piece.done():
                        piece.cancel()
                        break
                    text += piece.result()
                    yield self.output(text, None)
                with self.gateway_errors():
                    reply = turn.result()
            finally:
                turn.cancel()
        yield self.finished(reply)

    def gateway_error(self, e: openai.APIStatusError) -> StepFailed:
        """Sort a gateway error into what the master should do with the step."""
        status = e.status_code
        # The gateway's own message (OpenAI's error shape), without the SDK's prefix.
        said = e.body.get("message") if isinstance(e.body, dict) else None
        detail = f"the LLM gateway answered {status}: {said or e.message}"
        if status == 429 or status >= 500:
            # Throttled or the provider is down: another attempt later may succeed.
            return StepFailed(503, detail, e.response.headers.get("retry-after"))
        if status in (401, 403):
            return StepFailed(503, f"{detail} (check OPENAI_API_KEY: it must be one of the gateway's keys)")
        if status == 404:
            return StepFailed(503, f"{detail} (check AG2_MODEL={self.settings.model!r}: the gateway has no such alias)")
        # 400, 413, 422: the request made from this step's input is refused, and would be again.
        return StepFailed(422, detail)


def timed_out(budget: float | None) -> StepFailed:
    """The failure of a step whose deadline came first: retried by the master."""
    return StepFailed(504, f"the critique did not finish within the step's deadline ({budget or 0:.1f} s)")


def prefers_event_stream(accept: str) -> bool:
    """Whether an `accept` header ranks `text/event-stream` above `application/json`."""
    ranks: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranks[media.lower()] = q
    stream = ranks.get("text/event-stream", 0.0)
    json_rank = max(ranks.get("application/json", 0.0), ranks.get("*/*", 0.0))
    return stream > 0 and stream > json_rank


async def next_before(
    outputs: AsyncIterator[dict[str, Any]], deadline: float | None, budget: float | None
) -> dict[str, Any]:
    """The next output of a stream, or `StepFailed` (504) when the deadline comes first."""
    try:
        async with asyncio.timeout_at(deadline):
            return await anext(outputs)
    except TimeoutError:
        await outputs.aclose()
        raise timed_out(budget)


async def event_stream(
    first: dict[str, Any], outputs: AsyncIterator[dict[str, Any]], deadline: float | None, budget: float | None
) -> AsyncIterator[str]:
    """Server-Sent Events: one `data:` message per output so far, the last one the whole
    output; a failure after the first is an `event: error` with `{"message", "retryable"}`."""
    try:
        yield f"data: {json.dumps(first)}\n\n"
        while True:
            try:
                output = await next_before(outputs, deadline, budget)
            except StopAsyncIteration:
                return
            except StepFailed as e:
                level = logging.WARNING if e.status < 500 else logging.ERROR
                log.log(level, "stream failed (%d): %s", e.status, e.message)
                error = {"message": e.message, "retryable": e.status >= 500}
                yield f"event: error\ndata: {json.dumps(error)}\n\n"
                return
            except Exception:
                log.exception("the streamed critique failed")
                error = {"message": "the agent failed unexpectedly (see its log)", "retryable": True}
                yield f"event: error\ndata: {json.dumps(error)}\n\n"
                return
            yield f"data: {json.dumps(output)}\n\n"
    finally:
        # The reader may have gone (the worker gave up): stop the model turn too.
        await outputs.aclose()


def create_app(settings: Settings) -> FastAPI:
    """The service: `POST /step` and `GET /health`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(600, connect=5)) as http:
            app.state.critic = Critic(settings, http)
            log.info("%s serving `%s` with model %r at %s", AGENT_NAME, CAPABILITY, settings.model, settings.base_url)
            yield

    app = FastAPI(title="Ensemble AG2 critic", lifespan=lifespan)

    @app.exception_handler(StepFailed)
    async def step_failed(request: Request, e: StepFailed) -> JSONResponse:
        level = logging.WARNING if e.status < 500 else logging.ERROR
        log.log(level, "step refused (%d): %s [request %s]", e.status, e.message, request.headers.get("x-request-id"))
        headers = {"retry-after": e.retry_after} if e.retry_after else None
        return JSONResponse({"detail": e.message}, status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        # One readable sentence rather than FastAPI's list: it becomes the step's error.
        if any(err["type"] == "json_invalid" for err in e.errors()):
            return JSONResponse({"detail": "not a step: the body is not valid JSON"}, status_code=422)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in e.errors()
        )
        return JSONResponse({"detail": f"not a step: {problems}"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        # Logged in full; the body says only that it may be retried.
        log.exception("the critique failed [request %s]", request.headers.get("x-request-id"))
        return JSONResponse({"detail": "the agent failed unexpectedly (see its log)"}, status_code=500)

    @app.post("/step", response_model=None)
    async def step(body: Step, request: Request) -> dict[str, Any] | StreamingResponse:
        request_id = request.headers.get("x-request-id") or body.request_id
        budget = seconds_left(body, request.headers.get("x-ensemble-timeout-ms"))
        if budget is not None and budget <= 0:
            raise StepFailed(504, "the step's deadline had passed when it arrived")
        critic: Critic = request.app.state.critic
        deadline = None if budget is None else asyncio.get_running_loop().time() + budget
        if prefers_event_stream(request.headers.get("accept", "")):
            outputs = critic.critique_stream(body, request_id)
            # The first output is awaited here, so a step refused before any text (a bad
            # input, the gateway down) gets its HTTP status rather than a stream's error.
            first = await next_before(outputs, deadline, budget)
            return StreamingResponse(event_stream(first, outputs, deadline, budget), media_type="text/event-stream")
        try:
            async with asyncio.timeout_at(deadline):
                return await critic.critique(body, request_id)
        except TimeoutError:
            raise timed_out(budget)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "agent": AGENT_NAME, "capability": CAPABILITY}

    return app


def main() -> None:
    """Run the service with uvicorn on HOST:PORT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
