"""An unmodified google-auth program, pointed at the broker's
metadata-compatible endpoint only through GCE_METADATA_HOST/GCE_METADATA_IP.

Usage: google_auth_client.py AUDIENCE
Prints one JSON object: what the library obtained.
"""

import json
import sys

import google.auth
import google.auth.transport.requests
from google.auth import compute_engine
from google.oauth2 import id_token

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


def main() -> None:
    audience = sys.argv[1]
    request = google.auth.transport.requests.Request()

    # Application Default Credentials: finds "GCE" by pinging the endpoint,
    # reads the project id, then the account's email, then a token.
    credentials, project = google.auth.default(scopes=[CLOUD_PLATFORM])
    credentials.refresh(request)

    # The two documented ways to get an ID token on GCE.
    fetched = id_token.fetch_id_token(request, audience)
    id_credentials = compute_engine.IDTokenCredentials(
        request, audience, use_metadata_identity_endpoint=True
    )
    id_credentials.refresh(request)

    print(
        json.dumps(
            {
                "credentials": type(credentials).__name__,
                "project": project,
                "email": credentials.service_account_email,
                "access_token": credentials.token,
                "access_token_expiry": credentials.expiry.isoformat(),
                "fetch_id_token": fetched,
                "id_token_credentials": id_credentials.token,
            }
        )
    )


if __name__ == "__main__":
    main()
