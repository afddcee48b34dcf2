//! ELBv2 through the gateway: the load balancer's control plane answering
//! like an ALB's.
//!
//! moto registers and deregisters targets instantly and calls every target
//! healthy. hangar relies on the ALB's answers: after `RegisterTargets` it
//! waits for `healthy`; after `DeregisterTargets` it waits while the target
//! is `draining`. So, on the LB's target group:
//! - `RegisterTargets` / `DeregisterTargets`: once moto accepted them, the
//!   LB data plane is told *before* the caller gets its answer — when
//!   `DeregisterTargets` returns, no new request goes to the target;
//! - `ModifyTargetGroup` / `ModifyTargetGroupAttributes`: the data plane
//!   re-reads the group's health-check settings and deregistration delay
//!   before the caller gets its answer;
//! - `DescribeTargetHealth` reports what the data plane sees: `initial`
//!   until the first check passed (or enough failed), `healthy`,
//!   `unhealthy` (with the last failure), and `draining` for deregistered
//!   targets while requests are in flight to them and — as an ALB shows it
//!   — until the deregistration delay has passed
//!   ([`super::Semantics::draining_for_whole_delay`]); then they vanish.

use std::collections::BTreeSet;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;

use super::Shared;
use crate::lb::{Health, TargetView};

/// Handles one ELBv2 call (already admitted and counted).
pub(super) async fn handle(
    shared: &Shared,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let call = parse_call(&body);
    let (mut parts, body) = match shared.send(&parts, body).await {
        Ok(answer) => answer,
        Err(resp) => return resp,
    };
    let lb = &shared.lb;
    let ours = call.target_group_arn.as_deref() == Some(lb.target_group_arn());
    if ours && call.action == "DeregisterTargets" && refused_as_unregistered(&parts, &body) {
        // moto refuses to deregister a target that is not registered
        // (any more); ELB answers success and does nothing. A retried
        // drain after a crash does exactly that.
        let targets = lb.targets();
        let registered: BTreeSet<&str> = targets
            .iter()
            .filter(|t| t.registered)
            .map(|t| t.instance_id.as_str())
            .collect();
        if call
            .targets
            .iter()
            .all(|(id, _)| !registered.contains(id.as_str()))
        {
            return deregistered_nothing();
        }
    }
    if !parts.status.is_success() || !ours {
        return Response::from_parts(parts, Full::new(body));
    }
    let arn = lb.target_group_arn().to_string();
    let body = match call.action.as_str() {
        "RegisterTargets" => {
            lb.note_registered(&arn, &call.targets);
            body
        }
        "DeregisterTargets" => {
            lb.note_deregistered(&arn, &call.targets);
            body
        }
        "ModifyTargetGroup" | "ModifyTargetGroupAttributes" => {
            if let Err(e) = lb.reload_settings().await {
                tracing::warn!(error = %e, "re-reading the target group after {} failed", call.action);
            }
            body
        }
        "DescribeTargetHealth" => {
            let asked: Vec<String> = call.targets.iter().map(|(id, _)| id.clone()).collect();
            let lingering = if shared.semantics.draining_for_whole_delay {
                lb.lingering()
            } else {
                Vec::new()
            };
            match rewrite_target_health(&body, &lb.targets(), &lingering, &asked) {
                Some(rewritten) => {
                    // The length changed; hyper sets it from the new body.
                    parts.headers.remove(hyper::header::CONTENT_LENGTH);
                    Bytes::from(rewritten)
                }
                None => body,
            }
        }
        _ => body,
    };
    Response::from_parts(parts, Full::new(body))
}

/// moto's `InvalidTarget` answer (400).
fn refused_as_unregistered(parts: &hyper::http::response::Parts, body: &[u8]) -> bool {
    parts.status == hyper::StatusCode::BAD_REQUEST
        && std::str::from_utf8(body).is_ok_and(|b| b.contains("<Code>InvalidTarget</Code>"))
}

/// ELB's answer to a `DeregisterTargets` that had nothing to do.
fn deregistered_nothing() -> Response<Full<Bytes>> {
    let xml = "<DeregisterTargetsResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\">\
               <DeregisterTargetsResult/>\
               <ResponseMetadata><RequestId>hangar-local-noop</RequestId></ResponseMetadata>\
               </DeregisterTargetsResponse>";
    let mut resp = Response::new(Full::new(Bytes::from_static(xml.as_bytes())));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/xml"),
    );
    resp
}

/// What an ELBv2 call asks, from its form body.
struct Call {
    action: String,
    target_group_arn: Option<String>,
    /// `Targets.member.N.Id` / `.Port`.
    targets: Vec<(String, Option<u16>)>,
}

fn parse_call(body: &[u8]) -> Call {
    let mut call = Call {
        action: String::new(),
        target_group_arn: None,
        targets: Vec::new(),
    };
    let mut ids = std::collections::BTreeMap::<u32, (Option<String>, Option<u16>)>::new();
    for (k, v) in form_urlencoded::parse(body) {
        match k.as_ref() {
            "Action" => call.action = v.into_owned(),
            "TargetGroupArn" => call.target_group_arn = Some(v.into_owned()),
            key => {
                let Some(rest) = key.strip_prefix("Targets.member.") else {
                    continue;
                };
                let Some((n, field)) = rest.split_once('.') else {
                    continue;
                };
                let Ok(n) = n.parse::<u32>() else { continue };
                let entry = ids.entry(n).or_default();
                match field {
                    "Id" => entry.0 = Some(v.into_owned()),
                    "Port" => entry.1 = v.parse().ok(),
                    _ => {}
                }
            }
        }
    }
    call.targets = ids
        .into_values()
        .filter_map(|(id, port)| Some((id?, port)))
        .collect();
    call
}

/// One `<member>` of moto's `TargetHealthDescriptions`.
#[derive(Debug, PartialEq)]
struct Member {
    id: String,
    port: Option<u16>,
    health_check_port: Option<String>,
    state: String,
    reason: Option<String>,
    description: Option<String>,
}

fn tag<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&close)?;
    Some(&xml[start..start + len])
}

fn parse_members(xml: &str) -> Option<Vec<Member>> {
    let list = match tag(xml, "TargetHealthDescriptions") {
        Some(list) => list,
        // An empty list may be omitted or self-closed.
        None if xml.contains("<DescribeTargetHealthResult") => "",
        None => return None,
    };
    let mut members = Vec::new();
    for chunk in list.split("<member>").skip(1) {
        let id = tag(chunk, "Id")?.to_string();
        members.push(Member {
            id,
            port: tag(chunk, "Port").and_then(|p| p.parse().ok()),
            health_check_port: tag(chunk, "HealthCheckPort").map(str::to_string),
            state: tag(chunk, "State").unwrap_or("unavailable").to_string(),
            reason: tag(chunk, "Reason").map(str::to_string),
            description: tag(chunk, "Description").map(str::to_string),
        });
    }
    Some(members)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// moto's answer with the data plane's truth merged in; `None` when the
/// body is not the expected XML (then moto's answer passes unchanged).
fn rewrite_target_health(
    body: &[u8],
    lb: &[TargetView],
    lingering: &[(String, u16)],
    asked: &[String],
) -> Option<String> {
    let xml = std::str::from_utf8(body).ok()?;
    let members = parse_members(xml)?;
    let find = |id: &str, port: Option<u16>| {
        lb.iter()
            .find(|t| t.instance_id == id && port.is_none_or(|p| p == t.port))
    };
    let mut out: Vec<Member> = Vec::new();
    let mut seen = BTreeSet::new();
    for mut m in members {
        match find(&m.id, m.port) {
            Some(t) if t.registered => {
                let (state, reason, description) = match t.health {
                    Health::Initial => (
                        "initial",
                        Some("Elb.InitialHealthChecking"),
                        Some("Initial health checks in progress".to_string()),
                    ),
                    Health::Healthy => ("healthy", None, None),
                    Health::Unhealthy => (
                        "unhealthy",
                        Some("Target.FailedHealthChecks"),
                        Some(
                            t.last_check_error
                                .clone()
                                .unwrap_or_else(|| "Health checks failed".into()),
                        ),
                    ),
                };
                m.state = state.into();
                m.reason = reason.map(str::to_string);
                m.description = description;
            }
            Some(t) => {
                m.port = Some(t.port);
                m.state = "draining".into();
                m.reason = Some("Target.DeregistrationInProgress".into());
                m.description = Some("Target deregistration is in progress".into());
            }
            // Registered in moto, not yet seen by the data plane.
            None if m.state == "healthy" => {
                m.state = "initial".into();
                m.reason = Some("Elb.RegistrationInProgress".into());
                m.description = Some("Target registration is in progress".into());
            }
            None => {}
        }
        seen.insert((m.id.clone(), m.port));
        out.push(m);
    }
    // Draining targets moto no longer lists: in flight on the data plane,
    // or drained but inside their deregistration delay (all of them, unless
    // the call asked about specific targets).
    let draining = lb
        .iter()
        .filter(|t| !t.registered)
        .map(|t| (t.instance_id.clone(), t.port))
        .chain(lingering.iter().cloned());
    for (id, port) in draining {
        let wanted = asked.is_empty() || asked.contains(&id);
        if wanted && seen.insert((id.clone(), Some(port))) {
            out.push(Member {
                id,
                port: Some(port),
                health_check_port: Some("traffic-port".into()),
                state: "draining".into(),
                reason: Some("Target.DeregistrationInProgress".into()),
                description: Some("Target deregistration is in progress".into()),
            });
        }
    }
    let mut list = String::new();
    for m in &out {
        list.push_str("<member><Target><Id>");
        list.push_str(&escape(&m.id));
        list.push_str("</Id>");
        if let Some(p) = m.port {
            list.push_str(&format!("<Port>{p}</Port>"));
        }
        list.push_str("</Target>");
        if let Some(p) = &m.health_check_port {
            list.push_str(&format!("<HealthCheckPort>{}</HealthCheckPort>", escape(p)));
        }
        list.push_str(&format!(
            "<TargetHealth><State>{}</State>",
            escape(&m.state)
        ));
        if let Some(r) = &m.reason {
            list.push_str(&format!("<Reason>{}</Reason>", escape(r)));
        }
        if let Some(d) = &m.description {
            list.push_str(&format!("<Description>{}</Description>", escape(d)));
        }
        list.push_str("</TargetHealth></member>");
    }
    let request_id = tag(xml, "RequestId").unwrap_or("hangar-local");
    Some(format!(
        "<DescribeTargetHealthResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\">\
         <DescribeTargetHealthResult><TargetHealthDescriptions>{list}</TargetHealthDescriptions></DescribeTargetHealthResult>\
         <ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata></DescribeTargetHealthResponse>"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOTO: &str = "<DescribeTargetHealthResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\"><DescribeTargetHealthResult><TargetHealthDescriptions><member><Target><Id>i-a</Id><Port>80</Port></Target><HealthCheckPort>traffic-port</HealthCheckPort><TargetHealth><State>healthy</State></TargetHealth></member><member><Target><Id>i-b</Id><Port>80</Port></Target><HealthCheckPort>traffic-port</HealthCheckPort><TargetHealth><State>healthy</State></TargetHealth></member><member><Target><Id>i-new</Id><Port>80</Port></Target><HealthCheckPort>traffic-port</HealthCheckPort><TargetHealth><State>healthy</State></TargetHealth></member></TargetHealthDescriptions></DescribeTargetHealthResult><ResponseMetadata><RequestId>r1</RequestId></ResponseMetadata></DescribeTargetHealthResponse>";

    fn view(id: &str, registered: bool, health: Health) -> TargetView {
        TargetView {
            instance_id: id.into(),
            port: 80,
            addr: None,
            registered,
            health,
            last_check_error: Some("HTTP 500 <oops>".into()),
            in_flight: 1,
            served: 0,
        }
    }

    #[test]
    fn target_health_is_what_the_data_plane_sees() {
        let lb = [
            view("i-a", true, Health::Healthy),
            view("i-b", true, Health::Unhealthy),
            view("i-gone", false, Health::Healthy),
        ];
        let out = rewrite_target_health(MOTO.as_bytes(), &lb, &[], &[]).unwrap();
        let members = parse_members(&out).unwrap();
        let states: Vec<(&str, &str)> = members
            .iter()
            .map(|m| (m.id.as_str(), m.state.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                ("i-a", "healthy"),
                ("i-b", "unhealthy"),
                ("i-new", "initial"),
                ("i-gone", "draining")
            ]
        );
        assert_eq!(
            members[1].description.as_deref(),
            Some("HTTP 500 &lt;oops&gt;")
        );
        assert_eq!(
            members[3].reason.as_deref(),
            Some("Target.DeregistrationInProgress")
        );
        assert!(out.contains("<RequestId>r1</RequestId>"));
    }

    #[test]
    fn asking_for_other_targets_hides_unrelated_draining_ones() {
        let lb = [view("i-gone", false, Health::Healthy)];
        let out = rewrite_target_health(MOTO.as_bytes(), &lb, &[], &["i-a".into()]).unwrap();
        assert!(!out.contains("i-gone"));
        let out = rewrite_target_health(MOTO.as_bytes(), &lb, &[], &["i-gone".into()]).unwrap();
        assert!(out.contains("<Id>i-gone</Id>"));
    }

    #[test]
    fn an_empty_group_and_foreign_xml() {
        let empty = "<DescribeTargetHealthResponse><DescribeTargetHealthResult><TargetHealthDescriptions/></DescribeTargetHealthResult></DescribeTargetHealthResponse>";
        let lb = [view("i-gone", false, Health::Healthy)];
        let out = rewrite_target_health(empty.as_bytes(), &lb, &[], &[]).unwrap();
        assert_eq!(parse_members(&out).unwrap().len(), 1);
        assert!(rewrite_target_health(b"<Error/>", &lb, &[], &[]).is_none());
    }

    #[test]
    fn calls_are_read_from_the_form() {
        let call = parse_call(b"Action=DeregisterTargets&Version=2015-12-01&TargetGroupArn=arn%3Atg&Targets.member.2.Id=i-b&Targets.member.1.Id=i-a&Targets.member.1.Port=8080");
        assert_eq!(call.action, "DeregisterTargets");
        assert_eq!(call.target_group_arn.as_deref(), Some("arn:tg"));
        assert_eq!(
            call.targets,
            [("i-a".to_string(), Some(8080)), ("i-b".to_string(), None)]
        );
    }

    #[test]
    fn drained_targets_stay_draining_for_the_delay() {
        let lingering = [("i-done".to_string(), 80)];
        let out = rewrite_target_health(MOTO.as_bytes(), &[], &lingering, &[]).unwrap();
        let members = parse_members(&out).unwrap();
        let done = members.iter().find(|m| m.id == "i-done").unwrap();
        assert_eq!(done.state, "draining");
        assert_eq!(done.port, Some(80));
        let out = rewrite_target_health(MOTO.as_bytes(), &[], &lingering, &["i-a".into()]).unwrap();
        assert!(!out.contains("i-done"));
    }
}
