// A grpc-js client that sends the :authority given on the command line, as
// grpc-java (the raw socket path) and grpcurl without -authority do. Run by
// tests/it/polyglot.rs:
//
//   node grpc_js_authority_client.js SOCKET PROTO AUTHORITY AUDIENCE
//
// Prints the ID token's length, or the error, and exits 0 or 1.
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [socket, proto, authority, audience] = process.argv.slice(2);
const tokenbroker = grpc.loadPackageDefinition(protoLoader.loadSync(proto)).tokenbroker.v1;
const broker = new tokenbroker.TokenBroker(`unix://${socket}`, grpc.credentials.createInsecure(), {
  'grpc.default_authority': authority,
});
broker.GetIdToken({ audience }, { deadline: Date.now() + 10000 }, (error, idToken) => {
  if (error) {
    console.error(`${error.code}: ${error.details}`);
    process.exit(1);
  }
  console.log(idToken.token.length);
  process.exit(0);
});
