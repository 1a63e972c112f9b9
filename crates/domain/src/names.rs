//! Validated names, parsed once at the edge.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A name that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {why}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub why: &'static str,
}

/// A model identifier as engines and the OpenAI API know it, e.g.
/// `meta-llama/Llama-3.1-8B-Instruct`: 1–200 characters of ASCII letters,
/// digits and `-_.:/@`, not starting or ending with `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelName(String);

impl ModelName {
    /// What [`FromStr`] accepts, as a regular expression (the OpenAPI
    /// `pattern` of model names).
    pub const PATTERN: &'static str =
        "^[A-Za-z0-9._:@-]([A-Za-z0-9._:/@-]{0,198}[A-Za-z0-9._:@-])?$";

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ModelName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| NameError {
            what: "model",
            value: s.to_string(),
            why,
        };
        if s.is_empty() || s.len() > 200 {
            return Err(err("must be 1 to 200 characters"));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c))
        {
            return Err(err(
                "may contain only ASCII letters, digits and - _ . : / @",
            ));
        }
        if s.starts_with('/') || s.ends_with('/') {
            return Err(err("must not start or end with '/'"));
        }
        Ok(Self(s.to_string()))
    }
}

impl TryFrom<String> for ModelName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}
impl From<ModelName> for String {
    fn from(m: ModelName) -> String {
        m.0
    }
}
impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A provider's registered name, e.g. `mock` or `scaleway`: lowercase ASCII
/// letters, digits and `-`, 1–32 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProviderName(String);

impl ProviderName {
    /// What [`FromStr`] accepts, as a regular expression (the OpenAPI
    /// `pattern` of provider names).
    pub const PATTERN: &'static str = "^[a-z0-9-]{1,32}$";

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ProviderName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty()
            || s.len() > 32
            || !s
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(NameError {
                what: "provider",
                value: s.to_string(),
                why: "must be 1 to 32 lowercase letters, digits or '-'",
            });
        }
        Ok(Self(s.to_string()))
    }
}
impl TryFrom<String> for ProviderName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}
impl From<ProviderName> for String {
    fn from(m: ProviderName) -> String {
        m.0
    }
}
impl fmt::Display for ProviderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A string schema with `pattern` and an example.
fn string_schema(
    pattern: &str,
    max_length: usize,
    example: &str,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .pattern(Some(pattern))
        .min_length(Some(1))
        .max_length(Some(max_length))
        .examples([serde_json::Value::from(example)])
        .into()
}

impl utoipa::PartialSchema for ModelName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(Self::PATTERN, 200, "meta-llama/Llama-3.1-8B-Instruct")
    }
}
impl utoipa::ToSchema for ModelName {}

impl utoipa::PartialSchema for ProviderName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(Self::PATTERN, 32, "mock")
    }
}
impl utoipa::ToSchema for ProviderName {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names() {
        for ok in [
            "sim-model",
            "meta-llama/Llama-3.1-8B-Instruct",
            "Qwen/Qwen2.5-0.5B",
            "a@b:c",
        ] {
            assert_eq!(ok.parse::<ModelName>().unwrap().as_str(), ok);
        }
        for bad in ["", "/x", "x/", "has space", "é", &"x".repeat(201)] {
            assert!(bad.parse::<ModelName>().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<ModelName>("\"bad name\"").is_err());
    }

    #[test]
    fn provider_names() {
        assert!("mock".parse::<ProviderName>().is_ok());
        assert!("scaleway".parse::<ProviderName>().is_ok());
        assert!("Mock".parse::<ProviderName>().is_err());
        assert!("".parse::<ProviderName>().is_err());
    }
}
