//! Credential Access Boundaries: the resources and permissions a
//! downscoped access token may reach. Validated, and kept in one canonical
//! form (rules sorted, permissions a set), so that equal boundaries are
//! one cache key; checked against a policy rule's boundary; written as the
//! `accessBoundary` JSON Google STS reads.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::BrokerError;

/// Most rules in one boundary (Google's limit).
pub const MAX_BOUNDARY_RULES: usize = 10;
/// Longest availability condition expression, in bytes (2 KiB).
pub const MAX_EXPRESSION_LEN: usize = 2048;
/// Longest resource name, in bytes.
pub const MAX_RESOURCE_LEN: usize = 1024;
/// Longest condition title or description, in bytes.
pub const MAX_CONDITION_TEXT_LEN: usize = 1024;
/// Most permissions in one rule.
pub const MAX_PERMISSIONS: usize = 32;
/// Longest permission, in bytes.
pub const MAX_PERMISSION_LEN: usize = 256;

/// A condition on what a rule makes available: a CEL expression over the
/// resource (`resource.name.startsWith(...)`), with a title and a
/// description for people.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Condition {
    /// The CEL expression. Never empty.
    pub expression: String,
    /// A short name; may be empty.
    pub title: String,
    /// What the condition is for; may be empty.
    pub description: String,
}

/// One rule of a boundary: a resource, the roles' permissions available
/// on it, and an optional condition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BoundaryRule {
    /// The resource's full name, e.g.
    /// `//storage.googleapis.com/projects/_/buckets/b`.
    pub resource: String,
    /// `inRole:roles/...` entries, as a set.
    pub permissions: BTreeSet<String>,
    /// Further limits what the rule makes available.
    pub condition: Option<Condition>,
}

/// A validated boundary of 1 to [`MAX_BOUNDARY_RULES`] rules, in canonical
/// order. Two boundaries that allow the same are equal and hash alike.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AccessBoundary {
    rules: Vec<BoundaryRule>,
}

/// One rule as the policy and the configuration file spell it:
/// `{ available_resource = "...", available_permissions = ["..."],
/// expression = "..." }` (with an optional `title` and `description`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundaryEntry {
    /// The resource's full name.
    pub available_resource: String,
    /// `inRole:ROLE` entries.
    pub available_permissions: Vec<String>,
    /// The availability condition's CEL expression, if any.
    pub expression: Option<String>,
    /// The condition's title.
    #[serde(default)]
    pub title: String,
    /// The condition's description.
    #[serde(default)]
    pub description: String,
}

/// A rule as a request or a file gives it, before validation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleInput {
    /// `available_resource`.
    pub resource: String,
    /// `available_permissions`.
    pub permissions: Vec<String>,
    /// `availability_condition`: expression, title, description.
    pub condition: Option<(String, String, String)>,
}

impl AccessBoundary {
    /// Validates the rules of a boundary; `field` names them in errors
    /// (`access_boundary`). Duplicate rules count once.
    pub fn new(field: &str, rules: Vec<RuleInput>) -> Result<Self, BrokerError> {
        if rules.is_empty() {
            return Err(BrokerError::invalid(
                field,
                "a boundary needs at least one rule",
            ));
        }
        if rules.len() > MAX_BOUNDARY_RULES {
            return Err(BrokerError::invalid(
                field,
                format!(
                    "{} rules; Google allows at most {MAX_BOUNDARY_RULES} in one boundary",
                    rules.len()
                ),
            ));
        }
        let mut checked = rules
            .into_iter()
            .enumerate()
            .map(|(index, rule)| {
                BoundaryRule::new(rule).map_err(|(part, reason)| {
                    BrokerError::invalid(format!("{field}[{index}]{part}"), reason)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        checked.sort_unstable();
        checked.dedup();
        Ok(Self { rules: checked })
    }

    /// Validates the entries of a file's `access_boundary` (`field`).
    pub fn from_entries(field: &str, entries: &[BoundaryEntry]) -> Result<Self, BrokerError> {
        let rules = entries
            .iter()
            .map(|entry| RuleInput {
                resource: entry.available_resource.clone(),
                permissions: entry.available_permissions.clone(),
                condition: entry
                    .expression
                    .clone()
                    .map(|expression| (expression, entry.title.clone(), entry.description.clone())),
            })
            .collect();
        Self::new(field, rules)
    }

    /// The rules, in canonical order.
    pub fn rules(&self) -> &[BoundaryRule] {
        &self.rules
    }

    /// The `accessBoundary` object Google STS reads in `options`.
    pub fn to_json(&self) -> Value {
        let rules: Vec<Value> = self
            .rules
            .iter()
            .map(|rule| {
                let mut json = json!({
                    "availableResource": rule.resource,
                    "availablePermissions": rule.permissions,
                });
                if let Some(condition) = &rule.condition {
                    let mut object = json!({ "expression": condition.expression });
                    if !condition.title.is_empty() {
                        object["title"] = json!(condition.title);
                    }
                    if !condition.description.is_empty() {
                        object["description"] = json!(condition.description);
                    }
                    json["availabilityCondition"] = object;
                }
                json
            })
            .collect();
        json!({ "accessBoundary": { "accessBoundaryRules": rules } })
    }

    /// Reads Google's `accessBoundary` JSON, as the IAM documentation
    /// shows it (the object itself, or wrapped in `{"accessBoundary": ...}`).
    pub fn from_json(field: &str, json: &Value) -> Result<Self, BrokerError> {
        let boundary = json.get("accessBoundary").unwrap_or(json);
        let rules = boundary
            .get("accessBoundaryRules")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                BrokerError::invalid(
                    field,
                    "expected {\"accessBoundary\": {\"accessBoundaryRules\": [...]}}",
                )
            })?;
        let text = |value: &Value, name: &str| -> Result<String, BrokerError> {
            match value.get(name) {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(text)) => Ok(text.clone()),
                Some(_) => Err(BrokerError::invalid(
                    field,
                    format!("{name} must be a string"),
                )),
            }
        };
        let mut inputs = Vec::with_capacity(rules.len());
        for rule in rules {
            let permissions = match rule.get("availablePermissions") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|p| {
                        p.as_str().map(str::to_string).ok_or_else(|| {
                            BrokerError::invalid(field, "availablePermissions holds strings")
                        })
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => {
                    return Err(BrokerError::invalid(
                        field,
                        "availablePermissions must be a list",
                    ));
                }
            };
            let condition = match rule.get("availabilityCondition") {
                None | Some(Value::Null) => None,
                Some(condition) => Some((
                    text(condition, "expression")?,
                    text(condition, "title")?,
                    text(condition, "description")?,
                )),
            };
            inputs.push(RuleInput {
                resource: text(rule, "availableResource")?,
                permissions,
                condition,
            });
        }
        Self::new(field, inputs)
    }

    /// The boundary a peer gets when its policy rule's boundary is `self`
    /// and it asked for `requested`: each requested rule must name a
    /// resource of `self` and a subset of that entry's permissions; the
    /// entry's condition is ANDed with the request's. `Err` says what is
    /// not covered.
    pub fn narrow(&self, requested: &Self) -> Result<Self, String> {
        let mut narrowed = Vec::with_capacity(requested.rules.len());
        for asked in &requested.rules {
            let candidates: Vec<&BoundaryRule> = self
                .rules
                .iter()
                .filter(|rule| rule.resource == asked.resource)
                .collect();
            if candidates.is_empty() {
                return Err(format!(
                    "resource {} is outside the policy's access boundary",
                    asked.resource
                ));
            }
            let Some(cover) = candidates
                .iter()
                .find(|rule| asked.permissions.is_subset(&rule.permissions))
            else {
                let mut missing = String::new();
                for permission in asked
                    .permissions
                    .iter()
                    .filter(|p| !candidates.iter().any(|rule| rule.permissions.contains(*p)))
                {
                    let _ = write!(missing, " {permission}");
                }
                return Err(if missing.is_empty() {
                    format!(
                        "no single rule of the policy's access boundary grants all of the permissions asked for on {}",
                        asked.resource
                    )
                } else {
                    format!(
                        "the policy's access boundary does not grant{missing} on {}",
                        asked.resource
                    )
                });
            };
            narrowed.push(BoundaryRule {
                resource: asked.resource.clone(),
                permissions: asked.permissions.clone(),
                condition: and(cover.condition.as_ref(), asked.condition.as_ref()),
            });
        }
        narrowed.sort_unstable();
        narrowed.dedup();
        Ok(Self { rules: narrowed })
    }

    /// The boundary in a few words for messages and logs: its resources.
    pub fn describe(&self) -> String {
        let resources: BTreeSet<&str> = self.rules.iter().map(|r| r.resource.as_str()).collect();
        let mut text = String::from("an access boundary on");
        for resource in resources {
            let _ = write!(text, " {resource}");
        }
        text
    }
}

impl BoundaryRule {
    /// Validates one rule; `Err` is the part at fault (`.available_resource`)
    /// and why.
    fn new(input: RuleInput) -> Result<Self, (String, String)> {
        let at = |part: &str, reason: String| (format!(".{part}"), reason);
        check_resource(&input.resource).map_err(|reason| at("available_resource", reason))?;
        if input.permissions.is_empty() {
            return Err(at(
                "available_permissions",
                "empty; list roles as inRole:roles/storage.objectViewer".into(),
            ));
        }
        if input.permissions.len() > MAX_PERMISSIONS {
            return Err(at(
                "available_permissions",
                format!("more than {MAX_PERMISSIONS} entries"),
            ));
        }
        for (index, permission) in input.permissions.iter().enumerate() {
            check_permission(permission)
                .map_err(|reason| at(&format!("available_permissions[{index}]"), reason))?;
        }
        let condition = input
            .condition
            .map(|(expression, title, description)| {
                check_condition(&expression, &title, &description)
                    .map_err(|reason| at("availability_condition", reason))?;
                Ok::<_, (String, String)>(Condition {
                    expression,
                    title,
                    description,
                })
            })
            .transpose()?;
        Ok(Self {
            resource: input.resource,
            permissions: input.permissions.into_iter().collect(),
            condition,
        })
    }
}

fn check_resource(resource: &str) -> Result<(), String> {
    const HINT: &str =
        "a full resource name such as //storage.googleapis.com/projects/_/buckets/my-bucket";
    if resource.is_empty() {
        return Err(format!("empty; name {HINT}"));
    }
    if resource.len() > MAX_RESOURCE_LEN {
        return Err(format!("longer than {MAX_RESOURCE_LEN} bytes"));
    }
    if resource
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err("contains control characters or spaces".into());
    }
    let named = resource
        .strip_prefix("//")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(service, path)| service.contains('.') && !path.is_empty());
    if !named {
        return Err(format!("not {HINT}"));
    }
    Ok(())
}

fn check_permission(permission: &str) -> Result<(), String> {
    let Some(role) = permission.strip_prefix("inRole:") else {
        return Err("must be a role as inRole:ROLE, e.g. inRole:roles/storage.objectViewer".into());
    };
    if permission.len() > MAX_PERMISSION_LEN {
        return Err(format!("longer than {MAX_PERMISSION_LEN} bytes"));
    }
    let plain = !role.is_empty()
        && role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
    if !plain {
        return Err(
            "the role after inRole: is a name such as roles/storage.objectViewer or projects/p/roles/custom".into(),
        );
    }
    Ok(())
}

fn check_condition(expression: &str, title: &str, description: &str) -> Result<(), String> {
    if expression.trim().is_empty() {
        return Err("a condition needs an expression, e.g. resource.name.startsWith('projects/_/buckets/b/objects/logs/')".into());
    }
    if expression.len() > MAX_EXPRESSION_LEN {
        return Err(format!(
            "the expression is longer than {MAX_EXPRESSION_LEN} bytes"
        ));
    }
    if title.len() > MAX_CONDITION_TEXT_LEN || description.len() > MAX_CONDITION_TEXT_LEN {
        return Err(format!(
            "the title or description is longer than {MAX_CONDITION_TEXT_LEN} bytes"
        ));
    }
    if [expression, title, description]
        .iter()
        .any(|text| text.chars().any(char::is_control))
    {
        return Err("contains control characters".into());
    }
    self_contained(expression)
}

/// Checks that a CEL expression stands on its own, so that `(policy) &&
/// (request)` means what it says: brackets balanced outside string
/// literals, every literal closed, no `//` comment (which would swallow
/// what follows). Otherwise a request could close the policy's
/// parenthesis early (`true) || (true`) and drop its condition.
fn self_contained(expression: &str) -> Result<(), String> {
    let unbalanced = || {
        Err("the expression's brackets or quotes are unbalanced, or it holds a // comment; a condition must be one self-contained CEL expression".to_string())
    };
    let bytes = expression.as_bytes();
    let mut open: Vec<u8> = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            quote @ (b'\'' | b'"') => {
                let raw = raw_prefix(&bytes[..at]);
                let length = if bytes[at..].starts_with(&[quote; 3]) {
                    3
                } else {
                    1
                };
                let delimiter = &bytes[at..at + length];
                at += length;
                loop {
                    match bytes.get(at) {
                        None => return unbalanced(),
                        Some(b'\\') if !raw => at += 2,
                        Some(_) if bytes[at..].starts_with(delimiter) => {
                            at += length;
                            break;
                        }
                        Some(_) => at += 1,
                    }
                }
                continue;
            }
            b'/' if bytes.get(at + 1) == Some(&b'/') => return unbalanced(),
            opening @ (b'(' | b'[' | b'{') => open.push(opening),
            closing @ (b')' | b']' | b'}') => {
                let expected = match closing {
                    b')' => b'(',
                    b']' => b'[',
                    _ => b'{',
                };
                if open.pop() != Some(expected) {
                    return unbalanced();
                }
            }
            _ => {}
        }
        at += 1;
    }
    if open.is_empty() {
        Ok(())
    } else {
        unbalanced()
    }
}

/// Whether the string literal after `before` is raw (`r'...'`, `br"..."`):
/// its backslashes escape nothing.
fn raw_prefix(before: &[u8]) -> bool {
    let prefix: Vec<u8> = before
        .iter()
        .rev()
        .take_while(|b| b"rRbB".contains(b))
        .copied()
        .collect();
    let standalone = before
        .len()
        .checked_sub(prefix.len() + 1)
        .is_none_or(|i| !(before[i].is_ascii_alphanumeric() || before[i] == b'_'));
    prefix.len() <= 2 && standalone && prefix.iter().any(|b| b.eq_ignore_ascii_case(&b'r'))
}

/// Both conditions: the policy's and the request's. Titles and
/// descriptions are joined the same way, so the result stays readable.
fn and(policy: Option<&Condition>, asked: Option<&Condition>) -> Option<Condition> {
    match (policy, asked) {
        (None, None) => None,
        (Some(only), None) | (None, Some(only)) => Some(only.clone()),
        (Some(policy), Some(asked)) if policy == asked => Some(policy.clone()),
        (Some(policy), Some(asked)) => {
            let join = |a: &str, b: &str| match (a.is_empty(), b.is_empty()) {
                (true, _) => b.to_string(),
                (_, true) => a.to_string(),
                _ => format!("{a} and {b}"),
            };
            Some(Condition {
                expression: format!("({}) && ({})", policy.expression, asked.expression),
                title: join(&policy.title, &asked.title),
                description: join(&policy.description, &asked.description),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUCKET: &str = "//storage.googleapis.com/projects/_/buckets/b";
    const VIEWER: &str = "inRole:roles/storage.objectViewer";
    const ADMIN: &str = "inRole:roles/storage.objectAdmin";

    fn rule(resource: &str, permissions: &[&str], expression: Option<&str>) -> RuleInput {
        RuleInput {
            resource: resource.into(),
            permissions: permissions.iter().map(|p| p.to_string()).collect(),
            condition: expression.map(|e| (e.into(), String::new(), String::new())),
        }
    }

    fn boundary(rules: Vec<RuleInput>) -> AccessBoundary {
        AccessBoundary::new("access_boundary", rules).unwrap()
    }

    fn refused(rules: Vec<RuleInput>) -> String {
        AccessBoundary::new("access_boundary", rules)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn equal_boundaries_are_one_key_whatever_the_order() {
        let a = boundary(vec![
            rule(
                "//storage.googleapis.com/projects/_/buckets/z",
                &[VIEWER],
                None,
            ),
            rule(BUCKET, &[ADMIN, VIEWER, ADMIN], None),
        ]);
        let b = boundary(vec![
            rule(BUCKET, &[VIEWER, ADMIN], None),
            rule(
                "//storage.googleapis.com/projects/_/buckets/z",
                &[VIEWER],
                None,
            ),
            rule(BUCKET, &[ADMIN, VIEWER], None),
        ]);
        assert_eq!(a, b);
        assert_eq!(a.rules().len(), 2);
    }

    #[test]
    fn every_bad_shape_is_refused_naming_the_field() {
        let eleven = (0..11)
            .map(|i| rule(&format!("{BUCKET}{i}"), &[VIEWER], None))
            .collect();
        assert!(refused(eleven).contains("at most 10"));
        assert!(refused(vec![]).contains("at least one rule"));
        assert!(
            refused(vec![rule("", &[VIEWER], None)])
                .contains("access_boundary[0].available_resource")
        );
        assert!(
            refused(vec![rule("projects/_/buckets/b", &[VIEWER], None)])
                .contains("full resource name")
        );
        assert!(refused(vec![rule(BUCKET, &[], None)]).contains("available_permissions: empty"));
        assert!(
            refused(vec![rule(BUCKET, &["roles/storage.objectViewer"], None)]).contains("inRole:")
        );
        let long = "x".repeat(MAX_EXPRESSION_LEN + 1);
        assert!(refused(vec![rule(BUCKET, &[VIEWER], Some(&long))]).contains("longer than 2048"));
        assert!(refused(vec![rule(BUCKET, &[VIEWER], Some(""))]).contains("needs an expression"));
        assert!(
            refused(vec![rule(BUCKET, &[VIEWER], Some("a\n|| true"))])
                .contains("control characters")
        );
        assert!(
            refused(vec![rule(
                "//storage.googleapis.com/b\u{7}",
                &[VIEWER],
                None
            )])
            .contains("control")
        );
    }

    #[test]
    fn a_condition_cannot_reach_outside_its_parentheses() {
        let condition = |e: &str| AccessBoundary::new("b", vec![rule(BUCKET, &[VIEWER], Some(e))]);
        for escape in [
            "true) || (true",
            "true)) || ((true",
            "resource.name == 'x",
            r#"resource.name == "x') || ('"#,
            "true // ",
            "[1, 2",
            "(true]",
            r"r'\') || (true || '\'",
            "'''x'' ) || (true",
        ] {
            let error = condition(escape).unwrap_err().to_string();
            assert!(error.contains("unbalanced"), "{escape}: {error}");
        }
        for fine in [
            "resource.name.startsWith('projects/_/buckets/b/objects/a)b')",
            r#"resource.name.startsWith("projects/_/buckets/b/objects/\"q")"#,
            "resource.name.startsWith('//storage')",
            r"r'\' == r'\'",
            "[1, 2].exists(x, x > 1) && {'a': (1)}['a'] == 1",
            "'''it's''' != ''",
        ] {
            assert!(condition(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn google_json_round_trips() {
        let json = json!({"accessBoundary": {"accessBoundaryRules": [{
            "availableResource": BUCKET,
            "availablePermissions": [VIEWER],
            "availabilityCondition": {
                "expression": "resource.name.startsWith('projects/_/buckets/b/objects/logs/')",
                "title": "logs"
            }
        }]}});
        let parsed = AccessBoundary::from_json("boundary", &json).unwrap();
        assert_eq!(parsed.to_json(), json);
        let inner = AccessBoundary::from_json("boundary", &json["accessBoundary"]).unwrap();
        assert_eq!(inner, parsed);
        assert!(AccessBoundary::from_json("boundary", &json!({"rules": []})).is_err());
    }

    #[test]
    fn a_request_is_narrowed_within_the_policy_with_conditions_anded() {
        let policy = boundary(vec![rule(BUCKET, &[VIEWER, ADMIN], Some("p"))]);
        let asked = boundary(vec![rule(BUCKET, &[VIEWER], Some("r"))]);
        let narrowed = policy.narrow(&asked).unwrap();
        let only = &narrowed.rules()[0];
        assert_eq!(only.permissions, BTreeSet::from([VIEWER.to_string()]));
        assert_eq!(only.condition.as_ref().unwrap().expression, "(p) && (r)");
        let plain = boundary(vec![rule(BUCKET, &[VIEWER], None)]);
        assert_eq!(
            policy.narrow(&plain).unwrap().rules()[0]
                .condition
                .as_ref()
                .unwrap()
                .expression,
            "p",
            "the policy's condition stays when the request has none"
        );
    }

    #[test]
    fn what_the_policy_does_not_cover_is_named() {
        let policy = boundary(vec![rule(BUCKET, &[VIEWER], None)]);
        let other = boundary(vec![rule(&format!("{BUCKET}2"), &[VIEWER], None)]);
        assert!(
            policy
                .narrow(&other)
                .unwrap_err()
                .contains("buckets/b2 is outside")
        );
        let more = boundary(vec![rule(BUCKET, &[VIEWER, ADMIN], None)]);
        let error = policy.narrow(&more).unwrap_err();
        assert!(
            error.contains("does not grant inRole:roles/storage.objectAdmin"),
            "{error}"
        );
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_condition_is_checked_without_panicking(expression in ".{0,300}", asked in ".{0,300}") {
            let rule = |e: &str| RuleInput {
                resource: "//storage.googleapis.com/projects/_/buckets/b".into(),
                permissions: vec!["inRole:roles/storage.objectViewer".into()],
                condition: Some((e.to_string(), String::new(), String::new())),
            };
            let policy = AccessBoundary::new("p", vec![rule(&expression)]);
            let request = AccessBoundary::new("r", vec![rule(&asked)]);
            if let (Ok(policy), Ok(request)) = (policy, request) {
                let narrowed = policy.narrow(&request).unwrap();
                let combined = &narrowed.rules()[0].condition.as_ref().unwrap().expression;
                prop_assert!(self_contained(combined).is_ok(), "{combined}");
            }
        }
    }
}
