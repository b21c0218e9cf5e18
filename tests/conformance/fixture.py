"""The MCP server the conformance suite expects, built on the official Python SDK's `MCPServer`.

The suite's server scenarios call fixed tools, resources and prompts (`test_simple_text`,
`test://static-text`, `test_prompt_with_arguments`, ...), each described in the suite's
own scenario text ("Server Implementation Requirements"). This module provides them, so
the suite measures the SDK and, through the gateway, what the gateway changes. Start it
as a process::

    python -m tests.conformance.fixture --port 0 --mode legacy

It binds 127.0.0.1, serves Streamable HTTP at `/mcp` and prints `READY <port>` once it
accepts connections (the convention of `tests.upstreams.serving`).

Modes, as in `tests.upstreams.pyserver`:

- `legacy`: stateful sessions with SSE responses and an in-memory event store (so a
  stream the server closes mid-call can be resumed with `Last-Event-ID`). The 2025-11-25
  requirement set runs against this mode.
- `modern`: stateless, the server a 2026-07-28 client talks to. The 2026-07-28
  requirement set runs against this mode.

DNS-rebinding protection stays on (the SDK's default on loopback: `Host` and `Origin`
must name localhost): the suite checks it, and Envoy forwards the agent's `Host`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import warnings
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal, cast, get_args

from mcp.server import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.prompts.base import Prompt, UserMessage
from mcp.server.mcpserver.tools.base import Tool
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp.types import (
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    AudioContent,
    Completion,
    CompletionArgument,
    CompletionContext,
    CreateMessageRequest,
    CreateMessageRequestParams,
    CreateMessageResult,
    ElicitRequest,
    ElicitRequestFormParams,
    ElicitResult,
    EmbeddedResource,
    EmptyResult,
    ImageContent,
    InputRequest,
    InputRequiredResult,
    JSONRPCMessage,
    ListRootsRequest,
    ListRootsResult,
    PromptReference,
    ResourceTemplateReference,
    SamplingMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextContent,
    TextResourceContents,
    UnsubscribeRequestParams,
)
from pydantic import Field

from tests.upstreams.serving import bind_loopback, serve_ready

# The legacy era's server-to-client requests and logging are what the 2025-11-25 scenarios test.
warnings.filterwarnings("ignore", category=MCPDeprecationWarning)

Mode = Literal["legacy", "modern"]
MODES: Final[tuple[str, ...]] = get_args(Mode)
MCP_PATH: Final = "/mcp"
_GRACEFUL_SHUTDOWN_S: Final = 2
_SSE_RETRY_MS: Final = 100

PNG_1X1: Final = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
"""A 1x1 PNG, base64."""
WAV_EMPTY: Final = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="
"""A WAV header with one silent sample, base64."""


def _object_schema(properties: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _string_field(description: str) -> dict[str, Any]:
    return {"type": "string", "description": description}


USER_INFO_SCHEMA: Final = _object_schema(
    {"username": _string_field("User's response"), "email": _string_field("User's email address")},
    ["username", "email"],
)
DEFAULTS_SCHEMA: Final = _object_schema(
    {
        "name": {"type": "string", "description": "User name", "default": "John Doe"},
        "age": {"type": "integer", "description": "User age", "default": 30},
        "score": {"type": "number", "description": "User score", "default": 95.5},
        "status": {
            "type": "string",
            "description": "User status",
            "enum": ["active", "inactive", "pending"],
            "default": "active",
        },
        "verified": {"type": "boolean", "description": "Verification status", "default": True},
    }
)
ENUMS_SCHEMA: Final = _object_schema(
    {
        "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
        "titledSingle": {
            "type": "string",
            "oneOf": [
                {"const": "value1", "title": "First Option"},
                {"const": "value2", "title": "Second Option"},
                {"const": "value3", "title": "Third Option"},
            ],
        },
        "legacyEnum": {
            "type": "string",
            "enum": ["opt1", "opt2", "opt3"],
            "enumNames": ["Option One", "Option Two", "Option Three"],
        },
        "untitledMulti": {"type": "array", "items": {"type": "string", "enum": ["option1", "option2", "option3"]}},
        "titledMulti": {
            "type": "array",
            "items": {
                "anyOf": [
                    {"const": "value1", "title": "First Choice"},
                    {"const": "value2", "title": "Second Choice"},
                    {"const": "value3", "title": "Third Choice"},
                ]
            },
        },
    },
    ["untitledSingle", "titledSingle", "legacyEnum", "untitledMulti", "titledMulti"],
)
JSON_SCHEMA_2020_12: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "$anchor": "addressDef",
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {
        "name": {"type": "string"},
        "address": {"$ref": "#/$defs/address"},
        "contactMethod": {"type": "string", "enum": ["phone", "email"]},
        "phone": {"type": "string"},
        "email": {"type": "string"},
    },
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}
"""The inputSchema the `json-schema-2020-12` scenario expects back, keyword for keyword."""


class MemoryEventStore(EventStore):
    """Every SSE event this process sent, so a client can resume a stream with `Last-Event-ID`."""

    def __init__(self) -> None:
        """Start empty; event ids count up from 1."""
        self._events: list[tuple[str, str, JSONRPCMessage | None]] = []
        self._ids = itertools.count(1)

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        """Remember ``message`` (``None``: a priming event) and return its id."""
        event_id = str(next(self._ids))
        self._events.append((stream_id, event_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        """Send the events of ``last_event_id``'s stream that came after it; ``None`` if it is unknown."""
        stream = next((s for s, e, _ in self._events if e == last_event_id), None)
        if stream is None:
            return None
        after = int(last_event_id)
        for stream_id, event_id, message in self._events:
            if stream_id == stream and int(event_id) > after and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


def _elicit(message: str, properties: dict[str, Any], required: Sequence[str]) -> ElicitRequest:
    params = ElicitRequestFormParams(message=message, requested_schema=_object_schema(properties, required))
    return ElicitRequest(params=params)


def _ask_name(message: str = "What is your name?") -> ElicitRequest:
    return _elicit(message, {"name": {"type": "string"}}, ["name"])


def _sample(text: str, max_tokens: int) -> CreateMessageRequest:
    message = SamplingMessage(role="user", content=TextContent(type="text", text=text))
    return CreateMessageRequest(params=CreateMessageRequestParams(messages=[message], max_tokens=max_tokens))


def _elicited(answer: object, key: str) -> Any:
    """The value an accepted elicitation answered for ``key``, else ``None``."""
    if isinstance(answer, ElicitResult) and answer.action == "accept" and answer.content:
        return answer.content.get(key)
    return None


def _register_tools(srv: MCPServer[Any]) -> None:
    @srv.tool()
    def test_simple_text() -> str:
        """Returns one text block."""
        return "This is a simple text response for testing."

    @srv.tool()
    def test_image_content() -> list[ImageContent]:
        """Returns one PNG image block."""
        return [ImageContent(type="image", data=PNG_1X1, mime_type="image/png")]

    @srv.tool()
    def test_audio_content() -> list[AudioContent]:
        """Returns one WAV audio block."""
        return [AudioContent(type="audio", data=WAV_EMPTY, mime_type="audio/wav")]

    @srv.tool()
    def test_embedded_resource() -> list[EmbeddedResource]:
        """Returns one embedded text resource."""
        resource = TextResourceContents(
            uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."
        )
        return [EmbeddedResource(type="resource", resource=resource)]

    @srv.tool()
    def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
        """Returns a text, an image and an embedded JSON resource."""
        resource = TextResourceContents(
            uri="test://mixed-content-resource", mime_type="application/json", text='{"test": "data", "value": 123}'
        )
        return [
            TextContent(type="text", text="Multiple content types test:"),
            ImageContent(type="image", data=PNG_1X1, mime_type="image/png"),
            EmbeddedResource(type="resource", resource=resource),
        ]

    @srv.tool()
    async def test_tool_with_logging(ctx: Context[Any, Any]) -> str:
        """Logs three info messages, 50 ms apart, while it runs."""
        for step, text in enumerate(("Tool execution started", "Tool processing data", "Tool execution completed")):
            if step:
                await asyncio.sleep(0.05)
            await ctx.log("info", text)
        return "Tool with logging executed successfully"

    @srv.tool()
    async def test_logging_tool(ctx: Context[Any, Any]) -> str:
        """Logs one info message (a 2026-07-28 client that set no logLevel must not receive it)."""
        await ctx.log("info", "test_logging_tool ran")
        return "logged"

    @srv.tool()
    async def test_tool_with_progress(ctx: Context[Any, Any]) -> str:
        """Reports progress 0, 50 and 100 of 100, 50 ms apart."""
        for progress in (0, 50, 100):
            if progress:
                await asyncio.sleep(0.05)
            await ctx.report_progress(progress=progress, total=100, message=f"Completed step {progress} of 100")
        return "progress reported"

    @srv.tool()
    async def test_sampling(prompt: str, ctx: Context[Any, Any]) -> str:
        """Asks the client's model to answer ``prompt`` (sampling/createMessage)."""
        message = SamplingMessage(role="user", content=TextContent(type="text", text=prompt))
        result = await ctx.session.create_message(messages=[message], max_tokens=100, related_request_id=ctx.request_id)
        content = result.content
        return f"LLM response: {content.text if isinstance(content, TextContent) else 'no text'}"

    async def elicit_form(ctx: Context[Any, Any], message: str, schema: dict[str, Any]) -> ElicitResult:
        return cast(
            ElicitResult,
            await ctx.session.elicit_form(message=message, requested_schema=schema, related_request_id=ctx.request_id),
        )

    @srv.tool()
    async def test_elicitation(message: str, ctx: Context[Any, Any]) -> str:
        """Asks the user for a username and an email (elicitation/create)."""
        result = await elicit_form(ctx, message, USER_INFO_SCHEMA)
        return f"User response: action={result.action}, content={json.dumps(result.content or {})}"

    @srv.tool()
    async def test_elicitation_sep1034_defaults(ctx: Context[Any, Any]) -> str:
        """Elicits a form whose string, integer, number, enum and boolean fields all have defaults."""
        result = await elicit_form(ctx, "Please provide user information", DEFAULTS_SCHEMA)
        return f"Elicitation completed: action={result.action}, content={json.dumps(result.content or {})}"

    @srv.tool()
    async def test_elicitation_sep1330_enums(ctx: Context[Any, Any]) -> str:
        """Elicits a form with the five enum shapes (untitled, titled, legacy, and both multi-selects)."""
        result = await elicit_form(ctx, "Please choose options", ENUMS_SCHEMA)
        return f"Elicitation completed: action={result.action}, content={json.dumps(result.content or {})}"

    @srv.tool()
    def test_error_handling() -> str:
        """Always fails (a tool error: isError)."""
        raise RuntimeError("This tool intentionally returns an error for testing")

    @srv.tool()
    def test_x_mcp_header(
        region: Annotated[
            str, Field(description="Mirrored into Mcp-Param-Region", json_schema_extra={"x-mcp-header": "Region"})
        ] = "<none>",
    ) -> str:
        """Echoes its argument, which 2026-07-28 clients mirror into the Mcp-Param-Region header."""
        return f"region={region}"

    @srv.tool()
    async def test_missing_capability(ctx: Context[Any, Any]) -> str:
        """Needs the client's sampling capability; refuses with -32021 when it was not declared."""
        capabilities = ctx.client_capabilities
        if capabilities is None or capabilities.sampling is None:
            raise MCPError(
                code=MISSING_REQUIRED_CLIENT_CAPABILITY,
                message="this tool needs the client's sampling capability",
                data={"requiredCapabilities": {"sampling": {}}},
            )
        return "sampling is declared"

    @srv.tool()
    async def test_streaming_elicitation(ctx: Context[Any, Any]) -> str | InputRequiredResult:
        """Asks for a name the 2026-07-28 way: an InputRequiredResult, never a request on the stream."""
        if (name := _elicited((ctx.input_responses or {}).get("user_name"), "name")) is not None:
            return f"Hello, {name}!"
        return InputRequiredResult(input_requests={"user_name": _ask_name()})

    @srv.tool()
    async def test_input_required_result_elicitation(ctx: Context[Any, Any]) -> str | InputRequiredResult:
        """Round 1 asks for the user's name; round 2 greets them."""
        responses = ctx.input_responses or {}
        if "user_name" in responses:
            return f"Hello, {_elicited(responses['user_name'], 'name') or 'stranger'}!"
        return InputRequiredResult(input_requests={"user_name": _ask_name()})

    @srv.tool()
    async def test_input_required_result_sampling(ctx: Context[Any, Any]) -> str | InputRequiredResult:
        """Round 1 asks the client's model a question; round 2 returns its answer."""
        answer = (ctx.input_responses or {}).get("capital_question")
        if answer is not None:
            content = answer.content if isinstance(answer, CreateMessageResult) else None
            return f"Model said: {content.text if isinstance(content, TextContent) else '?'}"
        return InputRequiredResult(input_requests={"capital_question": _sample("What is the capital of France?", 100)})

    @srv.tool()
    async def test_input_required_result_list_roots(ctx: Context[Any, Any]) -> str | InputRequiredResult:
        """Round 1 asks for the client's roots; round 2 counts them."""
        answer = (ctx.input_responses or {}).get("client_roots")
        if answer is not None:
            return f"Client exposed {len(answer.roots) if isinstance(answer, ListRootsResult) else 0} root(s)."
        return InputRequiredResult(input_requests={"client_roots": ListRootsRequest()})

    @srv.tool()
    async def test_input_required_result_request_state(ctx: Context[Any, Any]) -> str | InputRequiredResult:
        """Round 1 carries a requestState; round 2 checks that it came back unchanged."""
        if "confirm" in (ctx.input_responses or {}) and ctx.request_state == "awaiting-confirmation":
            return "state-ok: confirmation received"
        confirm = _elicit("Please confirm", {"ok": {"type": "boolean"}}, ["ok"])
        return InputRequiredResult(input_requests={"confirm": confirm}, request_state="awaiting-confirmation")

    @srv.tool()
    async def test_input_required_result_multiple_inputs(ctx: Context[Any, Any]) -> str | InputRequiredResult:
        """Round 1 asks for an elicitation, a sampling and the roots at once."""
        requests: dict[str, InputRequest] = {
            "user_name": _ask_name(),
            "greeting": _sample("Generate a greeting", 50),
            "client_roots": ListRootsRequest(),
        }
        if requests.keys() <= (ctx.input_responses or {}).keys():
            return "All inputs received."
        return InputRequiredResult(input_requests=requests, request_state="three-inputs")

    @srv.tool()
    async def test_input_required_result_multi_round(ctx: Context[Any, Any]) -> str | InputRequiredResult:
        """Three rounds: the name, then the favourite colour, then the answer; the state says which round."""
        state: dict[str, Any] = json.loads(ctx.request_state) if ctx.request_state else {"round": 0}
        responses = ctx.input_responses or {}
        if state["round"] == 1 and "step1" in responses:
            name = _elicited(responses["step1"], "name")
            colour = _elicit("Step 2: What is your favorite color?", {"color": {"type": "string"}}, ["color"])
            return InputRequiredResult(
                input_requests={"step2": colour}, request_state=json.dumps({"round": 2, "name": name})
            )
        if state["round"] == 2 and "step2" in responses:
            return f"{state.get('name')} likes {_elicited(responses['step2'], 'color')}."
        # A first call, or an answer that does not fit the round: start over.
        return InputRequiredResult(
            input_requests={"step1": _ask_name("Step 1: What is your name?")}, request_state=json.dumps({"round": 1})
        )

    @srv.tool()
    async def test_input_required_result_tampered_state(ctx: Context[Any, Any]) -> str | InputRequiredResult:
        """Round 1 hands out a requestState; the SDK seals it, so a tampered echo never reaches round 2."""
        if ctx.request_state is None:
            confirm = _elicit("Please confirm", {"ok": {"type": "boolean"}}, ["ok"])
            return InputRequiredResult(input_requests={"confirm": confirm}, request_state="first-round")
        return f"state-ok: {ctx.request_state}"

    @srv.tool()
    async def test_input_required_result_capabilities(ctx: Context[Any, Any]) -> InputRequiredResult:
        """Asks only for what the client declared: sampling, elicitation, or both."""
        capabilities = ctx.client_capabilities
        requests: dict[str, InputRequest] = {}
        if capabilities is None or capabilities.sampling is not None:
            requests["sample"] = _sample("Say hello", 50)
        if capabilities is None or capabilities.elicitation is not None:
            requests["ask"] = _ask_name()
        return InputRequiredResult(input_requests=requests, request_state="capability-gated")

    @srv.tool()
    async def test_reconnection(ctx: Context[Any, Any]) -> str:
        """Logs, closes its SSE stream mid-call, logs again after the client resumed it."""
        await ctx.log("info", "Before disconnect")
        await ctx.close_sse_stream()
        await asyncio.sleep(0.2)
        await ctx.log("info", "After reconnect")
        return "Reconnection test completed"

    def dynamic() -> str:
        """Added and removed again at once, to change the list."""
        return "dynamic"

    @srv.tool()
    async def test_trigger_tool_change(ctx: Context[Any, Any]) -> str:
        """Changes the tool list and says so to subscribers."""
        srv.add_tool(dynamic, name="test_dynamic_tool")
        srv.remove_tool("test_dynamic_tool")
        await ctx.notify_tools_changed()
        return "tool list changed"

    @srv.tool()
    async def test_trigger_prompt_change(ctx: Context[Any, Any]) -> str:
        """Changes the prompt list and says so to subscribers."""
        srv.add_prompt(Prompt.from_function(dynamic, name="test_dynamic_prompt"))
        srv.remove_prompt("test_dynamic_prompt")
        await ctx.notify_prompts_changed()
        return "prompt list changed"


def _register_resources(srv: MCPServer[Any]) -> None:
    @srv.resource("test://static-text", mime_type="text/plain")
    def static_text() -> str:
        """A fixed text resource."""
        return "This is the content of the static text resource."

    @srv.resource("test://static-binary", mime_type="image/png")
    def static_binary() -> bytes:
        """A fixed binary resource (a PNG)."""
        return base64.b64decode(PNG_1X1)

    @srv.resource("test://template/{id}/data", mime_type="application/json")
    def template_data(id: str) -> str:
        """JSON naming the id the URI template was filled with."""
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @srv.resource("test://watched-resource", mime_type="text/plain")
    def watched() -> str:
        """A resource clients subscribe to."""
        return "Watched resource content"


def _register_prompts(srv: MCPServer[Any]) -> None:
    def text(value: str) -> UserMessage:
        return UserMessage(role="user", content=TextContent(type="text", text=value))

    @srv.prompt()
    def test_simple_prompt() -> list[UserMessage]:
        """A prompt without arguments."""
        return [text("This is a simple prompt for testing.")]

    @srv.prompt()
    def test_prompt_with_arguments(arg1: str, arg2: str) -> list[UserMessage]:
        """A prompt with two required arguments."""
        return [text(f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'")]

    @srv.prompt()
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:
        """A prompt embedding the resource it is given."""
        resource = TextResourceContents(
            uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."
        )
        return [
            UserMessage(role="user", content=EmbeddedResource(type="resource", resource=resource)),
            text("Please process the embedded resource above."),
        ]

    @srv.prompt()
    def test_prompt_with_image() -> list[UserMessage]:
        """A prompt with an image."""
        image = ImageContent(type="image", data=PNG_1X1, mime_type="image/png")
        return [UserMessage(role="user", content=image), text("Please analyze the image above.")]

    @srv.prompt()
    async def test_input_required_result_prompt(ctx: Context[Any, Any]) -> list[UserMessage] | InputRequiredResult:
        """A prompt that first asks the user for context (an InputRequiredResult on prompts/get)."""
        answer = (ctx.input_responses or {}).get("user_context")
        if answer is not None:
            return [text(f"Use the following context: {_elicited(answer, 'context') or '?'}")]
        ask = _elicit("What context should the prompt use?", {"context": {"type": "string"}}, ["context"])
        return InputRequiredResult(input_requests={"user_context": ask})


def _register_legacy_methods(srv: MCPServer[Any]) -> None:
    """logging/setLevel and resources/(un)subscribe: the SDK answers them only on the legacy era."""
    subscriptions: set[str] = set()

    async def set_level(ctx: ServerRequestContext[Any], params: SetLevelRequestParams) -> EmptyResult:
        return EmptyResult()

    async def subscribe(ctx: ServerRequestContext[Any], params: SubscribeRequestParams) -> EmptyResult:
        subscriptions.add(str(params.uri))
        return EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext[Any], params: UnsubscribeRequestParams) -> EmptyResult:
        subscriptions.discard(str(params.uri))
        return EmptyResult()

    lowlevel = srv._lowlevel_server  # no public registration for these three methods
    lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)


def build_server() -> MCPServer[Any]:
    """The fixture `MCPServer`: every tool, resource and prompt the server scenarios call."""
    schema_tool = Tool.from_function(
        lambda: "json_schema_2020_12_tool",
        name="json_schema_2020_12_tool",
        description="A tool whose inputSchema uses JSON Schema 2020-12 keywords",
    ).model_copy(update={"parameters": JSON_SCHEMA_2020_12})
    srv: MCPServer[Any] = MCPServer(
        name="mcp-extproc-conformance-fixture", version="0.1.0", log_level="WARNING", tools=[schema_tool]
    )
    _register_tools(srv)
    _register_resources(srv)
    _register_prompts(srv)
    _register_legacy_methods(srv)

    async def complete(
        ref: PromptReference | ResourceTemplateReference,
        argument: CompletionArgument,
        context: CompletionContext | None,
    ) -> Completion:
        return Completion(values=[], total=0, has_more=False)

    srv.completion()(complete)  # type: ignore[no-untyped-call]  # the SDK's decorator is untyped
    return srv


async def serve(mode: Mode, port: int) -> None:
    """Serve until SIGTERM/SIGINT, printing `READY <port>` once connections are accepted."""
    srv = build_server()
    legacy = mode == "legacy"
    app = srv.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=not legacy,
        event_store=MemoryEventStore() if legacy else None,
        retry_interval=_SSE_RETRY_MS if legacy else None,
        host="127.0.0.1",
    )
    options = {"lifespan": "on", "timeout_graceful_shutdown": _GRACEFUL_SHUTDOWN_S}
    await serve_ready(bind_loopback(port), app, f"conformance fixture (mode={mode})", **options)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m tests.conformance.fixture", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = pick a free one)")
    parser.add_argument("--mode", choices=MODES, default="legacy", help="stateful (legacy) or stateless (modern)")
    args = parser.parse_args(argv)
    asyncio.run(serve(cast(Mode, args.mode), args.port))


if __name__ == "__main__":
    main()
