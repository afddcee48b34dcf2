//! [`Secrets`]: reading a cluster's secret environment variables from SSM
//! Parameter Store and Secrets Manager (`provision.secretsFrom`).
//!
//! The trait returns raw values per parameter or secret; turning them into
//! variables (last path segment, JSON keys) is [`to_vars`]'s, a plain
//! function so it is tested without a cloud. A [`SecretValue`]'s `Debug`
//! hides the value: a stray `{:?}` in a log line shows only its length.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use hangar_crds::SecretSource;

use crate::error::CloudError;

/// A secret's value. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> SecretValue {
        SecretValue(value.into())
    }

    /// The value itself: only for writing the env file and the redactor.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue(<{} bytes>)", self.0.len())
    }
}

/// One SSM parameter: its full name (`/prod/web/DB_PASSWORD`) and value,
/// SecureStrings decrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parameter {
    pub name: String,
    pub value: SecretValue,
}

/// What hangar reads from the secret stores. Errors name the parameter,
/// path or secret (never a value); a missing one is
/// [`CloudError::NotFound`], one the role may not read
/// [`CloudError::AccessDenied`].
#[async_trait]
pub trait Secrets: Send + Sync {
    /// Every parameter under `path` (ending in `/`), recursively, all pages.
    async fn parameters_by_path(&self, path: &str) -> Result<Vec<Parameter>, CloudError>;
    /// One parameter by name.
    async fn parameter(&self, name: &str) -> Result<Parameter, CloudError>;
    /// A Secrets Manager secret's current string value, by name or ARN.
    async fn secret_string(&self, id: &str) -> Result<SecretValue, CloudError>;
}

/// Why a source's values cannot become variables (a value is never part of
/// the message).
#[derive(Clone, Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{source_name}: {error}")]
    Read {
        source_name: String,
        error: CloudError,
    },
    #[error("{source_name}: {problem}")]
    Shape {
        source_name: String,
        problem: String,
    },
    #[error("`{env}` is set by both {first} and {second}")]
    Clash {
        env: String,
        first: String,
        second: String,
    },
}

impl SecretsError {
    /// `not_found`, `access_denied`, `throttled`, … or `invalid` for a
    /// value of the wrong shape: a label for metrics and status.
    pub fn kind(&self) -> &'static str {
        match self {
            SecretsError::Read { error, .. } => error.kind(),
            SecretsError::Shape { .. } | SecretsError::Clash { .. } => "invalid",
        }
    }

    /// Whether a retry may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(self, SecretsError::Read { error, .. } if error.is_transient())
    }
}

/// Every source of `sources`, read and turned into variables (sorted by
/// name). The first failing source fails the whole read: a node must not
/// come up with half its secrets.
pub async fn read_all(
    store: &dyn Secrets,
    sources: &[SecretSource],
) -> Result<BTreeMap<String, SecretValue>, SecretsError> {
    let mut vars: BTreeMap<String, (SecretValue, String)> = BTreeMap::new();
    for source in sources {
        let name = source.describe();
        let read = |error| SecretsError::Read {
            source_name: name.clone(),
            error,
        };
        let raw = match (&source.ssm, &source.secrets_manager) {
            (Some(path), _) if source.is_ssm_path() => {
                Raw::Parameters(store.parameters_by_path(path).await.map_err(read)?)
            }
            (Some(param), _) => {
                Raw::Parameters(vec![store.parameter(param).await.map_err(read)?])
            }
            (None, Some(id)) => Raw::Secret(store.secret_string(id).await.map_err(read)?),
            (None, None) => continue,
        };
        for (env, value) in to_vars(source, raw)? {
            if let Some((_, first)) = vars.get(&env) {
                return Err(SecretsError::Clash {
                    env,
                    first: first.clone(),
                    second: name,
                });
            }
            vars.insert(env, (value, name.clone()));
        }
    }
    Ok(vars.into_iter().map(|(k, (v, _))| (k, v)).collect())
}

/// What one source returned.
#[derive(Clone, Debug)]
pub enum Raw {
    Parameters(Vec<Parameter>),
    Secret(SecretValue),
}

/// One source's values as variables: a parameter is named by its last path
/// segment (or the source's `env`); a JSON object secret gives one
/// variable per key (string, number and bool values; others are refused);
/// any other secret needs `env`.
pub fn to_vars(
    source: &SecretSource,
    raw: Raw,
) -> Result<Vec<(String, SecretValue)>, SecretsError> {
    let shape = |problem: String| SecretsError::Shape {
        source_name: source.describe(),
        problem,
    };
    let mut out = Vec::new();
    match raw {
        Raw::Parameters(params) => {
            for p in params {
                let env = match (&source.env, source.is_ssm_path()) {
                    (Some(env), false) => env.clone(),
                    _ => p.name.rsplit('/').next().unwrap_or_default().to_string(),
                };
                if !hangar_crds::validate::is_env_name(&env) {
                    return Err(shape(format!(
                        "parameter `{}` gives `{env}`, not a variable name (letters, digits \
                         and `_`, not starting with a digit); rename it or name it with `env`",
                        p.name
                    )));
                }
                out.push((env, p.value));
            }
        }
        Raw::Secret(value) => {
            if let Some(env) = &source.env {
                out.push((env.clone(), value));
                return Ok(out);
            }
            let object = match serde_json::from_str::<serde_json::Value>(value.expose()) {
                Ok(serde_json::Value::Object(map)) => map,
                _ => {
                    return Err(shape(
                        "the secret is not a JSON object: name its variable with `env`".into(),
                    ))
                }
            };
            for (key, v) in object {
                if !hangar_crds::validate::is_env_name(&key) {
                    return Err(shape(format!(
                        "key `{key}` is not a variable name (letters, digits and `_`, not \
                         starting with a digit)"
                    )));
                }
                let text = match v {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => {
                        return Err(shape(format!(
                            "key `{key}` holds an array, object or null; only strings, numbers \
                             and booleans become variables"
                        )))
                    }
                };
                out.push((key, SecretValue::new(text)));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ssm(path: &str, env: Option<&str>) -> SecretSource {
        SecretSource {
            ssm: Some(path.into()),
            secrets_manager: None,
            env: env.map(str::to_string),
        }
    }

    fn sm(id: &str, env: Option<&str>) -> SecretSource {
        SecretSource {
            ssm: None,
            secrets_manager: Some(id.into()),
            env: env.map(str::to_string),
        }
    }

    fn param(name: &str, value: &str) -> Parameter {
        Parameter {
            name: name.into(),
            value: SecretValue::new(value),
        }
    }

    fn names(vars: &[(String, SecretValue)]) -> Vec<(&str, &str)> {
        vars.iter().map(|(k, v)| (k.as_str(), v.expose())).collect()
    }

    #[test]
    fn ssm_parameters_are_named_by_their_last_segment_or_env() {
        let vars = to_vars(
            &ssm("/prod/web/", None),
            Raw::Parameters(vec![
                param("/prod/web/DB_PASSWORD", "p"),
                param("/prod/web/nested/API_KEY", "k"),
            ]),
        )
        .unwrap();
        assert_eq!(names(&vars), [("DB_PASSWORD", "p"), ("API_KEY", "k")]);
        let one = to_vars(
            &ssm("/prod/web/db-pass", Some("DB_PASSWORD")),
            Raw::Parameters(vec![param("/prod/web/db-pass", "p")]),
        )
        .unwrap();
        assert_eq!(names(&one), [("DB_PASSWORD", "p")]);
    }

    #[test]
    fn a_parameter_whose_name_is_no_variable_is_refused_by_name_not_value() {
        let e = to_vars(
            &ssm("/prod/web/", None),
            Raw::Parameters(vec![param("/prod/web/db-password", "hunter2")]),
        )
        .unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("/prod/web/db-password"), "{shown}");
        assert!(shown.contains("ssm:/prod/web/"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn json_secrets_become_one_variable_per_key_and_strings_need_env() {
        let vars = to_vars(
            &sm("prod/keys", None),
            Raw::Secret(SecretValue::new(
                r#"{"STRIPE_KEY":"sk_1","PORT":8080,"DEBUG":false}"#,
            )),
        )
        .unwrap();
        assert_eq!(
            names(&vars),
            [("DEBUG", "false"), ("PORT", "8080"), ("STRIPE_KEY", "sk_1")]
        );
        let plain = to_vars(
            &sm("prod/token", Some("TOKEN")),
            Raw::Secret(SecretValue::new(r#"{"looks":"like json"}"#)),
        )
        .unwrap();
        assert_eq!(names(&plain), [("TOKEN", r#"{"looks":"like json"}"#)]);
        let e = to_vars(
            &sm("prod/token", None),
            Raw::Secret(SecretValue::new("s3cr3t-plain")),
        )
        .unwrap_err();
        assert!(e.to_string().contains("with `env`"), "{e}");
        assert!(!e.to_string().contains("s3cr3t-plain"), "{e}");
        let e = to_vars(
            &sm("prod/keys", None),
            Raw::Secret(SecretValue::new(r#"{"A":{"nested":"no"}}"#)),
        )
        .unwrap_err();
        assert!(e.to_string().contains("key `A`"), "{e}");
    }

    #[test]
    fn a_value_is_never_in_debug_output() {
        let p = param("/x/Y", "topsecret");
        assert!(!format!("{p:?}").contains("topsecret"));
    }
}
