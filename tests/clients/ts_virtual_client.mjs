#!/usr/bin/env node
// The official TypeScript SDK client (@modelcontextprotocol/sdk, pinned in package.json)
// against one MCP endpoint: by default a virtual server with server-everything behind
// the prefix `every_` and a Python SDK server (its `echo(text)`) without one.
//
//   node ts_virtual_client.mjs <url> [--prefix <p>] [--no-py]
//
// It connects (Streamable HTTP; sampling and elicitation declared, answered
// deterministically), lists the tools, calls <p>echo, <p>trigger-sampling-request and
// <p>trigger-elicitation-request (server-everything asks the client back; the answers
// must reach it), then `echo` (the Python server's, unless --no-py), ends the session
// and prints one JSON object with what it saw on stdout. On any failure it prints
// `ts_virtual_client: <step>: <error>` on stderr and exits 1 (2 on a timeout).
// `--prefix "" --no-py` runs it against server-everything's own URL.

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { CreateMessageRequestSchema, ElicitRequestSchema } from "@modelcontextprotocol/sdk/types.js";

const TIMEOUT_MS = 60_000;
const USAGE = "usage: ts_virtual_client.mjs <url> [--prefix <p>] [--no-py]";

let step = "arguments";

function fail(message, status = 1) {
  process.stderr.write(`ts_virtual_client: ${step}: ${message}\n`);
  process.exit(status);
}

function parseArgs(argv) {
  const options = { url: undefined, prefix: "every_", py: true };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--prefix") {
      if (i + 1 >= argv.length) fail(`--prefix needs a value; ${USAGE}`);
      options.prefix = argv[++i];
    } else if (arg === "--no-py") {
      options.py = false;
    } else if (options.url === undefined && !arg.startsWith("--")) {
      options.url = arg;
    } else {
      fail(`unexpected argument ${JSON.stringify(arg)}; ${USAGE}`);
    }
  }
  if (options.url === undefined) fail(USAGE);
  return options;
}

function texts(result) {
  return (result.content ?? []).filter((c) => c.type === "text").map((c) => c.text);
}

async function call(client, name, args) {
  step = `tools/call ${name}`;
  const result = await client.callTool({ name, arguments: args });
  if (result.isError) throw new Error(`the tool answered an error: ${JSON.stringify(result)}`);
  return { content: result.content, texts: texts(result) };
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const timer = setTimeout(() => fail(`no end after ${TIMEOUT_MS} ms`, 2), TIMEOUT_MS);
  timer.unref();

  const seen = { sampling: [], elicitation: [] };
  const client = new Client(
    { name: "ts-virtual-client", version: "0.0.0" },
    { capabilities: { sampling: {}, elicitation: { form: {} } } },
  );
  client.setRequestHandler(CreateMessageRequestSchema, async (request, extra) => {
    const first = request.params.messages[0]?.content;
    const asked = first && first.type === "text" ? first.text : "?";
    seen.sampling.push({ id: extra.requestId, asked });
    return { role: "assistant", model: "ts-test-model", content: { type: "text", text: `sampled: ${asked}` } };
  });
  client.setRequestHandler(ElicitRequestSchema, async (request, extra) => {
    seen.elicitation.push({ id: extra.requestId, message: request.params.message });
    return { action: "accept", content: { name: "Ada", check: true } };
  });
  client.onerror = (error) => {
    seen.transportErrors = [...(seen.transportErrors ?? []), String(error)];
  };

  step = `connect ${options.url}`;
  const transport = new StreamableHTTPClientTransport(new URL(options.url));
  await client.connect(transport);
  const out = {
    serverInfo: client.getServerVersion(),
    protocolVersion: transport.protocolVersion ?? null,
    sessionId: transport.sessionId !== undefined,
    capabilities: client.getServerCapabilities(),
  };

  step = "tools/list";
  const tools = [];
  let cursor;
  do {
    const page = await client.listTools(cursor === undefined ? {} : { cursor });
    tools.push(...page.tools.map((t) => t.name));
    cursor = page.nextCursor;
  } while (cursor);
  out.tools = tools;

  const p = options.prefix;
  out.everyEcho = await call(client, `${p}echo`, { message: "from the TS SDK" });
  out.sampled = await call(client, `${p}trigger-sampling-request`, { prompt: "ts client", maxTokens: 20 });
  out.elicited = await call(client, `${p}trigger-elicitation-request`, {});
  if (options.py) out.pyEcho = await call(client, "echo", { text: "py from TS" });
  out.sampling = seen.sampling;
  out.elicitation = seen.elicitation;

  step = "terminate session";
  await transport.terminateSession();
  out.terminated = transport.sessionId === undefined;
  step = "close";
  await client.close();
  out.transportErrors = seen.transportErrors ?? [];
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().then(
  () => process.exit(0),
  (error) => fail(error instanceof Error ? `${error.name}: ${error.message}` : String(error)),
);
