//! EC2 through the gateway: `RunInstances` idempotency and capacity,
//! eventually consistent `DescribeInstances`, tag changes that take a while
//! to show. Everything else EC2 passes to moto unchanged.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::http::request::Parts;
use hyper::{HeaderMap, Response, StatusCode};

use super::consistency::{StateShown, TagChange, View};
use super::semantics::Capacity;
use super::xml::{Document, Element};
use super::Shared;
use crate::faults::{aws_error, Service};

/// A query-protocol form, in order.
pub(super) type Form = Vec<(String, String)>;

pub(super) fn parse_form(body: &[u8]) -> Form {
    form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

pub(super) fn encode_form(form: &Form) -> Bytes {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form {
        s.append_pair(k, v);
    }
    Bytes::from(s.finish())
}

fn get<'a>(form: &'a Form, key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Values of `Prefix.1`, `Prefix.2`, … in index order.
fn list(form: &Form, prefix: &str) -> Vec<String> {
    let mut items: Vec<(u32, String)> = form
        .iter()
        .filter_map(|(k, v)| {
            let n = k.strip_prefix(prefix)?.strip_prefix('.')?.parse().ok()?;
            Some((n, v.clone()))
        })
        .collect();
    items.sort();
    items.into_iter().map(|(_, v)| v).collect()
}

/// `Filter.N.Name` with its `Filter.N.Value.M`.
fn filters(form: &Form) -> Vec<(String, Vec<String>)> {
    let mut by_n: BTreeMap<u32, (Option<String>, BTreeMap<u32, String>)> = BTreeMap::new();
    for (k, v) in form {
        let Some(rest) = k.strip_prefix("Filter.") else {
            continue;
        };
        let Some((n, field)) = rest.split_once('.') else {
            continue;
        };
        let Ok(n) = n.parse::<u32>() else { continue };
        let entry = by_n.entry(n).or_default();
        if field == "Name" {
            entry.0 = Some(v.clone());
        } else if let Some(m) = field.strip_prefix("Value.").and_then(|m| m.parse().ok()) {
            entry.1.insert(m, v.clone());
        }
    }
    by_n.into_values()
        .filter_map(|(name, values)| Some((name?, values.into_values().collect())))
        .collect()
}

fn is_tag_filter(name: &str) -> bool {
    name.starts_with("tag:") || name == "tag-key" || name == "tag-value"
}

/// A filter the gateway evaluates itself while changes are pending: on
/// tags, or on the state (`instance-state-name`).
fn is_view_filter(name: &str) -> bool {
    is_tag_filter(name) || name == STATE_FILTER
}

const STATE_FILTER: &str = "instance-state-name";

fn ec2_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    aws_error(Service::Ec2, status, code, message)
}

// ---- RunInstances -------------------------------------------------------

/// A launch that succeeded, kept for the token's lifetime.
#[derive(Debug)]
pub(super) struct Launch {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    instance_ids: Vec<String>,
}

/// One client token: the parameters it was first used with and, once it
/// succeeded, its launch.
#[derive(Debug)]
pub(super) struct TokenEntry {
    fingerprint: String,
    last_used: Mutex<Instant>,
    launch: tokio::sync::OnceCell<Arc<Launch>>,
}

impl TokenEntry {
    fn last_used(&self) -> Instant {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self, now: Instant) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = now;
    }
}

/// Every parameter but the token itself (and the API version), in a
/// canonical order: two requests are "the same" when these are equal.
fn fingerprint(form: &Form) -> String {
    let mut pairs: Vec<&(String, String)> = form
        .iter()
        .filter(|(k, _)| k != "ClientToken" && k != "Version")
        .collect();
    pairs.sort();
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

fn subnet_of(form: &Form) -> Option<&str> {
    get(form, "SubnetId").or_else(|| get(form, "NetworkInterface.1.SubnetId"))
}

pub(super) async fn run_instances(
    shared: &Shared,
    parts: Parts,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let form = parse_form(&body);
    let token = get(&form, "ClientToken").filter(|t| !t.is_empty());
    let (Some(ttl), Some(token)) = (shared.semantics.client_token_ttl, token) else {
        return match launch(shared, &parts, body, &form).await {
            Ok(done) => done.response(),
            Err(resp) => resp,
        };
    };
    let print = fingerprint(&form);
    let now = Instant::now();
    let entry = {
        let mut tokens = shared.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.retain(|_, e| e.last_used() + ttl > now);
        let entry = tokens
            .entry(token.to_string())
            .or_insert_with(|| {
                Arc::new(TokenEntry {
                    fingerprint: print.clone(),
                    last_used: Mutex::new(now),
                    launch: tokio::sync::OnceCell::new(),
                })
            })
            .clone();
        if entry.fingerprint != print {
            return ec2_error(
                400,
                "IdempotentParameterMismatch",
                &format!(
                    "The client token '{token}' was already used in a request with different parameters."
                ),
            );
        }
        entry.touch(now);
        entry
    };
    // Concurrent duplicates wait here for the first one's launch.
    let mut launched_here = false;
    let result = entry
        .launch
        .get_or_try_init(|| async {
            launched_here = true;
            launch(shared, &parts, body, &form).await.map(Arc::new)
        })
        .await;
    match result {
        Ok(done) if launched_here => done.response(),
        Ok(done) => replay(shared, &parts, done.clone()).await,
        Err(resp) => {
            // Nothing was launched: the token is free for another attempt.
            let mut tokens = shared.tokens.lock().unwrap_or_else(|p| p.into_inner());
            if entry.launch.get().is_none()
                && tokens.get(token).is_some_and(|e| Arc::ptr_eq(e, &entry))
            {
                tokens.remove(token);
            }
            resp
        }
    }
}

impl Launch {
    fn response(&self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(self.body.clone()));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        resp
    }
}

/// Checks the subnet's capacity, then launches in moto; records the new
/// instances and their launch tags as not yet visible.
async fn launch(
    shared: &Shared,
    parts: &Parts,
    body: Bytes,
    form: &Form,
) -> Result<Launch, Response<Full<Bytes>>> {
    if let Some(subnet) = subnet_of(form) {
        let capacity = shared
            .capacity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(subnet)
            .copied()
            .unwrap_or_default();
        let instance_type = get(form, "InstanceType").unwrap_or("the requested instance type");
        match capacity {
            Capacity::Available => {}
            Capacity::Insufficient => {
                return Err(ec2_error(
                    500,
                    "InsufficientInstanceCapacity",
                    &format!(
                        "We currently do not have sufficient {instance_type} capacity in the Availability Zone you requested (the zone of {subnet}). Our system will be working on provisioning additional capacity. You can currently get {instance_type} capacity by not specifying an Availability Zone in your request or choosing a different Availability Zone."
                    ),
                ))
            }
            Capacity::Unsupported => {
                return Err(ec2_error(
                    400,
                    "Unsupported",
                    "The requested configuration is currently not supported. Please check the documentation for supported configurations.",
                ))
            }
        }
    }
    let (rparts, rbody) = shared.send(parts, body).await?;
    if !rparts.status.is_success() {
        return Err(Response::from_parts(rparts, Full::new(rbody)));
    }
    let launched = std::str::from_utf8(&rbody)
        .ok()
        .and_then(|xml| Document::parse(xml).ok())
        .map(|doc| launched_instances(&doc.root))
        .unwrap_or_default();
    if launched.is_empty() {
        tracing::warn!("RunInstances answered without instances the gateway could read");
    }
    {
        let now = Instant::now();
        let mut consistency = shared.consistency();
        for (id, tags) in &launched {
            consistency.launched(now, id, tags);
        }
    }
    let mut headers = rparts.headers;
    headers.remove(hyper::header::CONTENT_LENGTH);
    Ok(Launch {
        status: rparts.status,
        headers,
        body: rbody,
        instance_ids: launched.into_iter().map(|(id, _)| id).collect(),
    })
}

/// `(instance id, tags)` of every `instancesSet/item` under `parent`.
fn launched_instances(parent: &Element) -> Vec<(String, Vec<(String, String)>)> {
    parent
        .child("instancesSet")
        .into_iter()
        .flat_map(Element::elements)
        .filter_map(|item| {
            let id = item.child_text("instanceId")?;
            Some((id, tag_set(item).into_iter().collect()))
        })
        .collect()
}

fn tag_set(instance: &Element) -> BTreeMap<String, String> {
    instance
        .child("tagSet")
        .into_iter()
        .flat_map(Element::elements)
        .filter_map(|t| {
            Some((
                t.child_text("key")?,
                t.child_text("value").unwrap_or_default(),
            ))
        })
        .collect()
}

fn tag_set_element(tags: &BTreeMap<String, String>) -> Element {
    Element::new(
        "tagSet",
        tags.iter()
            .map(|(k, v)| {
                Element::new(
                    "item",
                    vec![Element::leaf("key", k), Element::leaf("value", v)],
                )
            })
            .collect(),
    )
}

/// The first launch's answer again; as on EC2 only the instances' state is
/// current (read from moto; the stored one if that read fails).
async fn replay(shared: &Shared, parts: &Parts, done: Arc<Launch>) -> Response<Full<Bytes>> {
    let mut form: Form = vec![
        ("Action".into(), "DescribeInstances".into()),
        ("Version".into(), "2016-11-15".into()),
    ];
    for (i, id) in done.instance_ids.iter().enumerate() {
        form.push((format!("InstanceId.{}", i + 1), id.clone()));
    }
    let states: BTreeMap<String, Element> = match shared.internal(&parts.headers, &form).await {
        Ok(doc) => doc
            .root
            .child("reservationSet")
            .into_iter()
            .flat_map(Element::elements)
            .filter_map(|r| r.child("instancesSet"))
            .flat_map(Element::elements)
            .filter_map(|i| {
                Some((
                    i.child_text("instanceId")?,
                    i.child("instanceState")?.clone(),
                ))
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "replaying a RunInstances answer with its stored states");
            BTreeMap::new()
        }
    };
    let patched = std::str::from_utf8(&done.body)
        .ok()
        .and_then(|xml| Document::parse(xml).ok())
        .map(|mut doc| {
            if let Some(set) = doc.root.child_mut("instancesSet") {
                for item in set.elements_mut() {
                    let state = item
                        .child_text("instanceId")
                        .and_then(|id| states.get(&id).cloned());
                    if let Some(state) = state {
                        item.set_child(state);
                    }
                }
            }
            doc.to_xml()
        });
    let mut resp = done.response();
    if let Some(xml) = patched {
        *resp.body_mut() = Full::new(Bytes::from(xml));
    }
    resp
}

// ---- DescribeInstances ----------------------------------------------------

/// moto's answer, less what is not visible yet: instances still appearing
/// are left out (asked for by id, they do not exist yet), and tag changes
/// still propagating are undone — tag filters included.
pub(super) async fn describe_instances(
    shared: &Shared,
    parts: Parts,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let view = shared.consistency().view(Instant::now());
    let ages = shared.ages();
    if view.is_empty() && ages.is_empty() {
        return shared.pass(parts, body).await;
    }
    let form = parse_form(&body);
    let asked = list(&form, "InstanceId");
    let missing: Vec<&String> = asked.iter().filter(|id| view.is_hidden(id)).collect();
    if !missing.is_empty() {
        let ids = missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let message = if missing.len() == 1 {
            format!("The instance ID '{ids}' does not exist")
        } else {
            format!("The instance IDs '{ids}' do not exist")
        };
        return ec2_error(400, "InvalidInstanceID.NotFound", &message);
    }
    let view_filters: Vec<(String, Vec<String>)> = filters(&form)
        .into_iter()
        .filter(|(name, _)| is_view_filter(name))
        .collect();
    // moto filters on today's tags and states; with a change pending, ask
    // it for every candidate and filter on what is visible here. A later
    // page of a paginated listing is not re-filtered (its first page
    // decided).
    let refilter = (view.has_tag_changes() || view.has_state_changes())
        && !view_filters.is_empty()
        && get(&form, "NextToken").is_none();
    let body = if refilter {
        Bytes::from(without_view_filters(&form, asked.is_empty()))
    } else {
        body
    };
    let (mut rparts, rbody) = match shared.send(&parts, body).await {
        Ok(answer) => answer,
        Err(resp) => return resp,
    };
    if !rparts.status.is_success() {
        return Response::from_parts(rparts, Full::new(rbody));
    }
    let Some(mut doc) = std::str::from_utf8(&rbody)
        .ok()
        .and_then(|xml| Document::parse(xml).ok())
    else {
        tracing::warn!(
            "DescribeInstances answer is not XML the gateway can read; passed unchanged"
        );
        return Response::from_parts(rparts, Full::new(rbody));
    };
    visible_listing(
        &mut doc.root,
        &view,
        refilter.then_some(view_filters.as_slice()),
    );
    aged_listing(&mut doc.root, &ages);
    rparts.headers.remove(hyper::header::CONTENT_LENGTH);
    Response::from_parts(rparts, Full::new(Bytes::from(doc.to_xml())))
}

/// The form with its tag and state filters removed (renumbered) and, for
/// a listing, one page big enough for everything.
fn without_view_filters(form: &Form, listing: bool) -> String {
    let kept: Vec<(String, Vec<String>)> = filters(form)
        .into_iter()
        .filter(|(name, _)| !is_view_filter(name))
        .collect();
    let mut out: Form = form
        .iter()
        .filter(|(k, _)| !k.starts_with("Filter.") && k != "MaxResults" && k != "NextToken")
        .cloned()
        .collect();
    for (i, (name, values)) in kept.iter().enumerate() {
        out.push((format!("Filter.{}.Name", i + 1), name.clone()));
        for (j, v) in values.iter().enumerate() {
            out.push((format!("Filter.{}.Value.{}", i + 1, j + 1), v.clone()));
        }
    }
    if listing {
        out.push(("MaxResults".into(), "1000".into()));
    }
    String::from_utf8_lossy(&encode_form(&out)).into_owned()
}

/// Rewrites a `DescribeInstancesResponse` to what `view` lets callers see;
/// with `filters`, keeps only the instances whose visible tags and state
/// match them.
fn visible_listing(root: &mut Element, view: &View, filters: Option<&[(String, Vec<String>)]>) {
    if let Some(reservations) = root.child_mut("reservationSet") {
        reservations.retain_elements(|reservation| {
            let Some(instances) = reservation.child_mut("instancesSet") else {
                return true;
            };
            instances.retain_elements(|instance| {
                let Some(id) = instance.child_text("instanceId") else {
                    return true;
                };
                if view.is_hidden(&id) {
                    return false;
                }
                let tags = if view.has_pending_tags(&id) {
                    let tags = view.visible_tags(&id, tag_set(instance));
                    instance.set_child(tag_set_element(&tags));
                    tags
                } else {
                    tag_set(instance)
                };
                if let Some(before) = view.visible_state(&id) {
                    instance.set_child(Element::new(
                        "instanceState",
                        vec![
                            Element::leaf("code", &before.code),
                            Element::leaf("name", &before.name),
                        ],
                    ));
                }
                let state = instance
                    .child("instanceState")
                    .and_then(|s| s.child_text("name"))
                    .unwrap_or_default();
                filters.is_none_or(|f| matches_view_filters(f, &tags, &state))
            });
            instances.elements().next().is_some()
        });
    }
    if filters.is_some() {
        // One page held everything.
        root.retain_elements(|e| e.name != "nextToken");
    }
}

/// Lists every aged instance as launched that much earlier (see
/// [`super::Gateway::age_instance`]).
fn aged_listing(root: &mut Element, ages: &HashMap<String, Duration>) {
    if ages.is_empty() {
        return;
    }
    let Some(reservations) = root.child_mut("reservationSet") else {
        return;
    };
    for reservation in reservations.elements_mut() {
        let Some(instances) = reservation.child_mut("instancesSet") else {
            continue;
        };
        for instance in instances.elements_mut() {
            let Some(by) = instance
                .child_text("instanceId")
                .and_then(|id| ages.get(&id).copied())
            else {
                continue;
            };
            let earlier = instance
                .child_text("launchTime")
                .and_then(|t| humantime::parse_rfc3339_weak(&t).ok())
                .and_then(|t| t.checked_sub(by));
            match earlier {
                Some(t) => instance.set_child(Element::leaf(
                    "launchTime",
                    &humantime::format_rfc3339_millis(t).to_string(),
                )),
                None => tracing::warn!("an aged instance's launchTime is unreadable; listed as is"),
            }
        }
    }
}

/// EC2's tag and state filters: every filter must match (any of its
/// values does).
fn matches_view_filters(
    filters: &[(String, Vec<String>)],
    tags: &BTreeMap<String, String>,
    state: &str,
) -> bool {
    filters.iter().all(|(name, values)| {
        let any = |s: &str| values.iter().any(|pattern| glob(pattern, s));
        match name.as_str() {
            STATE_FILTER => any(state),
            "tag-key" => tags.keys().any(|k| any(k)),
            "tag-value" => tags.values().any(|v| any(v)),
            other => other
                .strip_prefix("tag:")
                .and_then(|key| tags.get(key))
                .is_some_and(|v| any(v)),
        }
    })
}

/// EC2 filter wildcards: `*` any run, `?` one character, `\` escapes.
fn glob(pattern: &str, s: &str) -> bool {
    fn go(p: &[char], s: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('*', rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
            Some(('?', rest)) => !s.is_empty() && go(rest, &s[1..]),
            Some(('\\', rest)) if !rest.is_empty() => {
                s.first() == Some(&rest[0]) && go(&rest[1..], &s[1..])
            }
            Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = s.chars().collect();
    go(&p, &s)
}

// ---- StartInstances / StopInstances / TerminateInstances ------------------

/// Forwards a state change and records, per instance its answer lists,
/// the state before it as what listings show until the change's lag.
pub(super) async fn change_state(
    shared: &Shared,
    parts: Parts,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let enabled = shared.consistency().enabled();
    if !enabled {
        return shared.pass(parts, body).await;
    }
    let (rparts, rbody) = match shared.send(&parts, body).await {
        Ok(answer) => answer,
        Err(resp) => return resp,
    };
    if rparts.status.is_success() {
        match std::str::from_utf8(&rbody)
            .ok()
            .and_then(|xml| Document::parse(xml).ok())
        {
            Some(doc) => {
                let now = Instant::now();
                let mut consistency = shared.consistency();
                for (id, before) in state_changes(&doc.root) {
                    consistency.state_changed(now, &id, before);
                }
            }
            None => tracing::warn!(
                "a state change's answer is not XML the gateway can read; it shows at once"
            ),
        }
    }
    Response::from_parts(rparts, Full::new(rbody))
}

/// The instances of a Start/Stop/TerminateInstances answer whose state
/// changed, with the state before.
fn state_changes(root: &Element) -> Vec<(String, StateShown)> {
    let shown = |item: &Element, name: &str| {
        let state = item.child(name)?;
        Some(StateShown {
            code: state.child_text("code")?,
            name: state.child_text("name")?,
        })
    };
    root.child("instancesSet")
        .into_iter()
        .flat_map(Element::elements)
        .filter_map(|item| {
            let id = item.child_text("instanceId")?;
            let before = shown(item, "previousState")?;
            let after = shown(item, "currentState")?;
            (before.name != after.name).then_some((id, before))
        })
        .collect()
}

// ---- CreateTags / DeleteTags -------------------------------------------------

/// Forwards a tag change and records it as not yet visible to listings.
/// The tags before it are read from moto first (tag writes are serialised
/// so no other change slips in between).
pub(super) async fn write_tags(
    shared: &Shared,
    parts: Parts,
    body: Bytes,
    action: &str,
) -> Response<Full<Bytes>> {
    let enabled = shared.consistency().enabled();
    let form = parse_form(&body);
    let instances: Vec<String> = list(&form, "ResourceId")
        .into_iter()
        .filter(|id| id.starts_with("i-"))
        .collect();
    if !enabled || instances.is_empty() {
        return shared.pass(parts, body).await;
    }
    let _one_at_a_time = shared.tag_writes.lock().await;
    let before = match current_tags(shared, &parts.headers, &instances).await {
        Ok(tags) => tags,
        Err(e) => {
            tracing::warn!(error = %e, "reading tags before {action} failed; this change shows at once");
            return shared.pass(parts, body).await;
        }
    };
    let (rparts, rbody) = match shared.send(&parts, body).await {
        Ok(answer) => answer,
        Err(resp) => return resp,
    };
    if rparts.status.is_success() {
        let asked = requested_tags(&form);
        let now = Instant::now();
        let mut consistency = shared.consistency();
        for id in &instances {
            let current = before.get(id).cloned().unwrap_or_default();
            consistency.tags_changed(now, id, tag_changes(action, &current, &asked));
        }
    }
    Response::from_parts(rparts, Full::new(rbody))
}

/// `Tag.N.Key` with its `Tag.N.Value` (`None`: no value given).
fn requested_tags(form: &Form) -> Vec<(String, Option<String>)> {
    let mut by_n: BTreeMap<u32, (Option<String>, Option<String>)> = BTreeMap::new();
    for (k, v) in form {
        let Some((n, field)) = k.strip_prefix("Tag.").and_then(|r| r.split_once('.')) else {
            continue;
        };
        let Ok(n) = n.parse::<u32>() else { continue };
        let entry = by_n.entry(n).or_default();
        match field {
            "Key" => entry.0 = Some(v.clone()),
            "Value" => entry.1 = Some(v.clone()),
            _ => {}
        }
    }
    by_n.into_values()
        .filter_map(|(k, v)| Some((k?, v)))
        .collect()
}

/// What `CreateTags`/`DeleteTags` with `asked` does to `current`.
fn tag_changes(
    action: &str,
    current: &BTreeMap<String, String>,
    asked: &[(String, Option<String>)],
) -> Vec<TagChange> {
    let change = |key: &str, after: Option<String>| {
        let before = current.get(key).cloned();
        (before != after).then(|| TagChange {
            key: key.to_string(),
            before,
            after,
        })
    };
    if action == "CreateTags" {
        return asked
            .iter()
            .filter_map(|(k, v)| change(k, Some(v.clone().unwrap_or_default())))
            .collect();
    }
    if asked.is_empty() {
        // DeleteTags without tags deletes every user tag.
        return current
            .keys()
            .filter(|k| !k.starts_with("aws:"))
            .filter_map(|k| change(k, None))
            .collect();
    }
    asked
        .iter()
        .filter(|(k, v)| match (current.get(k), v) {
            (Some(have), Some(want)) => have == want,
            (Some(_), None) => true,
            (None, _) => false,
        })
        .filter_map(|(k, _)| change(k, None))
        .collect()
}

/// Instance id → tags, read from moto (`DescribeTags`).
async fn current_tags(
    shared: &Shared,
    like: &HeaderMap,
    instances: &[String],
) -> Result<BTreeMap<String, BTreeMap<String, String>>, String> {
    let mut form: Form = vec![
        ("Action".into(), "DescribeTags".into()),
        ("Version".into(), "2016-11-15".into()),
        ("MaxResults".into(), "1000".into()),
        ("Filter.1.Name".into(), "resource-id".into()),
    ];
    for (i, id) in instances.iter().enumerate() {
        form.push((format!("Filter.1.Value.{}", i + 1), id.clone()));
    }
    let doc = shared.internal(like, &form).await?;
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for item in doc
        .root
        .child("tagSet")
        .into_iter()
        .flat_map(Element::elements)
    {
        if let (Some(id), Some(key)) = (item.child_text("resourceId"), item.child_text("key")) {
            out.entry(id)
                .or_default()
                .insert(key, item.child_text("value").unwrap_or_default());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {

    use super::super::consistency::Consistency;
    use super::super::semantics::Lag;
    use super::*;

    const LISTING: &str = "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<DescribeInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15\"><reservationSet><item><reservationId>r-1</reservationId><instancesSet><item><clientToken>t1</clientToken><tagSet><item><key>owner</key><value>me</value></item><item><key>phase</key><value>draining</value></item></tagSet><instanceId>i-old</instanceId></item></instancesSet></item><item><reservationId>r-2</reservationId><instancesSet><item><tagSet><item><key>owner</key><value>me</value></item></tagSet><instanceId>i-new</instanceId></item></instancesSet></item></reservationSet><nextToken>r-2</nextToken></DescribeInstancesResponse>";

    fn form(pairs: &[(&str, &str)]) -> Form {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_aged_instance_is_listed_as_launched_that_much_earlier_and_no_other() {
        let xml = "<DescribeInstancesResponse><reservationSet><item><instancesSet>\
            <item><instanceId>i-old</instanceId><launchTime>2026-12-01T22:00:00.000Z</launchTime></item>\
            <item><instanceId>i-new</instanceId><launchTime>2026-12-01T22:00:00.000Z</launchTime></item>\
            </instancesSet></item></reservationSet></DescribeInstancesResponse>";
        let mut doc = Document::parse(xml).unwrap();
        let ages = HashMap::from([("i-old".to_string(), Duration::from_secs(25 * 3600))]);
        aged_listing(&mut doc.root, &ages);
        let out = doc.to_xml();
        assert!(
            out.contains(
                "<instanceId>i-old</instanceId><launchTime>2026-11-30T21:00:00.000Z</launchTime>"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "<instanceId>i-new</instanceId><launchTime>2026-12-01T22:00:00.000Z</launchTime>"
            ),
            "{out}"
        );
    }

    #[test]
    fn a_listing_hides_new_instances_and_undoes_pending_tag_changes() {
        let mut c = Consistency::new(Lag::Fixed(Duration::from_secs(5)), 1);
        let t0 = Instant::now();
        c.launched(t0, "i-new", &[("owner".into(), "me".into())]);
        c.tags_changed(
            t0,
            "i-old",
            vec![TagChange {
                key: "phase".into(),
                before: Some("serving".into()),
                after: Some("draining".into()),
            }],
        );
        let view = c.view(t0);
        let mut doc = Document::parse(LISTING).unwrap();
        let f = vec![("tag:phase".to_string(), vec!["serv*".to_string()])];
        visible_listing(&mut doc.root, &view, Some(&f));
        let xml = doc.to_xml();
        assert!(!xml.contains("i-new"), "{xml}");
        assert!(!xml.contains("r-2"), "an emptied reservation stays: {xml}");
        assert!(
            xml.contains("<key>phase</key><value>serving</value>"),
            "{xml}"
        );
        assert!(xml.contains("<clientToken>t1</clientToken>"));
        assert!(!xml.contains("nextToken"));
        // The old value no longer matches once the change is visible.
        let mut doc = Document::parse(LISTING).unwrap();
        visible_listing(
            &mut doc.root,
            &c.view(t0 + Duration::from_secs(6)),
            Some(&f),
        );
        assert!(!doc.to_xml().contains("i-old"));
    }

    #[test]
    fn a_listing_shows_the_state_before_a_pending_change_and_filters_on_it() {
        let answer = "<TerminateInstancesResponse><instancesSet><item><instanceId>i-old</instanceId><previousState><code>16</code><name>running</name></previousState><currentState><code>48</code><name>terminated</name></currentState></item><item><instanceId>i-new</instanceId><previousState><code>48</code><name>terminated</name></previousState><currentState><code>48</code><name>terminated</name></currentState></item></instancesSet></TerminateInstancesResponse>";
        let changes = state_changes(&Document::parse(answer).unwrap().root);
        assert_eq!(
            changes,
            [(
                "i-old".to_string(),
                StateShown {
                    code: "16".into(),
                    name: "running".into()
                }
            )],
            "an instance already terminated did not change"
        );
        let mut c = Consistency::new(Lag::Fixed(Duration::from_secs(5)), 1);
        let t0 = Instant::now();
        for (id, before) in changes {
            c.state_changed(t0, &id, before);
        }
        let listing = LISTING.replace(
            "<instanceId>i-old</instanceId>",
            "<instanceId>i-old</instanceId><instanceState><code>48</code><name>terminated</name></instanceState>",
        );
        let live = vec![(
            "instance-state-name".to_string(),
            vec!["pending".to_string(), "running".to_string()],
        )];
        let mut doc = Document::parse(&listing).unwrap();
        visible_listing(&mut doc.root, &c.view(t0), Some(&live));
        let xml = doc.to_xml();
        assert!(
            xml.contains("<instanceId>i-old</instanceId><instanceState><code>16</code><name>running</name></instanceState>"),
            "{xml}"
        );
        let mut doc = Document::parse(&listing).unwrap();
        visible_listing(
            &mut doc.root,
            &c.view(t0 + Duration::from_secs(6)),
            Some(&live),
        );
        assert!(!doc.to_xml().contains("i-old"), "terminated once visible");
    }

    #[test]
    fn tag_and_state_filters_and_wildcards() {
        let tags: BTreeMap<String, String> = [("owner".to_string(), "hangar-a".to_string())].into();
        let f = |name: &str, v: &str| vec![(name.to_string(), vec![v.to_string()])];
        let m = |f: &[(String, Vec<String>)]| matches_view_filters(f, &tags, "running");
        assert!(m(&f("tag:owner", "hangar-?")));
        assert!(m(&f("tag-key", "own*")));
        assert!(m(&f("tag-value", "*-a")));
        assert!(!m(&f("tag:owner", "hangar")));
        assert!(!m(&f("tag:other", "*")));
        assert!(m(&f("instance-state-name", "running")));
        assert!(!m(&f("instance-state-name", "stopped")));
        assert!(glob("a\\*b", "a*b"));
        assert!(!glob("a\\*b", "axb"));
    }

    #[test]
    fn tag_and_state_filters_are_taken_out_of_the_request_and_renumbered() {
        let f = form(&[
            ("Action", "DescribeInstances"),
            ("Filter.1.Name", "tag:owner"),
            ("Filter.1.Value.1", "me"),
            ("Filter.2.Name", "instance-state-name"),
            ("Filter.2.Value.1", "running"),
            ("Filter.2.Value.2", "pending"),
            ("Filter.3.Name", "vpc-id"),
            ("Filter.3.Value.1", "vpc-1"),
            ("MaxResults", "5"),
        ]);
        let out = parse_form(without_view_filters(&f, true).as_bytes());
        assert_eq!(
            filters(&out),
            vec![("vpc-id".to_string(), vec!["vpc-1".to_string()])]
        );
        assert_eq!(get(&out, "Filter.1.Name"), Some("vpc-id"));
        assert_eq!(get(&out, "MaxResults"), Some("1000"));
    }

    #[test]
    fn fingerprints_ignore_the_token_and_order_but_not_values() {
        let a = form(&[
            ("Action", "RunInstances"),
            ("ClientToken", "t"),
            ("MinCount", "1"),
            ("TagSpecification.1.Tag.1.Value", "a"),
        ]);
        let b = form(&[
            ("TagSpecification.1.Tag.1.Value", "a"),
            ("MinCount", "1"),
            ("ClientToken", "u"),
            ("Action", "RunInstances"),
        ]);
        let c = form(&[
            ("Action", "RunInstances"),
            ("ClientToken", "t"),
            ("MinCount", "1"),
            ("TagSpecification.1.Tag.1.Value", "b"),
        ]);
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }

    #[test]
    fn tag_writes_compute_before_and_after() {
        let current: BTreeMap<String, String> = [
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]
        .into();
        let created = tag_changes(
            "CreateTags",
            &current,
            &[
                ("a".into(), Some("1".into())),
                ("c".into(), Some("3".into())),
            ],
        );
        assert_eq!(
            created.len(),
            1,
            "setting a tag to its value changes nothing"
        );
        assert_eq!(created[0].key, "c");
        let deleted = tag_changes(
            "DeleteTags",
            &current,
            &[("a".into(), Some("9".into())), ("b".into(), None)],
        );
        assert_eq!(
            deleted,
            vec![TagChange {
                key: "b".into(),
                before: Some("2".into()),
                after: None
            }]
        );
        assert_eq!(tag_changes("DeleteTags", &current, &[]).len(), 2);
        let asked = requested_tags(&form(&[
            ("Tag.2.Key", "y"),
            ("Tag.1.Key", "x"),
            ("Tag.1.Value", ""),
        ]));
        assert_eq!(
            asked,
            vec![
                ("x".to_string(), Some(String::new())),
                ("y".to_string(), None)
            ]
        );
    }
}
