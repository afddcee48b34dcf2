//! Prometheus instant queries (`GET /api/v1/query`), reduced to one number.

use serde::Deserialize;

use crate::error::{error_chain, CloudError};

const SERVICE: &str = "prometheus";

/// Runs `query` against the Prometheus at `base_url` (`http://host:9090`,
/// or with a path prefix) and returns its single sample.
///
/// - no series → `None` ("no data", distinct from 0);
/// - `NaN`/`±Inf` (e.g. a ratio over zero traffic) → `None` as well;
/// - more than one series → `InvalidInput` (aggregate it, e.g. `sum(…)`);
/// - range vectors or strings → `InvalidInput`.
pub async fn instant_query(
    client: &reqwest::Client,
    base_url: &str,
    query: &str,
) -> Result<Option<f64>, CloudError> {
    let url = query_url(base_url, query)?;
    let resp = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| transport(&e))?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.map_err(|e| transport(&e))?;
    interpret(status, &body, &url, query)
}

/// The answer, from the HTTP status and body.
fn interpret(
    status: u16,
    body: &[u8],
    url: &url::Url,
    query: &str,
) -> Result<Option<f64>, CloudError> {
    let envelope: Envelope = match serde_json::from_slice(body) {
        Ok(envelope) => envelope,
        Err(parse) => return Err(http_failure(status, url, &parse.to_string())),
    };
    if envelope.status != "success" {
        return Err(api_error(
            envelope.error_type.as_deref().unwrap_or("unknown"),
            envelope.error.as_deref().unwrap_or("no message"),
        ));
    }
    let data = envelope.data.ok_or_else(|| CloudError::Service {
        service: SERVICE,
        code: "bad_response".into(),
        message: "success without data".into(),
    })?;
    let value = match data {
        Data::Vector(mut samples) => match samples.len() {
            0 => return Ok(None),
            1 => samples.swap_remove(0).value.1,
            many => {
                return Err(CloudError::InvalidInput {
                    code: Some("many_series".into()),
                    message: format!(
                        "query `{query}` returned {many} series; hangar needs one number (wrap it in sum(...))"
                    ),
                })
            }
        },
        Data::Scalar((_, value)) => value,
        Data::Matrix(_) | Data::String(_) => {
            return Err(CloudError::InvalidInput {
                code: Some("not_a_number".into()),
                message: format!("query `{query}` must return an instant vector or a scalar"),
            })
        }
    };
    let number: f64 = value.parse().map_err(|_| CloudError::Service {
        service: SERVICE,
        code: "bad_response".into(),
        message: format!("sample value {value:?} is not a number"),
    })?;
    Ok(number.is_finite().then_some(number))
}

fn query_url(base_url: &str, query: &str) -> Result<url::Url, CloudError> {
    let invalid = |why: String| CloudError::InvalidInput {
        code: None,
        message: format!("prometheus URL `{base_url}`: {why}"),
    };
    let mut base = url::Url::parse(base_url).map_err(|e| invalid(e.to_string()))?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(invalid("must be http:// or https://".into()));
    }
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    let mut url = base
        .join("api/v1/query")
        .map_err(|e| invalid(e.to_string()))?;
    url.query_pairs_mut().append_pair("query", query);
    Ok(url)
}

/// Prometheus's documented `errorType`s, by what the caller can do.
fn api_error(error_type: &str, message: &str) -> CloudError {
    match error_type {
        "bad_data" => CloudError::InvalidInput {
            code: Some(error_type.into()),
            message: message.into(),
        },
        "timeout" | "canceled" | "unavailable" => CloudError::Transport {
            service: SERVICE,
            message: format!("{error_type}: {message}"),
        },
        _ => CloudError::Service {
            service: SERVICE,
            code: error_type.into(),
            message: message.into(),
        },
    }
}

/// A non-JSON answer: wrong URL, a proxy error page, …
fn http_failure(status: u16, url: &url::Url, detail: &str) -> CloudError {
    match status {
        404 => CloudError::NotFound {
            what: format!("prometheus API at {url}"),
            code: Some("HTTP404".into()),
        },
        500..=599 => CloudError::Transport {
            service: SERVICE,
            message: format!("HTTP {status} from {url}"),
        },
        _ => CloudError::Service {
            service: SERVICE,
            code: format!("HTTP{status}"),
            message: format!("unreadable answer from {url}: {detail}"),
        },
    }
}

fn transport(e: &reqwest::Error) -> CloudError {
    CloudError::Transport {
        service: SERVICE,
        message: error_chain(e),
    }
}

#[derive(Deserialize)]
struct Envelope {
    status: String,
    data: Option<Data>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Vector(Vec<Sample>),
    Scalar((f64, String)),
    /// Not a number hangar can use.
    Matrix(#[allow(dead_code)] serde::de::IgnoredAny),
    String(#[allow(dead_code)] serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct Sample {
    value: (f64, String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_path_is_appended_to_any_prefix() {
        let u = query_url("http://127.0.0.1:9090", "sum(rate(x[1m]))").unwrap();
        assert_eq!(u.path(), "/api/v1/query");
        assert_eq!(u.query_pairs().next().unwrap().1, "sum(rate(x[1m]))");
        let u = query_url("http://127.0.0.1/prom", "up").unwrap();
        assert_eq!(u.path(), "/prom/api/v1/query");
        assert!(matches!(
            query_url("ftp://x", "up"),
            Err(CloudError::InvalidInput { .. })
        ));
        assert!(matches!(
            query_url("not a url", "up"),
            Err(CloudError::InvalidInput { .. })
        ));
    }

    fn answer(status: u16, body: &str) -> Result<Option<f64>, CloudError> {
        let url = query_url("http://127.0.0.1:9090", "q").unwrap();
        interpret(status, body.as_bytes(), &url, "q")
    }

    #[test]
    fn answers_reduce_to_one_number_or_none() {
        let vector = |values: &str| {
            format!(
                r#"{{"status":"success","data":{{"resultType":"vector","result":[{values}]}}}}"#
            )
        };
        let sample = |v: &str| format!(r#"{{"metric":{{}},"value":[1700000000.5,"{v}"]}}"#);
        assert_eq!(answer(200, &vector(&sample("42.5"))).unwrap(), Some(42.5));
        assert_eq!(answer(200, &vector(&sample("0"))).unwrap(), Some(0.0));
        assert_eq!(answer(200, &vector("")).unwrap(), None);
        assert_eq!(answer(200, &vector(&sample("NaN"))).unwrap(), None);
        assert_eq!(answer(200, &vector(&sample("+Inf"))).unwrap(), None);
        let two = format!("{},{}", sample("1"), sample("2"));
        assert_eq!(
            answer(200, &vector(&two)).unwrap_err().kind(),
            "invalid_input"
        );
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1.0,"7"]}}"#;
        assert_eq!(answer(200, scalar).unwrap(), Some(7.0));
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"1"]]}]}}"#;
        assert_eq!(answer(200, matrix).unwrap_err().kind(), "invalid_input");
        let bad = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#;
        let err = answer(400, bad).unwrap_err();
        assert_eq!(
            (err.kind(), err.code()),
            ("invalid_input", Some("bad_data"))
        );
        assert_eq!(
            answer(404, "404 page not found").unwrap_err().kind(),
            "not_found"
        );
        assert_eq!(
            answer(502, "<html>bad gateway</html>").unwrap_err().kind(),
            "transport"
        );
        let garbage =
            r#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"x"]}]}}"#;
        assert_eq!(answer(200, garbage).unwrap_err().kind(), "service");
    }

    #[test]
    fn error_types_map_to_kinds() {
        assert_eq!(api_error("bad_data", "x").kind(), "invalid_input");
        assert_eq!(api_error("timeout", "x").kind(), "transport");
        assert_eq!(api_error("execution", "x").kind(), "service");
    }
}
