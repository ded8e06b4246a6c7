//! Tokens of the Google service accounts pods are served as (workload
//! identity): minted by impersonation through the IAM Credentials API,
//! authorised by the broker's own access token, which all of them share.
//! The node's identity needs `roles/iam.serviceAccountTokenCreator` on
//! each of those accounts. Every other key goes to the broker's own
//! source unchanged.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use http::Uri;

use crate::error::{BrokerError, FetchError};
use crate::request::{ServiceAccount, TokenKey};
use crate::sources::https::HttpsClient;
use crate::sources::impersonate::{BaseToken, ImpersonatedSource};
use crate::sources::keyfile::admit_one_account;
use crate::token::Token;
use crate::upstream::TokenSource;

/// The broker's source, with the pods' accounts beside it. Downscoped
/// tokens are not its job: the [`Downscoping`](super::downscope::Downscoping)
/// around it exchanges them.
pub struct WorkloadAccounts<S> {
    inner: Arc<S>,
    base: Arc<BaseToken>,
    endpoint: Uri,
    http: HttpsClient,
}

impl<S: TokenSource> WorkloadAccounts<S> {
    /// Serves `inner`'s keys, and impersonates pods' accounts at the IAM
    /// Credentials API under `endpoint` with `inner`'s own token.
    pub fn new(inner: S, endpoint: Uri, http: HttpsClient) -> Self {
        let inner = Arc::new(inner);
        Self {
            base: Arc::new(BaseToken::new(inner.clone())),
            inner,
            endpoint,
            http,
        }
    }

    /// The impersonation of `account`: built per fetch (a few URLs), so
    /// that nothing is kept per account; the base token is shared.
    fn impersonation(&self, account: &str) -> Result<ImpersonatedSource, FetchError> {
        ImpersonatedSource::sharing(
            self.base.clone(),
            account,
            Vec::new(),
            &self.endpoint,
            self.http.clone(),
        )
        .map_err(FetchError::Malformed)
    }
}

fn workload_account(key: &TokenKey) -> Option<&str> {
    match key.account() {
        ServiceAccount::Workload(account) => Some(account),
        ServiceAccount::Default | ServiceAccount::Email(_) => None,
    }
}

impl<S: TokenSource> TokenSource for WorkloadAccounts<S> {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        let Some(account) = workload_account(key) else {
            return self.inner.fetch(key);
        };
        Box::pin(async move { self.impersonation(account)?.fetch(key).await })
    }

    fn fetch_first<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, FetchError>> {
        match workload_account(key) {
            Some(_) => self.fetch(key),
            None => self.inner.fetch_first(key),
        }
    }

    fn admits(&self, key: &TokenKey) -> Result<(), BrokerError> {
        match workload_account(key) {
            Some(account) => admit_one_account(key, account, || {
                format!("impersonation of the pod's account {account}")
            }),
            None => self.inner.admits(key),
        }
    }
}
