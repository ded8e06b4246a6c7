//! The emulator's control API (`/emulator/v1/...`): request counts, faults,
//! token lifetimes, tokeninfo, and the keys, users and accounts the fake
//! Google APIs trust. Served only with `control` on.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::faults::FaultRule;
use super::{
    Body, Lifetimes, Shared, aws, google, json_response, parse_query, read_json, sts, text,
};

/// Answers `method` on the control path `path` (after `/emulator/v1/`).
pub(super) async fn serve(
    shared: &Shared,
    method: Method,
    path: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    match (method, path) {
        (Method::GET, "stats") => json_response(&*shared.stats.borrow()),
        (Method::PUT, "fault") => match read_json::<FaultRule>(request).await {
            Ok(rule) => {
                tracing::info!(?rule, "emulator fault set");
                shared.lock().fault = Some(rule);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        (Method::DELETE, "fault") => {
            shared.lock().fault = None;
            text(StatusCode::OK, "ok\n")
        }
        (Method::PUT, "lifetimes") => match read_json::<Lifetimes>(request).await {
            Ok(lifetimes) => {
                shared.lock().set_lifetimes(lifetimes);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        (Method::GET, "tokeninfo") => {
            let query = parse_query(request.uri().query().unwrap_or(""));
            let info = query
                .get("access_token")
                .and_then(|token| shared.lock().issued.get(token).cloned());
            match info {
                Some(info) => json_response(&info),
                None => text(StatusCode::NOT_FOUND, "unknown token\n"),
            }
        }
        (Method::PUT, "keys") => google::trust_key(shared, request).await,
        (Method::PUT, "aws-roles") => match read_json::<aws::AwsRole>(request).await {
            Ok(role) => {
                shared.lock().aws.roles.push(role);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        (Method::PUT, "ec2-instance") => match read_json::<aws::Ec2Instance>(request).await {
            Ok(instance) => {
                shared.lock().aws.instance = Some(instance);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        (Method::PUT, "pools") => match read_json::<sts::PoolRequest>(request)
            .await
            .and_then(sts::PoolRequest::pool)
        {
            Ok(pool) => {
                shared
                    .lock()
                    .google
                    .pools
                    .insert(pool.audience.clone(), pool);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        (Method::PUT, "users") => match read_json::<google::User>(request).await {
            Ok(user) => {
                shared.lock().google.users.push(user);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        (Method::PUT, "impersonable") => match read_json::<google::Impersonable>(request).await {
            Ok(account) => {
                shared.lock().google.impersonable.insert(account.email);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "control API: GET stats, PUT fault, DELETE fault, PUT lifetimes, GET tokeninfo?access_token=, PUT keys, PUT users, PUT impersonable, PUT pools, PUT aws-roles, PUT ec2-instance\n",
        ),
    }
}
