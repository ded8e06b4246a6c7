// Watches an ID token from tokenbroker and calls a URL with it.
//
// The current token arrives at once and every refreshed one after it; each
// is used for one call (a real program would keep the latest token for all
// its calls). The token itself is never printed.
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
  // Name the HTTP/2 authority "localhost": grpc-js would send the socket
  // path, which the broker's HTTP/2 stack rejects.
  return new TokenBroker(`unix://${socket}`, grpc.credentials.createInsecure(), {
    'grpc.default_authority': 'localhost',
  });
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
  const stream = broker.WatchToken({ id_token: { audience: values.audience } });
  let calls = 0;
  let done = false;
  stream.on('error', (error) => {
    if (done) return;
    console.error(`broker: ${grpc.status[error.code]}: ${error.details}`);
    process.exit(2);
  });
  for await (const update of stream) {
    const response = await fetch(url, {
      headers: { Authorization: `Bearer ${update.id_token.token}` },
    });
    console.log(`called ${url}: HTTP ${response.status} (token expires ${expiry(update.id_token.expire_time)})`);
    if (response.status >= 400) process.exit(1);
    calls += 1;
    if (calls === maxCalls) {
      done = true;
      stream.cancel();
      broker.close();
      return;
    }
  }
}

main().catch((error) => {
  console.error(error.message);
  process.exit(1);
});
