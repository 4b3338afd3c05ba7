//! Tokens and passwords.
//!
//! Tokens are JWTs. natter issues HS256 tokens signed with the configured
//! secret; it also accepts tokens from an external issuer signed with the
//! same secret or (with `jwt_public_key_file`) an RSA/EC key. Validation
//! checks the signature, `exp`, `iss` and `aud`; identity is `sub`, which must
//! be a subject-safe id. `alg: none` never validates.
//!
//! Passwords are argon2id PHC strings, hashed and verified on the blocking
//! pool so a burst of logins cannot stall the runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::AuthSettings;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    pub iss: String,
    pub aud: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token is not valid: {0}")]
    Invalid(String),
}

/// Shortest token secret accepted.
pub const MIN_SECRET_BYTES: usize = 32;

/// The secret's bytes, if there is one of at least [`MIN_SECRET_BYTES`].
fn checked_secret(secret: Option<&SecretString>) -> anyhow::Result<Vec<u8>> {
    let Some(secret) = secret else {
        anyhow::bail!(
            "no token secret: set NATTER_JWT_SECRET to the same random value of {MIN_SECRET_BYTES}+ bytes on every node \
             (e.g. `head -c 32 /dev/urandom | base64`)"
        );
    };
    let secret = secret.expose_secret().as_bytes().to_vec();
    if secret.len() < MIN_SECRET_BYTES {
        anyhow::bail!(
            "NATTER_JWT_SECRET is {} bytes; it must be at least {MIN_SECRET_BYTES} (a short secret can be guessed offline from any token)",
            secret.len()
        );
    }
    Ok(secret)
}

/// Checks the configured secret before anything is connected: a node
/// that would refuse it later must not have touched shared services.
/// Embedded nodes may have none (they keep one in their data directory).
pub fn check_settings(cfg: &AuthSettings, shared: bool) -> anyhow::Result<()> {
    if shared || cfg.jwt_secret.is_some() {
        checked_secret(cfg.jwt_secret.as_ref())?;
    }
    Ok(())
}

/// Who a valid token speaks for, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// The token's `exp`, in seconds since the Unix epoch.
    pub expires: u64,
}

#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: Vec<(Algorithm, DecodingKey)>,
    issuer: String,
    audience: String,
    ttl_secs: u64,
    /// Tokens verified already (the whole token is the key): a client
    /// sends the same one with every request, and checking its signature
    /// and claims again was 3-4% of a message's CPU.
    verified: Arc<Mutex<HashMap<String, Identity>>>,
}

/// Most tokens [`Auth::verify`] remembers; it forgets them all when full.
const VERIFIED_AT_MOST: usize = 4096;
/// Seconds past `exp` a token is still taken (clocks differ a little).
const LEEWAY_SECS: u64 = 5;

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Auth {
    /// Builds the token keys from the configured secret, else the one the
    /// run mode keeps (`stored`: the embedded node's, in its data
    /// directory). Without either, or with a secret shorter than
    /// [`MIN_SECRET_BYTES`], the node refuses to start: a node that invents
    /// its own secret issues tokens no other node accepts, and a short one
    /// can be guessed offline from any token.
    pub fn new(cfg: &AuthSettings, stored: Option<SecretString>) -> anyhow::Result<Auth> {
        let secret = checked_secret(cfg.jwt_secret.as_ref().or(stored.as_ref()))?;
        let mut decoding = vec![(Algorithm::HS256, DecodingKey::from_secret(&secret))];
        if let Some(path) = &cfg.jwt_public_key_file {
            let pem = std::fs::read(path).with_context(|| format!("reading JWT public key {}", path.display()))?;
            if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                decoding.push((Algorithm::RS256, key));
            } else {
                let key = DecodingKey::from_ec_pem(&pem)
                    .with_context(|| format!("{} is neither an RSA nor an EC public key", path.display()))?;
                decoding.push((Algorithm::ES256, key));
            }
        }
        Ok(Auth {
            encoding: EncodingKey::from_secret(&secret),
            decoding,
            issuer: cfg.jwt_issuer.clone(),
            audience: cfg.jwt_audience.clone(),
            ttl_secs: cfg.token_ttl.as_secs(),
            verified: Default::default(),
        })
    }

    pub fn issue(&self, user_id: &str) -> String {
        let now = now_secs();
        let claims = Claims {
            sub: user_id.to_owned(),
            iat: now,
            exp: now + self.ttl_secs,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).expect("HS256 signing cannot fail")
    }

    /// The caller's identity, if the token is valid now.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        let known = self.verified.lock().expect("verified tokens lock").get(token).cloned();
        if let Some(identity) = known {
            // Only its expiry can have changed since it was verified.
            if identity.expires.saturating_add(LEEWAY_SECS) < now_secs() {
                self.verified.lock().expect("verified tokens lock").remove(token);
                return Err(TokenError::Expired);
            }
            return Ok(identity);
        }
        let identity = self.verify_anew(token)?;
        let mut verified = self.verified.lock().expect("verified tokens lock");
        if verified.len() >= VERIFIED_AT_MOST {
            verified.clear();
        }
        verified.insert(token.to_owned(), identity.clone());
        Ok(identity)
    }

    /// [`Auth::verify`]: the signature, then the claims.
    fn verify_anew(&self, token: &str) -> Result<Identity, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let (alg, key) = self
            .decoding
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .ok_or_else(|| TokenError::Invalid(format!("algorithm {:?} is not accepted", header.alg)))?;
        let mut validation = Validation::new(*alg);
        validation.leeway = LEEWAY_SECS;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        #[derive(Deserialize)]
        struct Subject {
            sub: String,
            exp: u64,
        }
        let data = decode::<Subject>(token, key, &validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
            _ => TokenError::Invalid(e.to_string()),
        })?;
        natter_events::validate_id(&data.claims.sub)
            .map_err(|e| TokenError::Invalid(format!("`sub` is not a valid user id: {e}")))?;
        Ok(Identity { user: data.claims.sub, expires: data.claims.exp })
    }
}

/// argon2id uses ~19 MiB per hash: at most this many run at once (about
/// the core count), so a flood of logins cannot exhaust memory.
fn hashing_slots() -> &'static Arc<tokio::sync::Semaphore> {
    static SLOTS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()).max(2))))
}

/// Password hashes waiting for a slot beyond which more are refused: a
/// flood of logins gets 503s at once instead of queueing without bound.
const MAX_WAITING: usize = 64;

/// Places in the queue for a hashing slot (a place is given back when its
/// request gets a slot, or is dropped while waiting: a client that hangs
/// up cannot leak one).
fn waiting_places() -> &'static tokio::sync::Semaphore {
    static PLACES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_WAITING);
    &PLACES
}

/// Every password-hashing slot is taken and the queue is full.
#[derive(Debug, Error)]
#[error("password checks are saturated; retry shortly")]
pub struct Busy;

/// Why a password could not be hashed.
#[derive(Debug, Error)]
pub enum HashError {
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("{0}")]
    Failed(String),
}

/// A hashing slot, or [`Busy`] when [`MAX_WAITING`] already wait for one.
/// The slot is held by the hashing job itself (moved into it), so a request
/// dropped mid-hash does not free a slot its job still uses.
async fn hashing_slot() -> Result<tokio::sync::OwnedSemaphorePermit, Busy> {
    if let Ok(slot) = hashing_slots().clone().try_acquire_owned() {
        return Ok(slot);
    }
    let _place = waiting_places().try_acquire().map_err(|_| Busy)?;
    hashing_slots().clone().acquire_owned().await.map_err(|_| Busy)
}

/// Hashes a password with argon2id (on the blocking pool).
pub async fn hash_password(password: String) -> Result<String, HashError> {
    let slot = hashing_slot().await?;
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        Argon2::default().hash_password(password.as_bytes()).map(|h| h.to_string()).map_err(|e| HashError::Failed(format!("argon2: {e}")))
    })
    .await
    .map_err(|e| HashError::Failed(format!("password hashing task: {e}")))?
}

/// Checks a password against a stored PHC string (on the blocking pool).
pub async fn verify_password(password: String, phc: String) -> Result<bool, Busy> {
    let slot = hashing_slot().await?;
    Ok(tokio::task::spawn_blocking(move || {
        let _slot = slot;
        PasswordHash::new(&phc)
            .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let cfg = AuthSettings { jwt_secret: Some("s3cret-s3cret-s3cret-s3cret-s3cret".to_string().into()), ..AuthSettings::default() };
        Auth::new(&cfg, None).unwrap()
    }

    #[test]
    fn issued_tokens_verify_to_their_subject_and_expiry() {
        let a = auth();
        let id = a.verify(&a.issue("amy")).unwrap();
        assert_eq!(id.user, "amy");
        assert!(id.expires > now_secs() && id.expires <= now_secs() + a.ttl_secs);
    }

    #[test]
    fn a_token_verified_before_is_still_refused_once_expired_and_the_memory_is_bounded() {
        let a = auth();
        let token = a.issue("amy");
        assert_eq!(a.verify(&token).unwrap().user, "amy");
        // As if verified an hour ago with an expiry now past the leeway.
        let stale = Identity { user: "amy".into(), expires: now_secs() - LEEWAY_SECS - 1 };
        a.verified.lock().unwrap().insert(token.clone(), stale);
        assert!(matches!(a.verify(&token), Err(TokenError::Expired)));
        assert!(!a.verified.lock().unwrap().contains_key(&token), "forgotten once expired");
        // Remembered, a token with its signature altered is still refused.
        let fresh = a.issue("amy");
        a.verify(&fresh).unwrap();
        assert!(a.verified.lock().unwrap().contains_key(&fresh), "remembered");
        let (unsigned, signature) = fresh.rsplit_once('.').unwrap();
        let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
        assert!(a.verify(&format!("{unsigned}.{flipped}{}", &signature[1..])).is_err());
        // Full, the memory is cleared: it never holds more.
        for i in 1..VERIFIED_AT_MOST {
            a.verify(&a.issue(&format!("u{i}"))).unwrap();
        }
        assert_eq!(a.verified.lock().unwrap().len(), VERIFIED_AT_MOST);
        a.verify(&a.issue("one-more")).unwrap();
        assert_eq!(a.verified.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_node_without_a_secret_or_with_a_short_one_refuses_to_start() {
        let err = Auth::new(&AuthSettings::default(), None).err().expect("no secret refused");
        assert!(err.to_string().contains("NATTER_JWT_SECRET"), "{err}");
        let short = AuthSettings { jwt_secret: Some("x".repeat(MIN_SECRET_BYTES - 1).into()), ..AuthSettings::default() };
        let err = Auth::new(&short, None).err().expect("short secret refused");
        assert!(err.to_string().contains("at least 32"), "{err}");
        let exact = AuthSettings { jwt_secret: Some("x".repeat(MIN_SECRET_BYTES).into()), ..AuthSettings::default() };
        assert!(Auth::new(&exact, None).is_ok());
    }

    #[test]
    fn refuses_garbage_and_foreign_secrets() {
        let a = auth();
        assert!(a.verify("not.a.token").is_err());
        let other = Auth::new(&AuthSettings { jwt_secret: Some("other-other-other-other-other-other".to_string().into()), ..AuthSettings::default() }, None).unwrap();
        assert!(matches!(a.verify(&other.issue("amy")), Err(TokenError::Invalid(_))));
    }

    #[tokio::test]
    async fn passwords_verify_only_with_the_right_one() {
        let phc = hash_password("correct horse".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify_password("correct horse".into(), phc.clone()).await.unwrap());
        assert!(!verify_password("wrong".into(), phc.clone()).await.unwrap());
        assert!(!verify_password("x".into(), "garbage".into()).await.unwrap());
    }
}
