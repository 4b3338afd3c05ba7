//! Emitting to a socket whose buffer a burst filled.

use socketioxide::extract::SocketRef;
use socketioxide::{SendError, SocketError};

/// Why an emit did not go out.
#[derive(Debug, PartialEq, Eq)]
pub enum EmitError {
    /// The client did not drain its buffer in time.
    TooSlow,
    /// The socket is gone.
    Closed,
}

/// Emits, waiting (briefly) for room in the socket's buffer when a burst
/// filled it; a client that stays full for `patience` is too slow.
pub async fn emit_patiently<T: serde::Serialize + ?Sized>(s: &SocketRef, event: &str, data: &T, patience: std::time::Duration) -> Result<(), EmitError> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match s.emit(event, data) {
            Ok(()) => return Ok(()),
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(EmitError::TooSlow);
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            Err(SendError::Socket(SocketError::Closed)) => return Err(EmitError::Closed),
            Err(SendError::Serialize(e)) => {
                tracing::error!(event, error = %e, "cannot serialize a socket event; skipped");
                return Ok(());
            }
        }
    }
}
