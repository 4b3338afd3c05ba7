//! Built-in accounts: register and log in.
//!
//! Registration appends `UserRegistered` on the account subject of the
//! normalised e-mail address with "expected last subject sequence = 0", so
//! two registrations of one address can never both land, on any number of
//! nodes, without a lock or a unique index being the source of truth.

use natter_events::{Event, UserRegistered, subjects};
use natter_projections::UserView;
use sha2::{Digest, Sha256};

use super::{CommandError, Commands, Failure, Refusal};
use crate::auth;
use crate::log::Logged;

#[derive(Debug, Clone)]
pub struct Register {
    pub name: String,
    pub email: String,
    pub password: String,
}

pub const MIN_PASSWORD: usize = 8;
pub const MAX_PASSWORD: usize = 1024;
pub const MAX_NAME: usize = 100;
pub const MAX_EMAIL: usize = 254;

/// Trimmed, lower-case.
pub fn normalise_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Subject-safe key of an address: hex SHA-256 of the normalised form.
pub fn email_key(email: &str) -> String {
    hex::encode(Sha256::digest(normalise_email(email).as_bytes()))
}

/// Checks a registration. Pure.
pub fn validate(cmd: &Register) -> Result<(), Refusal> {
    let name = cmd.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(Refusal::BadInput(format!("name must be 1 to {MAX_NAME} characters")));
    }
    let email = normalise_email(&cmd.email);
    let valid_email = email.len() <= MAX_EMAIL
        && !email.chars().any(char::is_whitespace)
        && matches!(email.split_once('@'), Some((local, domain)) if !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.'));
    if !valid_email {
        return Err(Refusal::BadInput("email is not a valid address".into()));
    }
    let len = cmd.password.chars().count();
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&len) {
        return Err(Refusal::BadInput(format!("password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")));
    }
    Ok(())
}

impl Commands {
    /// Registers an account, unless the address already has one (`None`).
    /// Both cases cost one password hash, so that neither the answer nor
    /// its timing tells a caller whether someone else uses an address.
    #[tracing::instrument(skip_all)]
    pub async fn register(&self, cmd: Register) -> Result<Option<UserView>, CommandError> {
        validate(&cmd)?;
        let email = normalise_email(&cmd.email);
        let subject = subjects::account(&self.prefix, &email_key(&email));
        let taken = self.log.last(&subject).await?.is_some();
        let password_hash = auth::hash_password(cmd.password).await.map_err(Failure::from)?;
        if taken {
            return Ok(None);
        }
        let user_id = uuid::Uuid::now_v7().to_string();
        let event = UserRegistered { user_id: user_id.clone(), name: cmd.name.trim().to_owned(), email, password_hash };
        let env = self
            .append(&subject, &format!("register:{user_id}"), |last: Option<Logged>| {
                std::future::ready(Ok(last.is_none().then(|| Event::UserRegistered(event.clone()))))
            })
            .await?;
        Ok(env.map(|env| UserView::from_event(&env, &event)))
    }

    /// Checks an e-mail address and password; the same answer for an unknown
    /// address and a wrong password.
    #[tracing::instrument(skip_all)]
    pub async fn login(&self, email: &str, password: String) -> Result<UserView, CommandError> {
        let refused = || Refusal::Unauthenticated("invalid email or password".into());
        match self.views.user_by_email(&normalise_email(email)).await? {
            Some(user) => {
                if auth::verify_password(password, user.password_hash.clone()).await.map_err(Failure::Busy)? {
                    Ok(user)
                } else {
                    Err(refused().into())
                }
            }
            None => {
                // Spend the same argon2 time for unknown addresses, so response
                // times do not tell which addresses have accounts.
                if let Err(auth::HashError::Busy(busy)) = auth::hash_password(password).await {
                    return Err(Failure::Busy(busy).into());
                }
                Err(refused().into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, email: &str, password: &str) -> Register {
        Register { name: name.into(), email: email.into(), password: password.into() }
    }

    #[test]
    fn the_same_address_has_one_key_however_it_is_typed() {
        assert_eq!(email_key(" Amy@Example.COM "), email_key("amy@example.com"));
        assert_eq!(email_key("a@b.co").len(), 64);
    }

    #[test]
    fn refuses_bad_registrations() {
        assert!(validate(&reg("Amy", "amy@example.com", "password1")).is_ok());
        for bad in [
            reg("", "amy@example.com", "password1"),
            reg("Amy", "not-an-email", "password1"),
            reg("Amy", "a b@example.com", "password1"),
            reg("Amy", "amy@example", "password1"),
            reg("Amy", "amy@example.com", "short"),
            reg(&"x".repeat(101), "amy@example.com", "password1"),
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }
}
