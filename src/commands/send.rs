//! Send a direct message (text, attachment URL, or both).

use natter_events::{DmState, Envelope, Event, MessageSent, subjects};
use natter_projections::MessageView;

use super::append::command_id;
use super::{CommandError, Commands, Refusal};
use crate::config::Limits;

#[derive(Debug, Clone)]
pub struct SendMessage {
    pub sender: String,
    pub receiver: String,
    pub message: Option<String>,
    pub attachment: Option<String>,
    pub client_msg_id: Option<String>,
    /// The `_id` of an earlier message of the same conversation this one answers.
    pub reply_to: Option<String>,
}

/// Checks a send's content against the limits. Pure.
pub fn validate(cmd: &SendMessage, limits: &Limits) -> Result<(), Refusal> {
    natter_events::validate_id(&cmd.receiver).map_err(|e| Refusal::BadInput(format!("receiver id is not valid: {e}")))?;
    if cmd.sender == cmd.receiver {
        return Err(Refusal::BadInput("you cannot send a message to yourself".into()));
    }
    validate_content(cmd.message.as_deref(), cmd.attachment.as_deref(), cmd.client_msg_id.as_deref(), limits)
}

/// Checks a message's text, attachment URL and idempotency key (direct and
/// room messages alike). Pure.
pub fn validate_content(text: Option<&str>, attachment: Option<&str>, client_msg_id: Option<&str>, limits: &Limits) -> Result<(), Refusal> {
    if let Some(id) = client_msg_id {
        natter_events::validate_id(id).map_err(|e| Refusal::BadInput(format!("clientMsgId is not valid: {e}")))?;
    }
    if text.is_none() && attachment.is_none() {
        return Err(Refusal::BadInput("message is empty".into()));
    }
    if let Some(text) = text {
        if text.trim().is_empty() {
            return Err(Refusal::BadInput("message is empty".into()));
        }
        let chars = text.chars().count();
        if chars > limits.max_message_chars {
            return Err(Refusal::BadInput(format!(
                "message is {chars} characters long; the limit is {}",
                limits.max_message_chars
            )));
        }
    }
    if let Some(url) = attachment {
        validate_url(url, limits.max_attachment_chars)?;
    }
    Ok(())
}

/// An attachment is an http(s) URL with a host and no whitespace.
fn validate_url(url: &str, max: usize) -> Result<(), Refusal> {
    if url.chars().count() > max {
        return Err(Refusal::BadInput(format!("attachment URL is longer than {max} characters")));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| Refusal::BadInput("attachment must be an http:// or https:// URL".into()))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Refusal::BadInput("attachment must be an http:// or https:// URL with a host".into()));
    }
    Ok(())
}

/// The refusal of a `replyTo` that names no message of this conversation
/// (unknown, another conversation's, or not a valid id alike: nothing is
/// learnt about other conversations).
pub fn not_here() -> Refusal {
    Refusal::BadInput("replyTo must be the _id of an earlier message of this conversation".into())
}

/// The refusal of a `replyTo` naming a message deleted for everyone.
pub fn answered_deleted() -> Refusal {
    Refusal::Conflict("the message replyTo names was deleted".into())
}

/// The event a send appends to a conversation in `state`. Pure.
pub fn decide(cmd: &SendMessage, state: &DmState, message_id: &str, reply_to: Option<natter_events::ReplyRef>) -> MessageSent {
    let (state, seq, sender_count) = state.after_send(&cmd.sender);
    MessageSent {
        message_id: message_id.to_owned(),
        client_msg_id: cmd.client_msg_id.clone(),
        sender_id: cmd.sender.clone(),
        receiver_id: cmd.receiver.clone(),
        message: cmd.message.clone(),
        attachments: cmd.attachment.iter().cloned().collect(),
        seq,
        sender_count,
        state,
        reply_to,
    }
}

/// Whether a stored message is what this command asks for (a retry), as
/// opposed to a reuse of its `clientMsgId` for something else.
fn same_request(cmd: &SendMessage, m: &MessageView) -> bool {
    let parties = m.sender_id == cmd.sender && m.receiver_id == cmd.receiver;
    // Edited or deleted since: the retry gets the message as it now reads.
    if m.deleted || m.edited_at.is_some() {
        return parties;
    }
    parties
        && m.message == cmd.message
        && m.attachment == cmd.attachment
        && m.reply_to.as_ref().map(|r| &r.message_id) == cmd.reply_to.as_ref()
}

/// The message a `MessageSent` event records.
fn message_of(env: &Envelope) -> Option<MessageView> {
    match &env.event {
        Event::MessageSent(sent) => Some(MessageView::from_event(env, sent)),
        _ => None,
    }
}

/// A send's outcome: the message, and whether its receiver has seen it.
#[derive(Debug, Clone)]
pub struct Sent {
    pub message: MessageView,
    pub seen: bool,
}

impl Commands {
    /// Sends a message. A retry with the same `clientMsgId` returns the
    /// original message, however long after.
    #[tracing::instrument(skip_all, fields(sender = %cmd.sender, receiver = %cmd.receiver))]
    pub async fn send(&self, cmd: SendMessage) -> Result<Sent, CommandError> {
        validate(&cmd, &self.limits)?;
        let command_id = command_id(&cmd.sender, cmd.client_msg_id.as_deref());
        let message_id = uuid::Uuid::now_v7().to_string();
        let subject = subjects::dm(&self.prefix, &cmd.sender, &cmd.receiver);
        let append = async {
            self.require_user(&cmd.receiver, "receiver").await?;
            let reply_to = match &cmd.reply_to {
                None => None,
                Some(id) => {
                    natter_events::validate_id(id).map_err(|_| not_here())?;
                    let answered = self.views.message(id).await?.filter(|m| m.conversation == subjects::dm_conversation(&cmd.sender, &cmd.receiver));
                    let m = answered.ok_or_else(not_here)?;
                    if m.deleted {
                        return Err(answered_deleted().into());
                    }
                    Some(natter_events::ReplyRef::to(m.id.clone()))
                }
            };
            let env = self
                .append_dm(&cmd.sender, &cmd.receiver, &command_id, |state| {
                    super::block::check_send(state, &cmd.sender)?;
                    Ok(Some(Event::MessageSent(decide(&cmd, state, &message_id, reply_to.clone()))))
                })
                .await?;
            Ok(env.as_ref().and_then(message_of))
        };
        let key = cmd.client_msg_id.is_some().then_some((subject.as_str(), command_id.as_str()));
        let message = self.once(key, self.views.message_by_command(&command_id), message_of, append, |m| same_request(&cmd, m)).await?;
        // A message this call appended is newer than any watermark (a
        // watermark only moves up to a message a reader already had): no
        // read. A retry's original may have been seen since.
        let seen = message.id != message_id && self.is_seen(&message).await?;
        Ok(Sent { message, seen })
    }

    /// Whether `m`'s receiver has seen it (their watermark is at or past it).
    async fn is_seen(&self, m: &MessageView) -> Result<bool, CommandError> {
        let marks = self.views.watermarks(&m.conversation).await?;
        Ok(marks.get(&m.receiver_id).is_some_and(|w| *w >= m.seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_message_chars: 10, max_attachment_chars: 40, ..Limits::default() }
    }

    fn cmd(text: Option<&str>, attachment: Option<&str>) -> SendMessage {
        SendMessage {
            sender: "amy".into(),
            receiver: "bob".into(),
            message: text.map(Into::into),
            attachment: attachment.map(Into::into),
            client_msg_id: None,
            reply_to: None,
        }
    }

    #[test]
    fn given_an_empty_conversation_when_amy_sends_then_it_is_message_one() {
        let e = decide(&cmd(Some("hi"), None), &DmState::new("amy", "bob"), "m1", None);
        assert_eq!((e.seq, e.sender_count, e.state.last_seq), (1, 1, 1));
        assert_eq!(e.state.unseen("bob", "amy"), 1);
    }

    #[test]
    fn refuses_bad_content() {
        let l = limits();
        assert!(validate(&cmd(Some("hi"), None), &l).is_ok());
        assert!(validate(&cmd(None, Some("https://x.io/a.png")), &l).is_ok());
        for bad in [
            cmd(None, None),
            cmd(Some("   "), None),
            cmd(Some("01234567890"), None),
            cmd(None, Some("ftp://x.io/a")),
            cmd(None, Some("https:///nohost")),
            cmd(None, Some("https://x.io/a b")),
            cmd(None, Some(&format!("https://x.io/{}", "a".repeat(40)))),
        ] {
            assert!(matches!(validate(&bad, &l), Err(Refusal::BadInput(_))), "{bad:?}");
        }
        let mut me = cmd(Some("hi"), None);
        me.receiver = "amy".into();
        assert!(validate(&me, &l).is_err());
        let mut bad_id = cmd(Some("hi"), None);
        bad_id.receiver = "bob.*".into();
        assert!(validate(&bad_id, &l).is_err());
    }

    #[test]
    fn counts_characters_not_bytes() {
        assert!(validate(&cmd(Some("éééééééééé"), None), &limits()).is_ok());
    }
}
