//! A credentials file as parsed JSON, read through [`Object`]: each field is
//! asked for by name with the type it must have, and an error names the
//! field by its dotted path (`credential_source.format.type`), never its
//! value. Every string in the document is zeroed when it is dropped.

use std::path::Path;

use serde_json::{Map, Value};
use zeroize::Zeroize;

use super::CredentialsError;

/// A parsed credentials file whose strings are zeroed on drop.
pub struct Document(Value);

impl Document {
    /// Parses `bytes`; the error says where parsing stopped, never what it
    /// read.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, CredentialsError> {
        let not_json = |reason: String| CredentialsError::NotJson {
            path: path.to_path_buf(),
            reason,
        };
        let value: Value = serde_json::from_slice(bytes).map_err(|error| {
            not_json(format!(
                "{:?} error at line {} column {}",
                error.classify(),
                error.line(),
                error.column()
            ))
        })?;
        let document = Self(value);
        if !document.0.is_object() {
            return Err(not_json("the top level is not an object".into()));
        }
        Ok(document)
    }

    /// The top-level object, its errors naming `path`.
    pub fn root<'a>(&'a self, path: &'a Path) -> Object<'a> {
        static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);
        Object {
            path,
            prefix: String::new(),
            fields: self.0.as_object().unwrap_or(&EMPTY),
        }
    }
}

impl Drop for Document {
    fn drop(&mut self) {
        zeroize_strings(&mut self.0);
    }
}

fn zeroize_strings(value: &mut Value) {
    match value {
        Value::String(text) => text.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(zeroize_strings),
        Value::Object(fields) => fields.values_mut().for_each(zeroize_strings),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// One JSON object of a credentials file.
#[derive(Clone)]
pub struct Object<'a> {
    path: &'a Path,
    /// The dotted path of this object, with a trailing dot (empty at the
    /// top level).
    prefix: String,
    fields: &'a Map<String, Value>,
}

impl<'a> Object<'a> {
    /// The file this object is in.
    pub fn path(&self) -> &'a Path {
        self.path
    }

    /// The dotted path of `field` of this object (of the object itself
    /// when `field` is empty).
    pub fn name(&self, field: &str) -> String {
        if field.is_empty() {
            self.prefix.trim_end_matches('.').to_string()
        } else {
            format!("{}{field}", self.prefix)
        }
    }

    /// The error for `field` of this object (for the object itself when
    /// `field` is empty).
    pub fn error(&self, field: &str, problem: impl Into<String>) -> CredentialsError {
        CredentialsError::Field {
            path: self.path.to_path_buf(),
            field: self.name(field),
            problem: problem.into(),
        }
    }

    /// Whether `field` is present (and not null).
    pub fn has(&self, field: &str) -> bool {
        !matches!(self.fields.get(field), None | Some(Value::Null))
    }

    /// The non-empty string `field`.
    pub fn text(&self, field: &str) -> Result<&'a str, CredentialsError> {
        self.optional_text(field)?
            .ok_or_else(|| self.error(field, "missing"))
    }

    /// The non-empty string `field`, if present.
    pub fn optional_text(&self, field: &str) -> Result<Option<&'a str>, CredentialsError> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) if text.trim().is_empty() => Err(self.error(field, "empty")),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(self.error(field, "not a string")),
        }
    }

    /// The non-negative integer `field`, if present.
    pub fn optional_u64(&self, field: &str) -> Result<Option<u64>, CredentialsError> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.error(field, "not a non-negative integer")),
        }
    }

    /// The object `field`.
    pub fn object(&self, field: &str) -> Result<Object<'a>, CredentialsError> {
        self.optional_object(field)?
            .ok_or_else(|| self.error(field, "missing"))
    }

    /// The object `field`, if present.
    pub fn optional_object(&self, field: &str) -> Result<Option<Object<'a>>, CredentialsError> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(fields)) => Ok(Some(Object {
                path: self.path,
                prefix: format!("{}{field}.", self.prefix),
                fields,
            })),
            Some(_) => Err(self.error(field, "not an object")),
        }
    }

    /// The list of non-empty strings `field` (empty if absent).
    pub fn texts(&self, field: &str) -> Result<Vec<&'a str>, CredentialsError> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .filter(|text| !text.trim().is_empty())
                        .ok_or_else(|| self.error(field, "not a list of non-empty strings"))
                })
                .collect(),
            Some(_) => Err(self.error(field, "not a list")),
        }
    }

    /// The string-to-string map `field` (empty if absent).
    pub fn text_map(&self, field: &str) -> Result<Vec<(&'a str, &'a str)>, CredentialsError> {
        let Some(map) = self.optional_object(field)? else {
            return Ok(Vec::new());
        };
        map.fields
            .iter()
            .map(|(name, value)| match value {
                Value::String(value) => Ok((name.as_str(), value.as_str())),
                _ => Err(map.error(name, "not a string")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_named_by_their_dotted_path_and_never_by_value() {
        let path = Path::new("/etc/creds.json");
        let document = Document::parse(
            path,
            br#"{"a": "x", "n": 5, "o": {"inner": {"deep": 3, "s": "secret-value"}}, "l": ["p", 1], "e": " "}"#,
        )
        .unwrap();
        let root = document.root(path);
        assert_eq!(root.text("a").unwrap(), "x");
        assert_eq!(root.optional_u64("n").unwrap(), Some(5));
        let deep = root.object("o").unwrap().object("inner").unwrap();
        let message = deep.text("deep").unwrap_err().to_string();
        assert!(
            message.contains("\"o.inner.deep\" is not a string"),
            "{message}"
        );
        assert!(message.contains("/etc/creds.json"), "{message}");
        let message = deep.optional_u64("s").unwrap_err().to_string();
        assert!(!message.contains("secret-value"), "{message}");
        assert!(root.texts("l").unwrap_err().to_string().contains("\"l\""));
        assert!(root.text("e").unwrap_err().to_string().contains("empty"));
        assert!(
            root.text("missing")
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
        assert!(
            root.object("a")
                .err()
                .unwrap()
                .to_string()
                .contains("not an object")
        );
    }

    #[test]
    fn only_objects_are_documents() {
        let path = Path::new("f.json");
        for bad in [&b"[1]"[..], b"\"s\"", b"{", b"not json"] {
            let Err(error) = Document::parse(path, bad) else {
                panic!("{bad:?} parsed");
            };
            assert!(error.to_string().contains("not a JSON object"), "{error}");
        }
    }
}
