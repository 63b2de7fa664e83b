// One Responses API request through the OpenAI Node SDK, as a client of chat-proxy.
//
//   node responses.mjs <base_url> <api_key> [params-json]
//
// params-json is the `responses.create` argument (default: a short non-streamed
// request). Prints one JSON object on stdout and exits 0 whether the request
// succeeded or the SDK raised; a crash of the script itself exits 1.
//   success: {ok: true, status, headers, response, output_text, events}
//            response: the final Response object (streamed: the one the last
//            event carries); output_text: the SDK's own (not streamed) or the
//            text deltas joined (streamed); events: null when not streamed, else
//            [{type, sequence_number}] in the order they came
//   failure: {ok: false, class, status, message, error, code, type, param}
import OpenAI from 'openai';

const [baseURL, apiKey, paramsJson] = process.argv.slice(2);
if (!baseURL || !apiKey) {
  console.error('usage: node responses.mjs <base_url> <api_key> [params-json]');
  process.exit(2);
}
const params = paramsJson ? JSON.parse(paramsJson) : { model: 'demo', input: 'hello' };

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30_000 });

const HEADERS = ['content-type', 'x-request-id', 'x-session-id'];

function pickHeaders(headers) {
  const out = {};
  if (!headers || typeof headers.get !== 'function') return out;
  for (const name of HEADERS) {
    const value = headers.get(name);
    if (value !== null && value !== undefined) out[name] = value;
  }
  return out;
}

const FINAL = new Set(['response.completed', 'response.incomplete', 'response.failed']);

async function streamed() {
  const { data: stream, response } = await client.responses.create(params).withResponse();
  const events = [];
  let text = '';
  let final = null;
  for await (const event of stream) {
    events.push({ type: event.type, sequence_number: event.sequence_number });
    if (event.type === 'response.output_text.delta') text += event.delta;
    if (FINAL.has(event.type)) final = event.response;
  }
  return {
    ok: true,
    status: response.status,
    headers: pickHeaders(response.headers),
    response: final,
    output_text: text,
    events,
  };
}

async function plain() {
  const { data, response } = await client.responses.create(params).withResponse();
  return {
    ok: true,
    status: response.status,
    headers: pickHeaders(response.headers),
    response: data,
    output_text: data.output_text,
    events: null,
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
    status: err.status ?? null,
    message: err.message,
    error: err.error ?? null,
    code: err.code ?? null,
    type: err.type ?? null,
    param: err.param ?? null,
  };
}
process.stdout.write(JSON.stringify(result) + '\n');
