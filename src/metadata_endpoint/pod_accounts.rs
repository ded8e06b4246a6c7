//! The service-account listing, email, aliases and scopes a pod reads,
//! with workload identity: its Google service account, as `default` and
//! by its email, as the GKE metadata server answers. The node's accounts
//! are never shown to a pod.

use super::query;

/// The scope an impersonated account's tokens carry unless asked.
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

/// An answer: JSON or text, or not found.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// `application/json`.
    Json(String),
    /// `application/text`.
    Text(String),
    /// 404.
    NotFound,
}

/// What a pod served as `google` gets for `path` (below
/// `/computeMetadata/v1/`) and `query` instead of the pass-through: its
/// own accounts' subtree, and nothing for a recursive read of the root or
/// the instance directory (which would list the node's accounts). `None`:
/// the path is no concern of this module.
pub fn answer_for(path: &str, query: &str, google: &str) -> Option<Answer> {
    if let Some(rest) = path.strip_prefix("instance/service-accounts")
        && (rest.is_empty() || rest.starts_with('/'))
    {
        return Some(answer(rest.trim_start_matches('/'), query, google));
    }
    let directory = matches!(path, "" | "instance" | "instance/");
    (directory && !super::reveal::only_plain_parameters(query)).then_some(Answer::NotFound)
}

/// The answer for `below` (the path after `…/instance/service-accounts/`)
/// and `query`, for a pod served as `google`.
fn answer(below: &str, query: &str, google: &str) -> Answer {
    let recursive = query::parameters(query).is_ok_and(|parameters| {
        parameters
            .iter()
            .any(|(name, value)| name == "recursive" && value.eq_ignore_ascii_case("true"))
    });
    let info = || {
        serde_json::json!({
            "aliases": ["default"],
            "email": google,
            "scopes": [CLOUD_PLATFORM],
        })
    };
    if below.is_empty() {
        return if recursive {
            let listing = serde_json::json!({ "default": info(), google: info() });
            Answer::Json(listing.to_string())
        } else {
            Answer::Text(format!("default/\n{google}/\n"))
        };
    }
    let (account, leaf) = below.split_once('/').unwrap_or((below, ""));
    if account != "default" && account != google {
        return Answer::NotFound;
    }
    match leaf {
        "" if recursive => Answer::Json(info().to_string()),
        "" => Answer::Text("aliases\nemail\nidentity\nscopes\ntoken\n".into()),
        "email" => Answer::Text(google.to_string()),
        "aliases" => Answer::Text("default\n".into()),
        "scopes" => Answer::Text(format!("{CLOUD_PLATFORM}\n")),
        _ => Answer::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GSA: &str = "cart@shop.iam.gserviceaccount.com";

    #[test]
    fn default_and_the_email_both_name_the_pods_account() {
        for account in ["default", GSA] {
            assert_eq!(
                answer(&format!("{account}/email"), "", GSA),
                Answer::Text(GSA.into())
            );
        }
        let other = "node@p.iam.gserviceaccount.com";
        assert_eq!(answer(&format!("{other}/email"), "", GSA), Answer::NotFound);
        assert_eq!(answer("default/token-ish", "", GSA), Answer::NotFound);
    }

    #[test]
    fn no_spelling_shows_a_pod_the_nodes_accounts() {
        assert_eq!(
            answer_for("instance/service-accounts", "", GSA),
            Some(Answer::Text(format!("default/\n{GSA}/\n")))
        );
        for (path, query) in [
            ("", "recursive=true"),
            ("instance/", "recursive=true"),
            ("instance", "recursive=TRUE&alt=json"),
        ] {
            assert_eq!(
                answer_for(path, query, GSA),
                Some(Answer::NotFound),
                "{path}?{query}"
            );
        }
        assert_eq!(
            answer_for("instance/", "", GSA),
            None,
            "the plain directory passes"
        );
        assert_eq!(answer_for("project/project-id", "", GSA), None);
        assert_eq!(answer_for("instance/service-accountsx", "", GSA), None);
    }

    #[test]
    fn the_listing_shows_only_the_pods_account() {
        assert_eq!(
            answer("", "", GSA),
            Answer::Text(format!("default/\n{GSA}/\n"))
        );
        let Answer::Json(json) = answer("", "recursive=true", GSA) else {
            panic!("a recursive listing is JSON");
        };
        let listing: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(listing["default"]["email"], GSA);
        assert_eq!(listing[GSA]["aliases"][0], "default");
        assert_eq!(listing.as_object().unwrap().len(), 2);
        let Answer::Json(json) = answer("default/", "recursive=true", GSA) else {
            panic!("a recursive account directory is JSON");
        };
        assert!(json.contains(GSA));
    }
}
