//! The lease and the operator's memory in one DynamoDB table, with
//! conditional writes.
//!
//! Item layout (partition key `pk`, sort key `sk`, both strings):
//!
//! | `pk` | `sk` | attributes |
//! |---|---|---|
//! | owner id | `lease` | `holder` S, `version` S (a fresh UUID per write), `fence` N, `leaseMs` N, `released` BOOL, `acquiredAt`/`renewedAt` S (RFC 3339, for people) |
//! | owner id | `memory#<cluster>` | `doc` S (the cluster's memory as JSON), `holder` S, `fence` N, `writtenAt` S |
//!
//! Every item of an owner id shares its partition key, so IAM can limit a
//! role to its own items (`dynamodb:LeadingKeys`) and a new leader loads
//! every cluster's memory with one `Query`. The lease is written with
//! `PutItem` conditioned on `attribute_not_exists(pk)` or on the version
//! last seen; memory with `TransactWriteItems`, a `ConditionCheck` that the
//! writer still holds the lease with its fence beside the `Put`, so a
//! deposed leader's write fails as a whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Delete, Put, TransactWriteItem};
use aws_smithy_runtime_api::client::interceptors::SharedInterceptor;
use chrono::{DateTime, Utc};

use super::api_calls::{ApiCallInterceptor, ApiCalls};
use super::errors::from_sdk;
use super::limiter::Limiter;
use super::{Budgets, RetryPolicy};
use crate::error::CloudError;
use crate::lease::{LeaseRecord, LeaseStore, LeaseWriteError, StateStore, StateWriteError, Writer};

const LEASE_SK: &str = "lease";
const MEMORY_PREFIX: &str = "memory#";
/// DynamoDB's item limit is 400 KB, attribute names and keys included.
const MAX_DOCUMENT: usize = 380 * 1024;

/// A lease and state table for one owner id. Cheap to clone.
#[derive(Clone)]
pub struct DynamoTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
    owner: String,
    calls: Arc<ApiCalls>,
}

impl std::fmt::Debug for DynamoTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoTable")
            .field("table", &self.table)
            .field("owner", &self.owner)
            .finish()
    }
}

impl DynamoTable {
    /// A table client with `retry`'s timeouts. A lease call must end well
    /// inside the renew deadline, so callers pass short attempt timeouts
    /// and few attempts (the elector retries on its own rhythm).
    pub fn new(
        sdk: &SdkConfig,
        table: impl Into<String>,
        owner: impl Into<String>,
        retry: &RetryPolicy,
    ) -> DynamoTable {
        let calls = Arc::new(ApiCalls::default());
        let limiter = Arc::new(Limiter::new(&Budgets::default()));
        let mut b = aws_sdk_dynamodb::config::Builder::from(sdk)
            .retry_config(retry.retry_config())
            .timeout_config(retry.timeout_config(sdk.timeout_config()));
        b.push_interceptor(SharedInterceptor::new(ApiCallInterceptor::new(
            "dynamodb",
            calls.clone(),
            limiter,
        )));
        DynamoTable {
            client: aws_sdk_dynamodb::Client::from_conf(b.build()),
            table: table.into(),
            owner: owner.into(),
            calls,
        }
    }

    /// From the standard AWS configuration chain (`AWS_REGION`,
    /// `AWS_ENDPOINT_URL`, profiles, instance roles), like [`super::AwsCloud::from_env`].
    pub async fn from_env(
        table: impl Into<String>,
        owner: impl Into<String>,
        retry: &RetryPolicy,
    ) -> DynamoTable {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        DynamoTable::new(&sdk, table, owner, retry)
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Calls made to DynamoDB, per operation.
    pub fn api_calls(&self) -> &Arc<ApiCalls> {
        &self.calls
    }

    fn key(&self, sk: &str) -> HashMap<String, AttributeValue> {
        HashMap::from([
            ("pk".to_string(), s(&self.owner)),
            ("sk".to_string(), s(sk)),
        ])
    }

    /// The condition "`by` holds the lease with its fence", for a
    /// transaction's `ConditionCheck`.
    fn holds(&self, by: &Writer) -> Result<TransactWriteItem, CloudError> {
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(LEASE_SK)))
            .condition_expression("#h = :h AND #f = :f AND #r = :no")
            .expression_attribute_names("#h", "holder")
            .expression_attribute_names("#f", "fence")
            .expression_attribute_names("#r", "released")
            .expression_attribute_values(":h", s(&by.holder))
            .expression_attribute_values(":f", n(by.fence))
            .expression_attribute_values(":no", AttributeValue::Bool(false))
            .build()
            .map_err(build_error)?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }

    async fn transact(
        &self,
        items: Vec<TransactWriteItem>,
        by: &Writer,
    ) -> Result<(), StateWriteError> {
        let sent = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(e) => {
                let fenced = e
                    .as_service_error()
                    .and_then(|se| match se {
                        aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(t) => Some(t),
                        _ => None,
                    })
                    .is_some_and(|t| {
                        t.cancellation_reasons()
                            .first()
                            .and_then(|r| r.code())
                            .is_some_and(|c| c == "ConditionalCheckFailed")
                    });
                if fenced {
                    return Err(StateWriteError::Fenced(by.holder.clone()));
                }
                Err(StateWriteError::Cloud(from_sdk(
                    "dynamodb",
                    || format!("table {}", self.table),
                    e,
                )))
            }
        }
    }
}

#[async_trait]
impl LeaseStore for DynamoTable {
    async fn read(&self) -> Result<Option<LeaseRecord>, CloudError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.key(LEASE_SK)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| from_sdk("dynamodb", || format!("table {}", self.table), e))?;
        match out.item() {
            None => Ok(None),
            Some(item) => record_from_item(item).map(Some),
        }
    }

    async fn write(
        &self,
        record: &LeaseRecord,
        expected: Option<&str>,
    ) -> Result<(), LeaseWriteError> {
        let mut item = self.key(LEASE_SK);
        item.insert("holder".into(), s(&record.holder));
        item.insert("version".into(), s(&record.version));
        item.insert("fence".into(), n(record.fence));
        item.insert(
            "leaseMs".into(),
            n(u64::try_from(record.lease.as_millis()).unwrap_or(u64::MAX)),
        );
        item.insert("released".into(), AttributeValue::Bool(record.released));
        for (k, v) in [
            ("acquiredAt", record.acquired_at),
            ("renewedAt", record.renewed_at),
        ] {
            if let Some(t) = v {
                item.insert(k.into(), s(&t.to_rfc3339()));
            }
        }
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item));
        put = match expected {
            None => put
                .condition_expression("attribute_not_exists(#pk)")
                .expression_attribute_names("#pk", "pk"),
            Some(version) => put
                .condition_expression("#v = :v")
                .expression_attribute_names("#v", "version")
                .expression_attribute_values(":v", s(version)),
        };
        match put.send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                Err(LeaseWriteError::Conflict)
            }
            Err(e) => Err(LeaseWriteError::Cloud(from_sdk(
                "dynamodb",
                || format!("table {}", self.table),
                e,
            ))),
        }
    }

    fn describe(&self) -> String {
        format!("dynamodb:{}", self.table)
    }
}

#[async_trait]
impl StateStore for DynamoTable {
    async fn load(&self) -> Result<Vec<(String, String)>, CloudError> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_names("#sk", "sk")
                .expression_attribute_values(":pk", s(&self.owner))
                .expression_attribute_values(":prefix", s(MEMORY_PREFIX))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| from_sdk("dynamodb", || format!("table {}", self.table), e))?;
            for item in page.items() {
                let (Some(sk), Some(doc)) = (text(item, "sk"), text(item, "doc")) else {
                    continue;
                };
                if let Some(cluster) = sk.strip_prefix(MEMORY_PREFIX) {
                    out.push((cluster.to_string(), doc.to_string()));
                }
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        out.sort();
        Ok(out)
    }

    async fn save(
        &self,
        cluster: &str,
        document: &str,
        by: &Writer,
    ) -> Result<(), StateWriteError> {
        if document.len() > MAX_DOCUMENT {
            return Err(StateWriteError::TooLarge {
                cluster: cluster.to_string(),
                bytes: document.len(),
                max: MAX_DOCUMENT,
            });
        }
        let mut item = self.key(&format!("{MEMORY_PREFIX}{cluster}"));
        item.insert("doc".into(), s(document));
        item.insert("holder".into(), s(&by.holder));
        item.insert("fence".into(), n(by.fence));
        item.insert("writtenAt".into(), s(&Utc::now().to_rfc3339()));
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .build()
            .map_err(build_error)?;
        let items = vec![
            self.holds(by)?,
            TransactWriteItem::builder().put(put).build(),
        ];
        self.transact(items, by).await
    }

    async fn remove(&self, cluster: &str, by: &Writer) -> Result<(), StateWriteError> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(&format!("{MEMORY_PREFIX}{cluster}"))))
            .build()
            .map_err(build_error)?;
        let items = vec![
            self.holds(by)?,
            TransactWriteItem::builder().delete(delete).build(),
        ];
        self.transact(items, by).await
    }
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn text<'a>(item: &'a HashMap<String, AttributeValue>, k: &str) -> Option<&'a str> {
    item.get(k).and_then(|v| v.as_s().ok()).map(String::as_str)
}

fn number(item: &HashMap<String, AttributeValue>, k: &str) -> Option<u64> {
    item.get(k)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

fn time(item: &HashMap<String, AttributeValue>, k: &str) -> Option<DateTime<Utc>> {
    text(item, k)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// A stored lease item; one missing what every write sets is corrupt, and
/// reported rather than guessed at (a guess could hand out a used fence).
fn record_from_item(item: &HashMap<String, AttributeValue>) -> Result<LeaseRecord, CloudError> {
    let corrupt = |what: &str| CloudError::Service {
        service: "dynamodb",
        code: "CorruptLeaseItem".into(),
        message: format!("the lease item has no valid `{what}`"),
    };
    Ok(LeaseRecord {
        holder: text(item, "holder").unwrap_or_default().to_string(),
        version: text(item, "version")
            .ok_or_else(|| corrupt("version"))?
            .to_string(),
        fence: number(item, "fence").ok_or_else(|| corrupt("fence"))?,
        lease: Duration::from_millis(number(item, "leaseMs").ok_or_else(|| corrupt("leaseMs"))?),
        released: item
            .get("released")
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false),
        acquired_at: time(item, "acquiredAt"),
        renewed_at: time(item, "renewedAt"),
    })
}

fn build_error(e: aws_smithy_types::error::operation::BuildError) -> CloudError {
    CloudError::InvalidInput {
        code: None,
        message: format!("dynamodb request could not be built: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_item_round_trips_and_a_corrupt_one_is_an_error() {
        let item = HashMap::from([
            ("holder".to_string(), s("host-a-1")),
            ("version".to_string(), s("v-1")),
            ("fence".to_string(), n(7)),
            ("leaseMs".to_string(), n(15_000)),
            ("released".to_string(), AttributeValue::Bool(false)),
        ]);
        let r = record_from_item(&item).unwrap();
        assert_eq!(r.fence, 7);
        assert_eq!(r.lease, Duration::from_secs(15));
        assert!(!r.released);
        let mut broken = item.clone();
        broken.insert("fence".into(), s("seven"));
        assert!(record_from_item(&broken).is_err());
    }
}
