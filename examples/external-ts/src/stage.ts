/**
 * secret-guard: an external mcp-extproc stage in TypeScript.
 *
 * It denies a `tools/call` whose arguments contain a configured secret pattern
 * (regular expressions, e.g. an API key's shape), before the MCP server sees it.
 * The protocol is mcp-extproc's own `protos/mcp_extproc/stage/v1/stage.proto`,
 * loaded at run time with @grpc/proto-loader; no generated code.
 *
 *   mcp-extproc ──Describe──▶ secret-guard: name, PHASE_REQUEST, ["tools/call"], closed
 *   mcp-extproc ──Process───▶ secret-guard: arguments ─▶ any pattern matches?
 *               ◀── deny (-32003, names the pattern's label, never the secret) | continue
 *
 * Usage:
 *   node dist/stage.js --address unix:/tmp/guard.sock --pattern 'sk-[A-Za-z0-9]{20,}' [--pattern ...]
 *   (--address 127.0.0.1:0 picks a free port; the line `READY <address>` says where it listens)
 */
import * as path from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const POLICY_DENIED = -32003;

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** google.protobuf.Value as proto-loader decodes it (oneofs: true adds `kind`). */
interface WireValue {
  kind?: string;
  nullValue?: unknown;
  numberValue?: number;
  stringValue?: string;
  boolValue?: boolean;
  structValue?: WireStruct;
  listValue?: { values?: WireValue[] };
}
interface WireStruct {
  fields?: Record<string, WireValue>;
}
interface ProcessRequest {
  phase: string;
  message?: { method: string; tool: string; arguments?: WireStruct };
  server: string;
  requestId: string;
}

export function fromValue(value: WireValue): Json {
  switch (value.kind) {
    case "numberValue":
      return value.numberValue ?? 0;
    case "stringValue":
      return value.stringValue ?? "";
    case "boolValue":
      return value.boolValue ?? false;
    case "structValue":
      return fromStruct(value.structValue ?? {});
    case "listValue":
      return (value.listValue?.values ?? []).map(fromValue);
    default:
      return null;
  }
}

export function fromStruct(struct: WireStruct): { [key: string]: Json } {
  const out: { [key: string]: Json } = {};
  for (const [key, value] of Object.entries(struct.fields ?? {})) out[key] = fromValue(value);
  return out;
}

/** Every string inside a JSON value (keys included: a secret can hide in a key too). */
function strings(value: Json, into: string[] = []): string[] {
  if (typeof value === "string") into.push(value);
  else if (Array.isArray(value)) value.forEach((item) => strings(item, into));
  else if (value !== null && typeof value === "object")
    for (const [key, item] of Object.entries(value)) {
      into.push(key);
      strings(item, into);
    }
  return into;
}

function parseArgs(argv: string[]): { address: string; patterns: RegExp[]; proto: string } {
  let address = "127.0.0.1:50062";
  let proto = path.resolve(__dirname, "../../../protos/mcp_extproc/stage/v1/stage.proto");
  const patterns: RegExp[] = [];
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === "--address") address = value;
    else if (flag === "--proto") proto = value;
    else if (flag === "--pattern") patterns.push(new RegExp(value));
    else throw new Error(`unknown flag ${flag}; expected --address, --pattern or --proto`);
    i++;
  }
  if (patterns.length === 0) throw new Error("give at least one --pattern (a regular expression)");
  return { address, patterns, proto };
}

function main(): void {
  const { address, patterns, proto } = parseArgs(process.argv.slice(2));
  const definition = protoLoader.loadSync(proto, {
    keepCase: false,
    longs: String,
    enums: String,
    defaults: false,
    oneofs: true,
    includeDirs: [path.resolve(path.dirname(proto), "../../../")],
  });
  const loaded = grpc.loadPackageDefinition(definition) as any;
  const service = loaded.mcp_extproc.stage.v1.ExternalStage.service as grpc.ServiceDefinition;

  const server = new grpc.Server();
  server.addService(service, {
    Describe(_call: grpc.ServerUnaryCall<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) {
      callback(null, {
        name: "secret-guard",
        phases: ["PHASE_REQUEST"],
        methods: ["tools/call"],
        failureMode: "FAILURE_MODE_CLOSED",
      });
    },
    Process(call: grpc.ServerUnaryCall<ProcessRequest, unknown>, callback: grpc.sendUnaryData<unknown>) {
      const message = call.request.message;
      const args = message?.arguments ? fromStruct(message.arguments) : {};
      const found = strings(args);
      const index = patterns.findIndex((pattern) => found.some((text) => pattern.test(text)));
      if (index < 0) {
        callback(null, {});
        return;
      }
      // Name the pattern, never the matching text: the message reaches the agent and the logs.
      callback(null, {
        deny: {
          code: POLICY_DENIED,
          message: `arguments of tool '${message?.tool}' contain a secret (pattern #${index + 1}); the call was not forwarded`,
        },
        metadata: { "secret-guard": `pattern-${index + 1}` },
      });
    },
  });
  server.bindAsync(address, grpc.ServerCredentials.createInsecure(), (error, port) => {
    if (error) {
      console.error(`secret-guard: cannot listen on ${address}: ${error.message}`);
      process.exit(2);
    }
    const bound = address.startsWith("unix:") ? address : `${address.slice(0, address.lastIndexOf(":"))}:${port}`;
    console.log(`READY ${bound}`);
  });
  const stop = () => server.tryShutdown(() => process.exit(0));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

if (require.main === module) {
  try {
    main();
  } catch (error) {
    console.error(`secret-guard: ${(error as Error).message}`);
    process.exit(2);
  }
}
