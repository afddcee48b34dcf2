//! [`Secrets`] on SSM Parameter Store and Secrets Manager.

use async_trait::async_trait;

use super::errors::from_sdk;
use super::AwsCloud;
use crate::error::CloudError;
use crate::secrets::{Parameter, SecretValue, Secrets};

#[async_trait]
impl Secrets for AwsCloud {
    async fn parameters_by_path(&self, path: &str) -> Result<Vec<Parameter>, CloudError> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self
                .inner
                .ssm
                .get_parameters_by_path()
                .path(path)
                .recursive(true)
                .with_decryption(true)
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| from_sdk("ssm", || format!("parameters under {path}"), e))?;
            for p in page.parameters() {
                if let (Some(name), Some(value)) = (p.name(), p.value()) {
                    out.push(Parameter {
                        name: name.to_string(),
                        value: SecretValue::new(value),
                    });
                }
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_string()),
                _ => break,
            }
        }
        // GetParametersByPath answers an empty page for a path with nothing
        // under it; for hangar that is a missing secret, not an empty one.
        if out.is_empty() {
            return Err(CloudError::NotFound {
                what: format!("SSM parameters under {path}"),
                code: Some("ParameterNotFound".into()),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn parameter(&self, name: &str) -> Result<Parameter, CloudError> {
        let out = self
            .inner
            .ssm
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send()
            .await
            .map_err(|e| from_sdk("ssm", || format!("SSM parameter {name}"), e))?;
        let value =
            out.parameter()
                .and_then(|p| p.value())
                .ok_or_else(|| CloudError::NotFound {
                    what: format!("value of SSM parameter {name}"),
                    code: None,
                })?;
        Ok(Parameter {
            name: name.to_string(),
            value: SecretValue::new(value),
        })
    }

    async fn secret_string(&self, id: &str) -> Result<SecretValue, CloudError> {
        let out = self
            .inner
            .secrets_manager
            .get_secret_value()
            .secret_id(id)
            .send()
            .await
            .map_err(|e| from_sdk("secretsmanager", || format!("secret {id}"), e))?;
        match out.secret_string() {
            Some(s) => Ok(SecretValue::new(s)),
            None => Err(CloudError::InvalidInput {
                code: None,
                message: format!(
                    "secret {id} holds binary data; hangar reads string secrets (plain or JSON)"
                ),
            }),
        }
    }
}
