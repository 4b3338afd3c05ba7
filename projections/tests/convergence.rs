//! Property: whatever the delivery pattern (duplicates, reordering across
//! nodes, redelivery of a range after lost acks or a restart), applied one
//! event at a time or in batches of any size, the views end up equal to a
//! clean in-order replay, and the unseen counts equal their definition.

use futures::executor::block_on;
use natter_projections::history::{History, snapshot};
use natter_projections::local::{LocalCounts, LocalViews};
use natter_projections::{CountStore, ViewStore};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Send(usize, usize),
    Mark(usize, usize, usize),
    Open(usize, usize),
    CreateRoom(usize),
    Join(usize, usize),
    Leave(usize, usize),
    RoomSend(usize, usize),
    RoomRead(usize, usize),
    Block(usize, usize, bool),
    Edit(usize, usize, usize),
    Delete(usize, usize, usize),
    RoomEdit(usize, usize, usize),
    RoomDelete(usize, usize, usize),
    React(usize, usize, usize, usize, bool),
    RoomReact(usize, usize, usize, usize, bool),
}

const EMOJI: [&str; 3] = ["👍", "🎉", "❤️"];

fn op(users: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..users, 0..users).prop_map(|(a, b)| Op::Send(a, b)),
        2 => (0..users, 0..users, 0..20usize).prop_map(|(a, b, n)| Op::Mark(a, b, n)),
        1 => (0..users, 0..users).prop_map(|(a, b)| Op::Open(a, b)),
        1 => (0..users).prop_map(Op::CreateRoom),
        2 => (0..users, 0..4usize).prop_map(|(a, n)| Op::Join(a, n)),
        1 => (0..users, 0..4usize).prop_map(|(a, n)| Op::Leave(a, n)),
        4 => (0..users, 0..4usize).prop_map(|(a, n)| Op::RoomSend(a, n)),
        2 => (0..users, 0..4usize).prop_map(|(a, n)| Op::RoomRead(a, n)),
        1 => (0..users, 0..users, any::<bool>()).prop_map(|(a, b, on)| Op::Block(a, b, on)),
        2 => (0..users, 0..users, 0..20usize).prop_map(|(a, b, n)| Op::Edit(a, b, n)),
        2 => (0..users, 0..users, 0..20usize).prop_map(|(a, b, n)| Op::Delete(a, b, n)),
        1 => (0..users, 0..4usize, 0..20usize).prop_map(|(a, r, n)| Op::RoomEdit(a, r, n)),
        2 => (0..users, 0..4usize, 0..20usize).prop_map(|(a, r, n)| Op::RoomDelete(a, r, n)),
        2 => (0..users, 0..users, 0..20usize, 0..3usize, any::<bool>()).prop_map(|(a, b, n, e, on)| Op::React(a, b, n, e, on)),
        2 => (0..users, 0..4usize, 0..20usize, 0..3usize, any::<bool>()).prop_map(|(a, r, n, e, on)| Op::RoomReact(a, r, n, e, on)),
    ]
}

fn build(users: usize, ops: &[Op]) -> History {
    let mut h = History::new("p", users);
    for op in ops {
        match *op {
            Op::Send(a, b) if a != b => h.send(a, b),
            Op::Mark(a, b, n) if a != b => h.mark(a, b, n),
            Op::Open(a, b) if a != b => h.open(a, b),
            Op::CreateRoom(a) => h.create_room(a),
            Op::Join(a, n) => h.join(a, n),
            Op::Leave(a, n) => h.leave(a, n),
            Op::RoomSend(a, n) => h.room_send(a, n),
            Op::RoomRead(a, n) => h.room_read(a, n),
            Op::Block(a, b, on) if a != b => h.block(a, b, on),
            Op::Edit(a, b, n) if a != b => h.edit(a, b, n),
            Op::Delete(a, b, n) if a != b => h.delete(a, b, n),
            Op::RoomEdit(a, r, n) => h.room_edit(a, r, n),
            Op::RoomDelete(a, r, n) => h.room_delete(a, r, n),
            Op::React(a, b, n, e, on) if a != b => h.react(a, b, n, EMOJI[e], on),
            Op::RoomReact(a, r, n, e, on) => h.room_react(a, r, n, EMOJI[e], on),
            _ => {}
        }
    }
    h
}

/// A delivery schedule: every event at least once, some several times, in
/// an order mixed by swaps, plus re-deliveries of whole ranges.
fn schedule(len: usize) -> impl Strategy<Value = Vec<usize>> {
    let swaps = prop::collection::vec((0..len.max(1), 0..len.max(1)), 0..(len * 2 + 1));
    let dups = prop::collection::vec(0..len.max(1), 0..(len / 2 + 1));
    let replays = prop::collection::vec((0..len.max(1), 0..len.max(1)), 0..3);
    (swaps, dups, replays).prop_map(move |(swaps, dups, replays)| {
        if len == 0 {
            return Vec::new();
        }
        let mut order: Vec<usize> = (0..len).collect();
        order.extend(dups);
        for (from, to) in replays {
            let (lo, hi) = (from.min(to), from.max(to));
            order.extend(lo..=hi);
        }
        let n = order.len();
        for (a, b) in swaps {
            order.swap(a % n, b % n);
        }
        order
    })
}

fn apply_all(h: &History, order: impl Iterator<Item = usize>) -> (LocalViews, LocalCounts) {
    let (views, counts) = (LocalViews::default(), LocalCounts::default());
    for i in order {
        block_on(ViewStore::apply(&views, &h.envelopes[i])).expect("apply view");
        block_on(CountStore::apply(&counts, &h.envelopes[i])).expect("apply count");
    }
    (views, counts)
}

fn history_and_schedule() -> impl Strategy<Value = (usize, Vec<Op>, Vec<usize>)> {
    (2..5usize)
        .prop_flat_map(|users| (Just(users), prop::collection::vec(op(users), 0..80)))
        .prop_flat_map(|(users, ops)| {
            let len = build(users, &ops).envelopes.len();
            (Just(users), Just(ops), schedule(len))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn any_delivery_pattern_converges_to_the_in_order_views((users, ops, order) in history_and_schedule()) {
        let h = build(users, &ops);
        let (clean_views, clean_counts) = apply_all(&h, 0..h.envelopes.len());
        let (views, counts) = apply_all(&h, order.into_iter());
        let convs = h.conversations();
        let clean = block_on(snapshot(&clean_views, &clean_counts, &h.users, &convs, &h.rooms)).unwrap();
        let messy = block_on(snapshot(&views, &counts, &h.users, &convs, &h.rooms)).unwrap();
        prop_assert_eq!(&clean, &messy);
        for u in &h.users {
            prop_assert_eq!(&clean.unseen[u], &h.expected_unseen(u), "unseen counts of {} equal their definition", u);
            prop_assert_eq!(&clean.room_unread[u], &h.expected_room_unread(u), "room unread of {} equal their definition", u);
            prop_assert_eq!(&clean.blocked[u], &h.expected_blocked(u), "whom {} blocked", u);
        }
        for (_, _, messages) in clean.rooms.values() {
            let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
            prop_assert_eq!(seqs, (1..=messages.len() as u64).collect::<Vec<_>>());
        }
        prop_assert_eq!(&clean.reactions, &h.expected_reactions(), "reactions equal their definition");
        // Deleted messages are tombstones without content; no other is.
        let deleted = h.deleted();
        for m in clean.conversations.values().flat_map(|(messages, _)| messages) {
            let tombstone = m.deleted && m.message.is_none() && m.attachment.is_none() && m.reply_to.is_none();
            prop_assert_eq!(deleted.contains(&m.id), tombstone, "message {}", &m.id);
        }
        for m in clean.rooms.values().flat_map(|(_, _, messages)| messages) {
            let tombstone = m.deleted && m.message.is_none() && m.attachment.is_none() && m.reply_to.is_none();
            prop_assert_eq!(deleted.contains(&m.id), tombstone, "room message {}", &m.id);
        }
        // Gapless sequences per conversation.
        for (messages, _) in clean.conversations.values() {
            let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
            prop_assert_eq!(seqs, (1..=messages.len() as u64).collect::<Vec<_>>());
        }
    }
}

/// Applies `order` in batches through [`Projection::apply_batch`] (what
/// the projectors, the embedded tail and rebuilds use), the batch sizes
/// taken in turn from `sizes`; an event's log sequence is its index + 1.
fn apply_batched(h: &History, order: &[usize], sizes: &[usize]) -> (LocalViews, LocalCounts) {
    use natter_projections::Projection;
    let (views, counts) = (LocalViews::default(), LocalCounts::default());
    let (mut rest, mut size) = (order, sizes.iter().cycle());
    while !rest.is_empty() {
        let (batch, tail) = rest.split_at((*size.next().unwrap_or(&1)).clamp(1, rest.len()));
        rest = tail;
        let events: Vec<(&natter_events::Envelope, u64)> = batch.iter().map(|&i| (&h.envelopes[i], i as u64 + 1)).collect();
        block_on(Projection::apply_batch(&views, &events)).expect("apply views batch");
        block_on(Projection::apply_batch(&counts, &events)).expect("apply counts batch");
    }
    (views, counts)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Batched applies converge like single ones: the same messy delivery
    /// patterns, cut into batches of 1 to 64 events (a batch may hold an
    /// event twice, or several states of one conversation, or an older
    /// event after a newer one).
    #[test]
    fn any_batching_of_any_delivery_pattern_converges_to_the_in_order_views(
        (users, ops, order) in history_and_schedule(),
        sizes in prop::collection::vec(1..65usize, 1..8),
    ) {
        let h = build(users, &ops);
        let (clean_views, clean_counts) = apply_all(&h, 0..h.envelopes.len());
        let (views, counts) = apply_batched(&h, &order, &sizes);
        let convs = h.conversations();
        let clean = block_on(snapshot(&clean_views, &clean_counts, &h.users, &convs, &h.rooms)).unwrap();
        let batched = block_on(snapshot(&views, &counts, &h.users, &convs, &h.rooms)).unwrap();
        prop_assert_eq!(&clean, &batched);
        // The whole history as one batch, as a rebuild's first batch is.
        let everything: Vec<usize> = (0..h.envelopes.len()).collect();
        let (views, counts) = apply_batched(&h, &everything, &[usize::MAX]);
        let one = block_on(snapshot(&views, &counts, &h.users, &convs, &h.rooms)).unwrap();
        prop_assert_eq!(&clean, &one);
    }
}

/// The stored v1 form of a current `MessageSent` envelope (one attachment
/// at most, as v1 could express).
fn as_v1(env: &natter_events::Envelope) -> Vec<u8> {
    let mut stored = serde_json::to_value(env.to_stored()).unwrap();
    if let natter_events::Event::MessageSent(e) = &env.event {
        stored["v"] = 1.into();
        stored["commandId"] = env.command_id.clone().into();
        let mut data = serde_json::to_value(e).unwrap();
        let fields = data.as_object_mut().unwrap();
        if let Some(list) = fields.remove("attachments")
            && let Some(first) = list.as_array().and_then(|l| l.first())
        {
            fields.insert("attachment".into(), first.clone());
        }
        stored["data"] = data;
    }
    serde_json::to_vec(&stored).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// A log holding every schema version of the direct-conversation
    /// events (MessageSent v1, v2 and compact v3; MessagesSeen v1 and
    /// compact v2) replays into the same views as one written entirely at
    /// the current version.
    #[test]
    fn a_log_with_every_version_gives_the_same_views((users, ops, _order) in history_and_schedule(), mask in any::<u64>()) {
        let h = build(users, &ops);
        let mixed: Vec<natter_events::Envelope> = h
            .envelopes
            .iter()
            .enumerate()
            .map(|(i, env)| {
                let bytes = match mask >> (2 * (i % 32)) & 3 {
                    1 => as_v1(env),
                    2 => env.encode_as(false),
                    _ => env.encode(),
                };
                let decoded = natter_events::Envelope::decode(&bytes).unwrap();
                assert_eq!(&decoded, env, "event {i} reads back the same from the version it was written in");
                decoded
            })
            .collect();
        let (views, counts) = (LocalViews::default(), LocalCounts::default());
        for env in &mixed {
            block_on(ViewStore::apply(&views, env)).unwrap();
            block_on(CountStore::apply(&counts, env)).unwrap();
        }
        let (clean_views, clean_counts) = apply_all(&h, 0..h.envelopes.len());
        let convs = h.conversations();
        let clean = block_on(snapshot(&clean_views, &clean_counts, &h.users, &convs, &h.rooms)).unwrap();
        let replayed = block_on(snapshot(&views, &counts, &h.users, &convs, &h.rooms)).unwrap();
        prop_assert_eq!(clean, replayed);
    }
}
