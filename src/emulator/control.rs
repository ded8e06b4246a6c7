//! The emulator's control API (`/emulator/v1/...`): request counts, faults,
//! token lifetimes, tokeninfo, the keys, users and accounts the fake
//! Google APIs trust, and the fake Kubernetes API's objects and outage.
//! Served only with `control` on.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::faults::FaultRule;
use super::kubernetes::{FakePod, FakeServiceAccount, Kind, Outage};
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
        (Method::PUT, "kubernetes/pods") => match read_json::<FakePod>(request)
            .await
            .and_then(FakePod::checked)
        {
            Ok(pod) => {
                shared.cluster().put_pod(pod);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        (Method::PUT, "kubernetes/serviceaccounts") => {
            match read_json::<FakeServiceAccount>(request)
                .await
                .and_then(FakeServiceAccount::checked)
            {
                Ok(account) => {
                    shared.cluster().put_service_account(account);
                    text(StatusCode::OK, "ok\n")
                }
                Err(message) => text(StatusCode::BAD_REQUEST, &message),
            }
        }
        (Method::DELETE, path) if path.starts_with("kubernetes/") => delete_object(shared, path),
        (Method::GET, "kubernetes/kubeconfig") => {
            text(StatusCode::OK, &super::kubernetes::kubeconfig(shared.addr))
        }
        (Method::PUT, "kubernetes/outage") => match read_json::<Outage>(request).await {
            Ok(outage) => {
                tracing::info!(down = outage.down, "emulator Kubernetes outage switched");
                shared.cluster().set_down(outage.down);
                text(StatusCode::OK, "ok\n")
            }
            Err(message) => text(StatusCode::BAD_REQUEST, &message),
        },
        _ => not_found(),
    }
}

/// `DELETE kubernetes/{pods|serviceaccounts}/{namespace}/{name}`.
fn delete_object(shared: &Shared, path: &str) -> Response<Body> {
    let segments: Vec<&str> = path.split('/').collect();
    let ["kubernetes", plural, namespace, name] = segments.as_slice() else {
        return not_found();
    };
    let Some(kind) = Kind::of(plural) else {
        return not_found();
    };
    if shared.cluster().delete(kind, namespace, name) {
        text(StatusCode::OK, "ok\n")
    } else {
        text(
            StatusCode::NOT_FOUND,
            &format!("no {} {namespace}/{name}\n", kind.plural()),
        )
    }
}

/// The 404 that lists what the control API serves.
fn not_found() -> Response<Body> {
    text(
        StatusCode::NOT_FOUND,
        "control API: GET stats, PUT fault, DELETE fault, PUT lifetimes, GET tokeninfo?access_token=, PUT keys, PUT users, PUT impersonable, PUT pools, PUT aws-roles, PUT ec2-instance, PUT kubernetes/pods, DELETE kubernetes/pods/{namespace}/{name}, PUT kubernetes/serviceaccounts, DELETE kubernetes/serviceaccounts/{namespace}/{name}, PUT kubernetes/outage, GET kubernetes/kubeconfig\n",
    )
}
