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

#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: Vec<(Algorithm, DecodingKey)>,
    issuer: String,
    audience: String,
    ttl_secs: u64,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Auth {
    /// Builds the token keys from the configured secret, else the one the
    /// run mode keeps (`stored`). Without either, a random one is
    /// generated: fine for one node, but tokens then die with the process and
    /// other nodes refuse them (start-up logs a warning).
    pub fn new(cfg: &AuthSettings, stored: Option<SecretString>) -> anyhow::Result<Auth> {
        let secret: Vec<u8> = match cfg.jwt_secret.as_ref().or(stored.as_ref()) {
            Some(s) => s.expose_secret().as_bytes().to_vec(),
            None => {
                tracing::warn!(
                    "NATTER_JWT_SECRET is not set: using a random secret. Tokens will not survive a restart \
                     and other nodes will refuse them; set the same secret on every node"
                );
                let mut bytes = [0u8; 32];
                for chunk in bytes.chunks_mut(16) {
                    chunk.copy_from_slice(&uuid::Uuid::new_v4().into_bytes());
                }
                bytes.to_vec()
            }
        };
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

    /// Returns the caller's user id.
    pub fn verify(&self, token: &str) -> Result<String, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let (alg, key) = self
            .decoding
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .ok_or_else(|| TokenError::Invalid(format!("algorithm {:?} is not accepted", header.alg)))?;
        let mut validation = Validation::new(*alg);
        validation.leeway = 5;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        #[derive(Deserialize)]
        struct Subject {
            sub: String,
        }
        let data = decode::<Subject>(token, key, &validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
            _ => TokenError::Invalid(e.to_string()),
        })?;
        natter_events::validate_id(&data.claims.sub)
            .map_err(|e| TokenError::Invalid(format!("`sub` is not a valid user id: {e}")))?;
        Ok(data.claims.sub)
    }
}

/// argon2id uses ~19 MiB per hash: at most this many run at once (about
/// the core count), so a flood of logins queues instead of exhausting memory.
fn hashing_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()).max(2)))
}

/// Hashes a password with argon2id (on the blocking pool).
pub async fn hash_password(password: String) -> anyhow::Result<String> {
    let _slot = hashing_slots().acquire().await.context("password hashing slots closed")?;
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| anyhow::anyhow!("argon2: {e}"))
    })
    .await
    .context("password hashing task")?
}

/// Checks a password against a stored PHC string (on the blocking pool).
pub async fn verify_password(password: String, phc: String) -> bool {
    let Ok(_slot) = hashing_slots().acquire().await else { return false };
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&phc)
            .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let cfg = AuthSettings { jwt_secret: Some("s3cret".to_string().into()), ..AuthSettings::default() };
        Auth::new(&cfg, None).unwrap()
    }

    #[test]
    fn issued_tokens_verify_to_their_subject() {
        let a = auth();
        assert_eq!(a.verify(&a.issue("amy")), Ok("amy".into()));
    }

    #[test]
    fn refuses_garbage_and_foreign_secrets() {
        let a = auth();
        assert!(a.verify("not.a.token").is_err());
        let other = Auth::new(&AuthSettings { jwt_secret: Some("other".to_string().into()), ..AuthSettings::default() }, None).unwrap();
        assert!(matches!(a.verify(&other.issue("amy")), Err(TokenError::Invalid(_))));
    }

    #[tokio::test]
    async fn passwords_verify_only_with_the_right_one() {
        let phc = hash_password("correct horse".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify_password("correct horse".into(), phc.clone()).await);
        assert!(!verify_password("wrong".into(), phc.clone()).await);
        assert!(!verify_password("x".into(), "garbage".into()).await);
    }
}
