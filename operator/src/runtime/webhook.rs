//! `POST /api/v1/sync`: a push to the spec repository asks for a fetch
//! now instead of at the next poll. Authenticated like GitHub's webhooks:
//! `X-Hub-Signature-256: sha256=<HMAC-SHA256 of the body>` with a shared
//! secret. A delivery id seen before (`X-GitHub-Delivery`, or
//! `X-Hangar-Delivery`) is a replay and is refused.
//!
//! A call only ever triggers a fetch of what the repository says; it
//! carries no spec. The worst a replayed or forged call that got through
//! could do is an extra fetch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::Notify;

/// How many delivery ids are remembered to refuse replays.
const REMEMBERED: usize = 1024;

pub struct Webhook {
    secret: Vec<u8>,
    kick: Arc<Notify>,
    seen: Mutex<VecDeque<String>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Unauthorized(&'static str),
    Replayed,
}

impl Webhook {
    /// `secret` must not be empty (settings refuse an empty one).
    pub fn new(secret: Vec<u8>, kick: Arc<Notify>) -> Webhook {
        Webhook {
            secret,
            kick,
            seen: Mutex::new(VecDeque::new()),
        }
    }

    /// Checks one call and, when it is authentic and new, asks for a sync.
    pub fn receive(&self, signature: Option<&str>, delivery: Option<&str>, body: &[u8]) -> Verdict {
        let verdict = self.verdict(signature, delivery, body);
        if verdict == Verdict::Accepted {
            self.kick.notify_one();
        }
        verdict
    }

    fn verdict(&self, signature: Option<&str>, delivery: Option<&str>, body: &[u8]) -> Verdict {
        let Some(signature) = signature else {
            return Verdict::Unauthorized("no X-Hub-Signature-256 header");
        };
        let Some(hex_mac) = signature.trim().strip_prefix("sha256=") else {
            return Verdict::Unauthorized("X-Hub-Signature-256 is not `sha256=<hex>`");
        };
        let Ok(given) = hex::decode(hex_mac) else {
            return Verdict::Unauthorized("X-Hub-Signature-256 is not hex");
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.secret) else {
            return Verdict::Unauthorized("no usable secret");
        };
        mac.update(body);
        // Constant time: the comparison tells an attacker nothing.
        if mac.verify_slice(&given).is_err() {
            return Verdict::Unauthorized("signature does not match the body");
        }
        if let Some(id) = delivery {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.iter().any(|s| s == id) {
                return Verdict::Replayed;
            }
            seen.push_back(id.to_string());
            if seen.len() > REMEMBERED {
                seen.pop_front();
            }
        }
        Verdict::Accepted
    }
}

/// The header value a sender computes (for tests and `examples/ci`).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook() -> (Webhook, Arc<Notify>) {
        let kick = Arc::new(Notify::new());
        (
            Webhook::new(b"It's a Secret to Everybody".to_vec(), kick.clone()),
            kick,
        )
    }

    #[test]
    fn matches_githubs_documented_signature() {
        // The example in GitHub's "Validating webhook deliveries".
        assert_eq!(
            sign(b"It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[tokio::test]
    async fn an_authentic_call_asks_for_a_sync_and_nothing_else_does() {
        let (hook, kick) = hook();
        let body = br#"{"ref":"refs/heads/main"}"#;
        let good = sign(b"It's a Secret to Everybody", body);
        let forged = sign(b"guess", body);
        for (sig, why) in [
            (None, "no X-Hub-Signature-256"),
            (Some("sha1=abc"), "not `sha256=<hex>`"),
            (Some("sha256=zz"), "not hex"),
            (Some(forged.as_str()), "does not match"),
        ] {
            match hook.receive(sig, Some("d-0"), body) {
                Verdict::Unauthorized(m) => assert!(m.contains(why), "{m}"),
                other => panic!("{sig:?}: {other:?}"),
            }
        }
        // A body changed under a good signature is refused too.
        assert!(matches!(
            hook.receive(Some(&good), Some("d-0"), b"{}"),
            Verdict::Unauthorized(_)
        ));
        let woken = tokio::time::timeout(std::time::Duration::from_millis(50), kick.notified());
        assert!(woken.await.is_err(), "no refused call asks for a sync");

        assert_eq!(
            hook.receive(Some(&good), Some("d-1"), body),
            Verdict::Accepted
        );
        tokio::time::timeout(std::time::Duration::from_secs(1), kick.notified())
            .await
            .expect("an accepted call asks for a sync");
        assert_eq!(
            hook.receive(Some(&good), Some("d-1"), body),
            Verdict::Replayed
        );
        assert_eq!(
            hook.receive(Some(&good), Some("d-2"), body),
            Verdict::Accepted
        );
    }
}
