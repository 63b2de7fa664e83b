// One chat completion through the OpenAI Node SDK, as a client of chat-proxy.
//
//   node chat.mjs <base_url> <api_key> [params-json]
//
// params-json is the `chat.completions.create` argument (default: a short
// non-streamed request). Prints one JSON object on stdout and exits 0 whether the
// request succeeded or the SDK raised; a crash of the script itself exits 1.
//   success: {ok: true, status, headers, id, model, content, finish_reason,
//             tool_calls, usage, chunks}         (chunks: null when not streamed)
//   failure: {ok: false, class, classes, status, message, error, code, type,
//             param, headers}
import OpenAI from 'openai';

const [baseURL, apiKey, paramsJson] = process.argv.slice(2);
if (!baseURL || !apiKey) {
  console.error('usage: node chat.mjs <base_url> <api_key> [params-json]');
  process.exit(2);
}
const params = paramsJson
  ? JSON.parse(paramsJson)
  : { model: 'demo', messages: [{ role: 'user', content: 'hello' }] };

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30_000 });

// the error classes a caller would test for, most specific first
const ERROR_CLASSES = [
  'BadRequestError',
  'AuthenticationError',
  'PermissionDeniedError',
  'NotFoundError',
  'ConflictError',
  'UnprocessableEntityError',
  'RateLimitError',
  'InternalServerError',
  'APIConnectionTimeoutError',
  'APIConnectionError',
  'APIError',
  'OpenAIError',
];

const HEADERS = [
  'content-type',
  'x-request-id',
  'x-session-id',
  'retry-after',
  'retry-after-ms',
  'x-ratelimit-limit-requests',
  'x-ratelimit-remaining-requests',
];

function pickHeaders(headers) {
  const out = {};
  if (!headers || typeof headers.get !== 'function') return out;
  for (const name of HEADERS) {
    const value = headers.get(name);
    if (value !== null && value !== undefined) out[name] = value;
  }
  return out;
}

async function streamed() {
  const { data: stream, response } = await client.chat.completions.create(params).withResponse();
  let content = '';
  let finish = null;
  let usage = null;
  let model = null;
  let id = null;
  let chunks = 0;
  const calls = new Map();
  for await (const chunk of stream) {
    chunks += 1;
    id = id ?? chunk.id;
    model = chunk.model ?? model;
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices ?? []) {
      if (choice.index !== 0) continue;
      content += choice.delta?.content ?? '';
      finish = choice.finish_reason ?? finish;
      for (const call of choice.delta?.tool_calls ?? []) {
        const cur = calls.get(call.index) ?? { id: null, name: '', arguments: '' };
        cur.id = call.id ?? cur.id;
        cur.name += call.function?.name ?? '';
        cur.arguments += call.function?.arguments ?? '';
        calls.set(call.index, cur);
      }
    }
  }
  return {
    ok: true,
    status: response.status,
    headers: pickHeaders(response.headers),
    id,
    model,
    content,
    finish_reason: finish,
    tool_calls: [...calls.values()],
    usage,
    chunks,
  };
}

async function plain() {
  const { data, response } = await client.chat.completions.create(params).withResponse();
  const choice = data.choices[0];
  return {
    ok: true,
    status: response.status,
    headers: pickHeaders(response.headers),
    id: data.id,
    model: data.model,
    content: choice.message.content,
    finish_reason: choice.finish_reason,
    tool_calls: (choice.message.tool_calls ?? []).map((c) => ({
      id: c.id,
      name: c.function.name,
      arguments: c.function.arguments,
    })),
    usage: data.usage ?? null,
    chunks: null,
  };
}

let result;
try {
  result = params.stream ? await streamed() : await plain();
} catch (err) {
  if (!(err instanceof OpenAI.OpenAIError)) throw err;
  result = {
    ok: false,
    class: err.constructor.name,
    classes: ERROR_CLASSES.filter((name) => err instanceof OpenAI[name]),
    status: err.status ?? null,
    message: err.message,
    error: err.error ?? null,
    code: err.code ?? null,
    type: err.type ?? null,
    param: err.param ?? null,
    headers: pickHeaders(err.headers),
  };
}
process.stdout.write(JSON.stringify(result) + '\n');
