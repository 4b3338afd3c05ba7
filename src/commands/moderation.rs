//! Private rooms and roles: invite, remove (kick), and name admins.
//!
//! Roles live on each member's own subject (`<prefix>.ev.member.<room>.
//! <user>`), whose newest event says whether the user is a member or
//! invited, how far they read and their role ([`MemberState`]), so every
//! check is one read of the log. The room's creator is its owner (also in
//! rooms created before roles existed); the owner names admins; the owner
//! and admins invite users and remove members, an admin only plain
//! members. A removal is a `MemberLeft` with `by`: the fan-out addresses
//! each room event to the members as of that event, so the removed user
//! receives nothing of the room from then on. Removing an invited user
//! withdraws the invitation.

use natter_events::{Event, MemberInvited, MemberLeft, MemberState, Role, RoleChanged};

use super::{CommandError, Commands, Refusal};

/// What a moderator does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moderation {
    Invite,
    Kick,
    SetRole(Role),
}

/// The event `actor` (whose role is `actor_role`, `None`: not a member)
/// makes of `target`'s membership `m` in a room owned by `owner`; `None`
/// when it changes nothing. Pure.
pub fn decide(room: &str, owner: &str, actor: &str, actor_role: Option<Role>, target: &str, m: &MemberState, what: Moderation) -> Result<Option<Event>, Refusal> {
    let forbidden = |why: &str| Err(Refusal::Forbidden(why.to_owned()));
    let Some(actor_role) = actor_role else { return forbidden("you are not a member of this room") };
    if actor == target {
        return Err(Refusal::BadInput("you cannot do that to yourself (leave the room instead)".into()));
    }
    // The creator is the owner whatever their member subject says (rooms
    // created before roles, an owner who left and came back).
    let target_role = m.member.then(|| if target == owner { Role::Owner } else { m.role });
    match what {
        Moderation::Invite => {
            if actor_role < Role::Admin {
                return forbidden("only the room's owner and admins invite");
            }
            if m.member || m.invited {
                return Ok(None);
            }
            Ok(Some(Event::MemberInvited(MemberInvited { room_id: room.to_owned(), user_id: target.to_owned(), by: actor.to_owned() })))
        }
        Moderation::Kick => {
            if actor_role < Role::Admin {
                return forbidden("only the room's owner and admins remove members");
            }
            if target_role.is_some_and(|r| r >= actor_role) {
                return forbidden("an admin removes plain members only; nobody removes the owner");
            }
            if !m.member && !m.invited {
                return Ok(None);
            }
            let withdrawn = !m.member;
            Ok(Some(Event::MemberLeft(MemberLeft { room_id: room.to_owned(), user_id: target.to_owned(), by: Some(actor.to_owned()), withdrawn })))
        }
        Moderation::SetRole(role) => {
            if actor_role != Role::Owner {
                return forbidden("only the room's owner sets roles");
            }
            if role == Role::Owner {
                return Err(Refusal::BadInput("role must be admin or member (a room has one owner, its creator)".into()));
            }
            match target_role {
                None => Err(Refusal::NotFound("that user is not a member of this room".into())),
                Some(r) if r == role => Ok(None),
                Some(_) => Ok(Some(Event::RoleChanged(RoleChanged {
                    room_id: room.to_owned(),
                    user_id: target.to_owned(),
                    role,
                    by: actor.to_owned(),
                    read_up_to: m.read_up_to,
                }))),
            }
        }
    }
}

impl Commands {
    /// `user`'s role in `room` (`None`: not a member): the room's creator
    /// is its owner whatever their member subject says (rooms created
    /// before roles existed).
    pub async fn role_in(&self, room: &str, user: &str) -> Result<Option<Role>, CommandError> {
        let (facts, m) = tokio::join!(self.room_facts(room), self.membership(room, user));
        let (facts, m) = (facts?, m?);
        Ok(m.member.then(|| if facts.owner == user { Role::Owner } else { m.role }))
    }

    /// Whether `user` may see that private `room` exists: a member or an
    /// invitee (anyone may see a public room).
    pub async fn may_see(&self, room: &str, user: &str) -> Result<bool, CommandError> {
        let facts = self.room_facts(room).await?;
        // The owner may always come back to their room.
        if !facts.private || facts.owner == user {
            return Ok(true);
        }
        let m = self.membership(room, user).await?;
        Ok(m.member || m.invited)
    }

    /// Whether `user` is invited to `room` and not a member.
    pub async fn invited(&self, room: &str, user: &str) -> Result<bool, CommandError> {
        super::rooms::room_id(room)?;
        Ok(self.membership(room, user).await?.invited)
    }

    /// `actor` invites, removes or sets the role of `target` in `room`.
    #[tracing::instrument(skip_all, fields(actor = %actor, room = %room, target = %target, what = ?what))]
    pub async fn moderate(&self, actor: &str, room: &str, target: &str, what: Moderation) -> Result<(), CommandError> {
        self.require_user(target, "user").await?;
        let owner = self.room_facts(room).await?.owner;
        let actor_role = self.role_in(room, actor).await?;
        self.append_member(room, target, |m, _| decide(room, &owner, actor, actor_role, target, m, what)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(role: Role) -> MemberState {
        MemberState { member: true, role, ..MemberState::default() }
    }

    #[test]
    fn owners_and_admins_invite_and_remove_and_only_owners_name_admins() {
        let none = MemberState::default();
        let invited = MemberState { invited: true, ..none };
        let d = |actor_role, m: &MemberState, what| decide("r", "olga", "amy", actor_role, "bob", m, what);
        assert!(matches!(d(Some(Role::Admin), &none, Moderation::Invite), Ok(Some(Event::MemberInvited(_)))));
        assert!(matches!(d(Some(Role::Member), &none, Moderation::Invite), Err(Refusal::Forbidden(_))));
        assert!(matches!(d(None, &none, Moderation::Invite), Err(Refusal::Forbidden(_))));
        assert!(d(Some(Role::Owner), &invited, Moderation::Invite).unwrap().is_none(), "invited already");
        assert!(d(Some(Role::Owner), &member(Role::Member), Moderation::Invite).unwrap().is_none(), "a member already");
        // Removing: an admin removes members, not admins; the owner both.
        assert!(matches!(d(Some(Role::Admin), &member(Role::Member), Moderation::Kick), Ok(Some(Event::MemberLeft(MemberLeft { by: Some(_), .. })))));
        assert!(matches!(d(Some(Role::Admin), &member(Role::Admin), Moderation::Kick), Err(Refusal::Forbidden(_))));
        assert!(d(Some(Role::Owner), &member(Role::Admin), Moderation::Kick).unwrap().is_some());
        assert!(d(Some(Role::Owner), &invited, Moderation::Kick).unwrap().is_some(), "withdraws the invitation");
        assert!(d(Some(Role::Owner), &none, Moderation::Kick).unwrap().is_none());
        // Roles: the owner only, admin or member only, members only.
        assert!(matches!(d(Some(Role::Owner), &member(Role::Member), Moderation::SetRole(Role::Admin)), Ok(Some(Event::RoleChanged(_)))));
        assert!(matches!(d(Some(Role::Admin), &member(Role::Member), Moderation::SetRole(Role::Admin)), Err(Refusal::Forbidden(_))));
        assert!(matches!(d(Some(Role::Owner), &member(Role::Member), Moderation::SetRole(Role::Owner)), Err(Refusal::BadInput(_))));
        assert!(matches!(d(Some(Role::Owner), &none, Moderation::SetRole(Role::Admin)), Err(Refusal::NotFound(_))));
        assert!(d(Some(Role::Owner), &member(Role::Admin), Moderation::SetRole(Role::Admin)).unwrap().is_none());
        assert!(matches!(decide("r", "olga", "amy", Some(Role::Owner), "amy", &none, Moderation::Kick), Err(Refusal::BadInput(_))));
        // The creator is the owner even where their subject says member.
        assert!(matches!(decide("r", "bob", "amy", Some(Role::Admin), "bob", &member(Role::Member), Moderation::Kick), Err(Refusal::Forbidden(_))));
        // Withdrawing an invitation is marked as such.
        assert!(matches!(d(Some(Role::Owner), &invited, Moderation::Kick), Ok(Some(Event::MemberLeft(MemberLeft { withdrawn: true, .. })))));
    }

    #[test]
    fn the_member_subject_keeps_role_and_invitation() {
        let changed = Event::RoleChanged(RoleChanged { room_id: "r".into(), user_id: "u".into(), role: Role::Admin, by: "o".into(), read_up_to: 4 });
        assert_eq!(MemberState::after(Some(&changed)), MemberState { member: true, read_up_to: 4, role: Role::Admin, ..MemberState::default() });
        let invited = Event::MemberInvited(MemberInvited { room_id: "r".into(), user_id: "u".into(), by: "o".into() });
        assert!(MemberState::after(Some(&invited)).invited && !MemberState::after(Some(&invited)).member);
        let kicked = |withdrawn| Event::MemberLeft(MemberLeft { room_id: "r".into(), user_id: "u".into(), by: Some("o".into()), withdrawn });
        assert!(MemberState::after(Some(&kicked(false))).removed, "a removal sticks");
        assert!(!MemberState::after(Some(&kicked(true))).removed, "a withdrawn invitation is no removal");
    }
}
