//! Account events.

use serde::{Deserialize, Serialize};

/// A user registered with natter's built-in accounts. Stored on the account
/// claim subject of their e-mail address (see [`crate::subjects::account`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserRegistered {
    pub user_id: String,
    pub name: String,
    /// Normalised (trimmed, lower-case) address.
    pub email: String,
    /// argon2id PHC string; never leaves the node.
    pub password_hash: String,
}
