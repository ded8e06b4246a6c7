//! Workload identity in the broker: the pod a caller runs in, the Google
//! service account it is served as (the policy's `[[workload]]` entry,
//! else the Kubernetes service account's annotation), and its request's
//! key rewritten to that account. A pod can name its account as empty,
//! `default` or the account's email, and no other: no request field lets
//! it claim another pod's identity.

use std::sync::Arc;

use super::Broker;
use crate::error::BrokerError;
use crate::peer::{Place, PodUid};
use crate::policy::Caller;
use crate::request::{ServiceAccount, TokenKey};
use crate::workload::{
    Annotation, GOOGLE_ACCOUNT_ANNOTATION, Pod, PodIdentity, UnmappedPods, Workloads,
};

impl Broker {
    /// The identity of `caller`'s pod: `None` for a host process (and for
    /// every caller without workload identity). A pod not in the map yet
    /// costs one direct list of the node's pods.
    pub(super) async fn pod_identity(
        &self,
        caller: &Caller,
    ) -> Result<Option<PodIdentity>, BrokerError> {
        let Some((workloads, uid)) = self.pod_of(caller)? else {
            return Ok(None);
        };
        // The hit path: one lookup, valid until anything changes.
        if let Some(identity) = workloads.served_as(uid) {
            return Ok(Some(identity));
        }
        if !workloads.is_synced() {
            return Err(BrokerError::PodUnavailable {
                reason: format!(
                    "pod {uid}: the broker has not read this node's pods and service accounts from the Kubernetes API server yet; try again"
                ),
            });
        }
        let generation = workloads.generation();
        let pod = workloads.pod(uid).await?;
        let identity = self.identity_of(workloads, pod)?;
        workloads.remember(uid, generation, identity.clone());
        Ok(Some(identity))
    }

    /// [`Broker::pod_identity`] from the map alone, for open watches: a
    /// pod that is gone is refused.
    pub(super) fn current_pod_identity(
        &self,
        caller: &Caller,
    ) -> Result<Option<PodIdentity>, BrokerError> {
        let Some((workloads, uid)) = self.pod_of(caller)? else {
            return Ok(None);
        };
        let pod = workloads.current(uid)?;
        self.identity_of(workloads, pod).map(Some)
    }

    /// The workloads and the UID of the caller's pod, when workload
    /// identity is on and the caller is a process on a Unix socket in a
    /// pod; `None` for a host process. A peer whose pod cannot be told is
    /// refused.
    fn pod_of(&self, caller: &Caller) -> Result<Option<(&Workloads, PodUid)>, BrokerError> {
        let Some(workloads) = &self.0.workloads else {
            return Ok(None);
        };
        let place = match caller {
            Caller::Local(Some(peer)) => peer.place,
            Caller::Local(None) => return Err(unknown_peer(caller)),
            Caller::Loopback | Caller::Broker => return Ok(None),
        };
        match place {
            Place::Host => Ok(None),
            Place::Pod(uid) => Ok(Some((workloads, uid))),
            Place::Unknown => Err(unknown_peer(caller)),
        }
    }

    /// The pod's Google service account: the policy's `[[workload]]`
    /// entry, else the annotation; unmapped, a refusal naming what to add
    /// (or, with `--unmapped-pods node`, none).
    fn identity_of(
        &self,
        workloads: &Workloads,
        pod: Arc<Pod>,
    ) -> Result<PodIdentity, BrokerError> {
        let google = match self
            .0
            .policy
            .workload_account(&pod.namespace, &pod.service_account)
        {
            Some(bound) => Some(bound),
            None => match workloads.annotation(&pod) {
                Some(Annotation::Account(account)) => Some(account),
                Some(Annotation::NotAnEmail(value)) => {
                    return Err(BrokerError::PodDenied {
                        reason: not_an_email_message(&pod, &value),
                    });
                }
                None => None,
            },
        };
        if google.is_none() && workloads.unmapped() == UnmappedPods::Deny {
            return Err(BrokerError::PodDenied {
                reason: unmapped_message(&pod),
            });
        }
        Ok(PodIdentity { pod, google })
    }
}

/// Rewrites `key` to the account `identity` is served as: `default`, empty
/// or the Google service account's email become that account. Any other
/// account is refused. A pod served as the node keeps the key as asked.
pub(super) fn serve_as(key: &mut TokenKey, identity: &PodIdentity) -> Result<(), BrokerError> {
    let Some(google) = &identity.google else {
        return Ok(());
    };
    let asked = key.account();
    let own = match asked {
        ServiceAccount::Default => true,
        other => other.as_str() == &**google,
    };
    if !own {
        let pod = &identity.pod;
        return Err(BrokerError::PodDenied {
            reason: format!(
                "pod {pod} (Kubernetes service account {}) gets tokens of {google} only: ask for \"default\" or \"{google}\", not \"{asked}\"",
                pod.kubernetes_service_account()
            ),
        });
    }
    *key.account_mut() = ServiceAccount::Workload(google.clone());
    Ok(())
}

/// A refusal naming an annotation that is no service account email (a
/// typo must not become a retried upstream error).
fn not_an_email_message(pod: &Pod, value: &str) -> String {
    format!(
        "pod {pod} runs as Kubernetes service account {}, whose annotation {GOOGLE_ACCOUNT_ANNOTATION}={value:?} is not a service account email",
        pod.kubernetes_service_account()
    )
}

fn unmapped_message(pod: &Pod) -> String {
    let (namespace, account) = (&pod.namespace, &pod.service_account);
    format!(
        "pod {pod} runs as Kubernetes service account {namespace}/{account}, which maps to no Google service account: annotate it (kubectl annotate serviceaccount -n {namespace} {account} {GOOGLE_ACCOUNT_ANNOTATION}=NAME@PROJECT.iam.gserviceaccount.com) or bind it in the policy's [[workload]] table"
    )
}

fn unknown_peer(caller: &Caller) -> BrokerError {
    let pid = caller
        .peer()
        .and_then(|peer| peer.pid)
        .filter(|pid| *pid > 0);
    let reason = match pid {
        Some(pid) => format!(
            "cannot tell which pod, if any, process {pid} runs in (its cgroup could not be read, or names nothing); refused"
        ),
        None => "cannot tell which pod, if any, this process runs in: the kernel gave no pid in the broker's pid namespace (a broker in a pod needs hostPID: true); refused".to_string(),
    };
    BrokerError::PodDenied { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{AccessTokenKey, IdTokenFormat, IdTokenKey};

    const GSA: &str = "app@p.iam.gserviceaccount.com";

    fn identity(google: Option<&str>) -> PodIdentity {
        PodIdentity {
            pod: Arc::new(Pod {
                uid: PodUid::parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").unwrap(),
                namespace: "shop".into(),
                name: "cart-1".into(),
                service_account: "cart".into(),
            }),
            google: google.map(Arc::from),
        }
    }

    fn access(account: ServiceAccount) -> TokenKey {
        TokenKey::Access(AccessTokenKey {
            account,
            scopes: vec![],
        })
    }

    #[test]
    fn a_pod_gets_its_account_for_default_or_its_email() {
        for asked in [ServiceAccount::Default, ServiceAccount::Email(GSA.into())] {
            let mut key = access(asked);
            serve_as(&mut key, &identity(Some(GSA))).unwrap();
            assert_eq!(key, access(ServiceAccount::Workload(Arc::from(GSA))));
        }
        let mut id = TokenKey::Id(IdTokenKey {
            account: ServiceAccount::Default,
            audience: "https://x".into(),
            format: IdTokenFormat::Standard,
            include_licenses: false,
        });
        serve_as(&mut id, &identity(Some(GSA))).unwrap();
        assert_eq!(id.account(), &ServiceAccount::Workload(Arc::from(GSA)));
    }

    #[test]
    fn a_pod_asking_for_another_account_is_refused_and_the_key_unchanged() {
        let other = ServiceAccount::Email("other@p.iam.gserviceaccount.com".into());
        let mut key = access(other.clone());
        let error = serve_as(&mut key, &identity(Some(GSA))).unwrap_err();
        assert_eq!(error.code(), tonic::Code::PermissionDenied);
        let message = error.to_string();
        assert!(message.contains("shop/cart-1") && message.contains("shop/cart"));
        assert_eq!(key, access(other));
    }

    #[test]
    fn a_pod_served_as_the_node_keeps_its_key() {
        let mut key = access(ServiceAccount::Default);
        serve_as(&mut key, &identity(None)).unwrap();
        assert_eq!(key, access(ServiceAccount::Default));
    }

    #[test]
    fn an_annotation_that_is_no_email_is_named() {
        let message = not_an_email_message(&identity(None).pod, "nope");
        assert!(
            message.contains("shop/cart-1")
                && message.contains("\"nope\" is not a service account email"),
            "{message}"
        );
    }

    #[test]
    fn the_unmapped_message_names_the_annotation_to_add() {
        let message = unmapped_message(&identity(None).pod);
        assert!(message.contains("shop/cart,"), "{message}");
        assert!(message.contains(
            "kubectl annotate serviceaccount -n shop cart iam.gke.io/gcp-service-account="
        ));
    }
}
