//! Key-registration challenges: the single-use nonces that make registering a signing key prove
//! possession of its secret half.
//!
//! Without such a proof a tenant could register any public key it has seen — another tenant's,
//! say — and claim that key's signatures as its own. `POST /api/v1/signing-keys/challenge`
//! issues a random nonce bound to the calling tenant; `POST /api/v1/signing-keys` must bring it
//! back with a signature by the key being registered over
//! [`weft_store::signing::key_registration_message`] (the tenant, the nonce and the public key).
//! A nonce is spent by the first registration that names it, whatever its outcome, and expires
//! after [`CHALLENGE_TTL`], so a captured proof cannot be replayed.
//!
//! With the embedded store challenges live in memory only: they are short-lived, and a restart
//! merely makes a client ask again. With a shared store they live in PostgreSQL
//! (`weft_challenges`, with the same bounds), so a client behind a load balancer may ask one
//! replica for a challenge and register its key through another. Each tenant holds at most [`MAX_PENDING_PER_TENANT`] (asking for more drops its
//! oldest), and expired ones are dropped whenever one is issued, so the table stays bounded by
//! the number of tenants whatever a tenant sends. A nonce is looked up only among the caller's
//! own challenges: another tenant's is "unknown", exactly like one never issued.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_core::{Error, Result};
use weft_store::Store;
use weft_store::postgres::ChallengeTaken;
use weft_store::signing::challenge_nonce;

/// How long a challenge may be answered.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(300);
/// Challenges one tenant may hold unanswered at once.
pub const MAX_PENDING_PER_TENANT: usize = 8;

/// The outstanding challenges of every tenant.
pub struct Challenges {
    pending: Mutex<HashMap<String, VecDeque<Pending>>>,
    ttl: Duration,
    per_tenant: usize,
    /// A shared store, whose database holds the challenges instead of `pending`.
    shared: Option<Arc<Store>>,
}

struct Pending {
    nonce: String,
    expires: Instant,
}

/// A challenge just issued.
#[derive(Debug)]
pub struct Issued {
    /// The nonce to sign (64 hex characters).
    pub nonce: String,
    /// How long it may be answered.
    pub ttl: Duration,
}

impl Default for Challenges {
    fn default() -> Self {
        Challenges::new(CHALLENGE_TTL, MAX_PENDING_PER_TENANT)
    }
}

impl Challenges {
    /// A table whose challenges last `ttl`, at most `per_tenant` (at least 1) per tenant.
    pub fn new(ttl: Duration, per_tenant: usize) -> Self {
        Challenges {
            pending: Mutex::default(),
            ttl,
            per_tenant: per_tenant.max(1),
            shared: None,
        }
    }

    /// Keeps the challenges in `store`'s database when it is a shared store.
    pub fn in_store(mut self, store: &Arc<Store>) -> Self {
        if store.shared().is_some() {
            self.shared = Some(Arc::clone(store));
        }
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Pending>>> {
        // Every operation leaves the table consistent, so a poisoned lock is still usable.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Issues a fresh challenge to `tenant`.
    pub fn issue(&self, tenant: &str) -> Result<Issued> {
        let nonce = challenge_nonce()?;
        if let Some(shared) = self.shared.as_ref().and_then(|store| store.shared()) {
            shared.issue_challenge(tenant, &nonce, self.ttl.as_secs(), self.per_tenant)?;
            return Ok(Issued {
                nonce,
                ttl: self.ttl,
            });
        }
        let now = Instant::now();
        let mut pending = self.lock();
        pending.retain(|_, list| {
            list.retain(|challenge| challenge.expires > now);
            !list.is_empty()
        });
        let list = pending.entry(tenant.to_owned()).or_default();
        while list.len() >= self.per_tenant {
            list.pop_front();
        }
        list.push_back(Pending {
            nonce: nonce.clone(),
            expires: now + self.ttl,
        });
        Ok(Issued {
            nonce,
            ttl: self.ttl,
        })
    }

    /// Spends `tenant`'s challenge `nonce`: Ok once, if it was issued to this tenant and has not
    /// expired; every later call, and any call for another tenant, is refused (400).
    pub fn take(&self, tenant: &str, nonce: &str) -> Result<()> {
        let taken = match self.shared.as_ref().and_then(|store| store.shared()) {
            Some(shared) => shared.take_challenge(tenant, nonce)?,
            None => self.take_local(tenant, nonce),
        };
        let ttl = self.ttl.as_secs();
        match taken {
            ChallengeTaken::Unknown => Err(Error::invalid(format!(
                "unknown or already used challenge: a challenge is single-use, valid for {ttl} s \
                 and only for the tenant it was issued to; request a new one with \
                 POST /api/v1/signing-keys/challenge"
            ))),
            ChallengeTaken::Expired => Err(Error::invalid(format!(
                "the challenge expired (challenges are valid for {ttl} s); request a new one \
                 with POST /api/v1/signing-keys/challenge"
            ))),
            ChallengeTaken::Valid => Ok(()),
        }
    }

    fn take_local(&self, tenant: &str, nonce: &str) -> ChallengeTaken {
        let now = Instant::now();
        let mut pending = self.lock();
        let mut taken = None;
        if let Some(list) = pending.get_mut(tenant) {
            taken = list
                .iter()
                .position(|challenge| challenge.nonce == nonce)
                .and_then(|position| list.remove(position));
            if list.is_empty() {
                pending.remove(tenant);
            }
        }
        match taken {
            None => ChallengeTaken::Unknown,
            Some(challenge) if challenge.expires <= now => ChallengeTaken::Expired,
            Some(_) => ChallengeTaken::Valid,
        }
    }

    /// Drops a deleted tenant's challenges.
    pub fn forget_tenant(&self, tenant: &str) {
        self.lock().remove(tenant);
        if let Some(shared) = self.shared.as_ref().and_then(|store| store.shared())
            && let Err(error) = shared.forget_challenges(tenant)
        {
            // They expire on their own within the TTL.
            tracing::warn!(%error, "cannot drop a deleted tenant's challenges yet");
        }
    }

    /// Challenges held, all tenants together (for tests).
    pub fn len(&self) -> usize {
        self.lock().values().map(VecDeque::len).sum()
    }

    /// Whether no challenge is outstanding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use weft_core::ErrorKind;

    #[test]
    fn a_challenge_is_single_use_and_bound_to_its_tenant() {
        let challenges = Challenges::default();
        let issued = challenges.issue("acme").unwrap();
        assert_eq!(issued.nonce.len(), 64);
        assert_eq!(issued.ttl, CHALLENGE_TTL);
        // Another tenant cannot spend it, and trying does not spend it either.
        let err = challenges.take("bolts", &issued.nonce).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.message().contains("unknown or already used"), "{err}");
        assert!(!err.message().contains("acme"), "{err}");
        challenges.take("acme", &issued.nonce).unwrap();
        let err = challenges.take("acme", &issued.nonce).unwrap_err();
        assert!(err.message().contains("unknown or already used"), "{err}");
        assert!(challenges.take("acme", "").is_err());
        assert!(challenges.is_empty());
    }

    #[test]
    fn expired_challenges_are_refused_and_dropped() {
        let challenges = Challenges::new(Duration::ZERO, 4);
        let issued = challenges.issue("acme").unwrap();
        let err = challenges.take("acme", &issued.nonce).unwrap_err();
        assert!(err.message().contains("expired"), "{err}");
        // Issuing drops every expired challenge, of every tenant.
        for _ in 0..3 {
            challenges.issue("bolts").unwrap();
        }
        challenges.issue("acme").unwrap();
        assert_eq!(challenges.len(), 1);
    }

    #[test]
    fn each_tenant_holds_a_bounded_number() {
        let challenges = Challenges::new(CHALLENGE_TTL, 3);
        let first = challenges.issue("acme").unwrap();
        for _ in 0..10 {
            challenges.issue("acme").unwrap();
        }
        let other = challenges.issue("bolts").unwrap();
        assert_eq!(challenges.len(), 4);
        // The oldest went first; other tenants keep theirs.
        assert!(challenges.take("acme", &first.nonce).is_err());
        challenges.take("bolts", &other.nonce).unwrap();
        challenges.forget_tenant("acme");
        assert!(challenges.is_empty());
    }
}
