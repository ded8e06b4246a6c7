// An unmodified google-auth-library program, pointed at the broker's
// metadata-compatible endpoint only through GCE_METADATA_HOST.
//
// Usage: node google_auth_client.js AUDIENCE
// Prints one JSON object: what the library obtained.
'use strict';

const {GoogleAuth} = require('google-auth-library');

const CLOUD_PLATFORM = 'https://www.googleapis.com/auth/cloud-platform';

async function main() {
  const audience = process.argv[2];

  // Application Default Credentials: detects "GCE" through the endpoint,
  // then gets an access token and the project id from it.
  const auth = new GoogleAuth({scopes: [CLOUD_PLATFORM]});
  const client = await auth.getClient();
  const {token: accessToken} = await client.getAccessToken();
  const project = await auth.getProjectId();

  // The documented way to call a private Cloud Run service.
  const idClient = await auth.getIdTokenClient(audience);
  const headers = await idClient.getRequestHeaders();
  const authorization =
    typeof headers.get === 'function' ? headers.get('authorization') : headers.Authorization;

  console.log(
    JSON.stringify({
      client: client.constructor.name,
      project,
      access_token: accessToken,
      id_token: authorization.replace(/^Bearer /, ''),
    }),
  );
}

main().catch(error => {
  console.error(error);
  process.exit(1);
});
