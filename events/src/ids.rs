//! Ids that become part of NATS subjects (and MongoDB field paths) must be
//! subject-safe tokens: no `.`, `*`, `>`, whitespace, `$` or control
//! characters. natter accepts `[A-Za-z0-9_-]{1,64}`, which covers UUIDs,
//! ObjectId hex strings and most external issuers' subject claims.

use thiserror::Error;

/// Longest id accepted anywhere (user ids, room ids, client message ids).
pub const MAX_ID_LEN: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdError {
    #[error("id is empty")]
    Empty,
    #[error("id is longer than {MAX_ID_LEN} characters")]
    TooLong,
    #[error("id may contain only letters, digits, '-' and '_'")]
    BadChar,
}

/// Checks that `id` is a subject-safe token.
pub fn validate_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(IdError::BadChar);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_uuids_and_object_ids() {
        assert_eq!(validate_id("0194f0c2-7b5e-7c3a-9d1e-2f3a4b5c6d7e"), Ok(()));
        assert_eq!(validate_id("507f1f77bcf86cd799439011"), Ok(()));
        assert_eq!(validate_id("user_1"), Ok(()));
    }

    #[test]
    fn refuses_subject_metacharacters() {
        for bad in ["a.b", "a*", ">", "a b", "a\tb", "a$b", "é", "a\n"] {
            assert_eq!(validate_id(bad), Err(IdError::BadChar), "{bad:?}");
        }
        assert_eq!(validate_id(""), Err(IdError::Empty));
        assert_eq!(validate_id(&"a".repeat(65)), Err(IdError::TooLong));
    }
}
