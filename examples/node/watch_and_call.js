// Watches an ID token from tokenbroker and calls a URL with it.
//
// The current token arrives at once and every refreshed one after it; each
// is used for one call (a real program would keep the latest token for all
// its calls). If the broker restarts, the watch subscribes again after a
// jittered backoff and goes on. The token itself is never printed.
//
//   npm install @grpc/grpc-js@1.14.7 @grpc/proto-loader@0.8.1
//   node examples/node/watch_and_call.js --audience https://hello-abc123-uc.a.run.app [--url URL] [--calls N]
//
// The socket is $TOKENBROKER_SOCKET, else /run/tokenbroker/tokenbroker.sock.
// tests/it/examples.rs runs this against the broker and a local server.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_SOCKET = '/run/tokenbroker/tokenbroker.sock';
// The broker was away or stopping, or the connection broke: subscribe again.
const TRANSIENT = new Set([
  grpc.status.UNAVAILABLE, grpc.status.UNKNOWN, grpc.status.CANCELLED,
  grpc.status.ABORTED, grpc.status.DEADLINE_EXCEEDED, grpc.status.INTERNAL,
]);
const PROTO_DIR = path.resolve(__dirname, '../../proto');

function brokerClient(socket) {
  const definition = protoLoader.loadSync('tokenbroker/v1/tokenbroker.proto', {
    includeDirs: [PROTO_DIR],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const { TokenBroker } = grpc.loadPackageDefinition(definition).tokenbroker.v1;
  return new TokenBroker(`unix://${socket}`, grpc.credentials.createInsecure());
}

// Yields each token of the watch, across broker restarts; never an expired
// one. A stream that ends or breaks is opened again after a random wait of
// up to 50 ms, doubling to 5 s while the broker stays away. A refusal of the
// request itself (INVALID_ARGUMENT, PERMISSION_DENIED, ...) is thrown.
async function* watch(broker, request) {
  let failures = 0;
  for (;;) {
    const stream = broker.WatchToken(request, new grpc.Metadata({ waitForReady: true }));
    try {
      for await (const update of stream) {
        const token = update[update.token];
        if (Number(token.expire_time.seconds) * 1000 > Date.now()) {
          failures = 0;
          yield token;
        }
      }
    } catch (error) {
      if (!TRANSIENT.has(error.code)) throw error;
    } finally {
      stream.on('error', () => {}); // the CANCELLED that cancel() causes
      stream.cancel();
    }
    failures += 1;
    const wait = Math.random() * Math.min(5000, 50 * 2 ** (failures - 1));
    await new Promise((resolve) => setTimeout(resolve, wait));
  }
}

function expiry(timestamp) {
  return timestamp ? new Date(Number(timestamp.seconds) * 1000).toISOString() : 'unknown';
}

async function main() {
  const { values } = parseArgs({
    options: {
      audience: { type: 'string' },
      url: { type: 'string' },
      calls: { type: 'string', default: '0' },
      socket: { type: 'string', default: process.env.TOKENBROKER_SOCKET || DEFAULT_SOCKET },
    },
  });
  if (!values.audience) {
    console.error('usage: watch_and_call.js --audience AUD [--url URL] [--calls N] [--socket PATH]');
    process.exit(64);
  }
  const url = values.url || values.audience;
  const maxCalls = Number.parseInt(values.calls, 10);
  const broker = brokerClient(values.socket);
  let calls = 0;
  try {
    for await (const token of watch(broker, { id_token: { audience: values.audience } })) {
      const response = await fetch(url, { headers: { Authorization: `Bearer ${token.token}` } });
      console.log(`called ${url}: HTTP ${response.status} (token expires ${expiry(token.expire_time)})`);
      if (response.status >= 400) process.exit(1);
      calls += 1;
      if (calls === maxCalls) break;
    }
  } catch (error) {
    if (error.code === undefined) throw error;
    console.error(`broker: ${grpc.status[error.code]}: ${error.details}`);
    process.exit(2);
  }
  broker.close();
}

main().catch((error) => {
  console.error(error.message);
  process.exit(1);
});
