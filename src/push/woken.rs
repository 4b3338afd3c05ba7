//! A set of streams polled only when woken: the router's subscriptions.
//!
//! A node holds two subscriptions per user with a socket here and one per
//! room of theirs, thousands of them; a delivery wakes one or two. Polling
//! every subscription on every pass made each delivery cost O(users on the
//! node) of CPU (1,000 users per node: +0.85 ms per direct message). Here
//! each stream has a waker of its own that queues its index when woken, and
//! a pass polls only the queued ones.
//!
//! What a pass over the queue takes, which the router's ordering rests on:
//! every stream is either queued here or was last polled to `Pending` (so
//! its waker is registered with its channel). A channel that queues an item
//! wakes the registered waker before `send` returns, so by the time a later
//! item of the same connection is seen (NATS hands one connection's
//! messages to their subscriptions one after another, each send waking
//! before the next), every earlier item's stream is queued here: the next
//! pass takes it, exactly as a pass polling every stream would.
//!
//! That holds only for passes outside tokio's cooperative task budget (the
//! router runs its passes `unconstrained`): a tokio channel polled with the
//! budget spent answers `Pending` without registering the waker (it defers
//! the wake until the worker runs out of work), so the stream would be
//! neither queued nor registered for the rest of that pass and the next.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};

use futures::task::AtomicWaker;

/// What a visit of a stream found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visited {
    /// It has nothing more now (it answered `Pending`).
    Drained,
    /// The visit stopped before it was empty: poll it again next pass.
    More,
    /// It ended: it leaves the set.
    Ended,
}

/// The queue of woken streams, and the task polling them.
#[derive(Default)]
struct Ready {
    queue: Mutex<Vec<usize>>,
    task: AtomicWaker,
}

impl Ready {
    fn push(&self, index: usize) {
        self.queue.lock().expect("woken queue lock").push(index);
    }
}

/// One stream's waker: queues its index (once until it is polled again)
/// and wakes the polling task.
struct Flag {
    index: usize,
    queued: AtomicBool,
    ready: Arc<Ready>,
}

impl Flag {
    /// Queues the stream unless it is queued already.
    fn queue(&self) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.ready.push(self.index);
        }
    }
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.queue();
        self.ready.task.wake();
    }
}

struct Slot<S> {
    stream: S,
    flag: Arc<Flag>,
    waker: Waker,
}

pub struct Woken<S> {
    slots: Vec<Option<Slot<S>>>,
    free: Vec<usize>,
    ready: Arc<Ready>,
}

impl<S> Default for Woken<S> {
    fn default() -> Self {
        Woken { slots: Vec::new(), free: Vec::new(), ready: Arc::default() }
    }
}

impl<S> Woken<S> {
    /// Adds a stream, polled on the next pass.
    pub fn push(&mut self, stream: S) {
        let index = self.free.pop().unwrap_or(self.slots.len());
        let flag = Arc::new(Flag { index, queued: AtomicBool::new(true), ready: self.ready.clone() });
        let waker = Waker::from(flag.clone());
        let slot = Slot { stream, flag, waker };
        match self.slots.get_mut(index) {
            Some(free) => *free = Some(slot),
            None => self.slots.push(Some(slot)),
        }
        self.ready.push(index);
    }

    /// How many streams the set holds.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// One pass: `visit`s each stream woken (or added, or left with more)
    /// since its last visit, with a context that wakes it alone; the task
    /// polling the set (`cx`) is woken when another is.
    pub fn pass(&mut self, cx: &mut Context<'_>, mut visit: impl FnMut(&mut S, &mut Context<'_>) -> Visited) {
        // Registered before the queue is taken: a wake after the take
        // wakes the task again.
        self.ready.task.register(cx.waker());
        let queued = std::mem::take(&mut *self.ready.queue.lock().expect("woken queue lock"));
        for index in queued {
            // An index queued twice (woken, then freed and reused) is
            // visited once per queueing; a visit with nothing is cheap.
            let Some(Some(slot)) = self.slots.get_mut(index) else { continue };
            // Unqueued before the poll: a wake while it runs queues it again.
            slot.flag.queued.store(false, Ordering::Release);
            let mut own = Context::from_waker(&slot.waker);
            match visit(&mut slot.stream, &mut own) {
                Visited::Drained => {}
                Visited::More => {
                    slot.flag.queue();
                    cx.waker().wake_by_ref();
                }
                Visited::Ended => {
                    self.slots[index] = None;
                    self.free.push(index);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::channel::mpsc;
    use futures::{Stream, StreamExt};

    use super::*;

    /// A channel's receiver that counts its polls.
    struct Counted {
        rx: mpsc::UnboundedReceiver<u32>,
        polls: usize,
    }

    impl Stream for Counted {
        type Item = u32;
        fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> std::task::Poll<Option<u32>> {
            self.polls += 1;
            self.rx.poll_next_unpin(cx)
        }
    }

    /// Takes at most `most` items of each visited stream.
    fn pass(set: &mut Woken<Counted>, most: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let waker = futures::task::noop_waker();
        set.pass(&mut Context::from_waker(&waker), |s, cx| {
            for _ in 0..most {
                match s.poll_next_unpin(cx) {
                    std::task::Poll::Ready(Some(v)) => out.push(v),
                    std::task::Poll::Ready(None) => return Visited::Ended,
                    std::task::Poll::Pending => return Visited::Drained,
                }
            }
            Visited::More
        });
        out
    }

    fn polls(set: &Woken<Counted>) -> Vec<usize> {
        set.slots.iter().map(|s| s.as_ref().map_or(0, |s| s.stream.polls)).collect()
    }

    #[test]
    fn a_pass_polls_only_the_streams_woken_since_their_last_poll() {
        let mut set = Woken::default();
        let mut txs = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = mpsc::unbounded();
            txs.push(tx);
            set.push(Counted { rx, polls: 0 });
        }
        assert_eq!(pass(&mut set, 10), Vec::<u32>::new(), "new streams are polled once");
        assert_eq!(polls(&set), [1, 1, 1]);
        assert!(pass(&mut set, 10).is_empty());
        assert_eq!(polls(&set), [1, 1, 1], "nothing woke: nothing polled");
        txs[1].unbounded_send(7).unwrap();
        txs[1].unbounded_send(8).unwrap();
        assert_eq!(pass(&mut set, 10), [7, 8]);
        assert_eq!(polls(&set), [1, 4, 1], "only the stream that got items (two items, then Pending)");
    }

    #[test]
    fn a_stream_cut_short_is_polled_again_and_an_ended_one_leaves() {
        let mut set = Woken::default();
        let (tx, rx) = mpsc::unbounded();
        set.push(Counted { rx, polls: 0 });
        for v in 0..5 {
            tx.unbounded_send(v).unwrap();
        }
        assert_eq!(pass(&mut set, 2), [0, 1]);
        assert_eq!(pass(&mut set, 2), [2, 3], "what it still held, without a new wake");
        assert_eq!(pass(&mut set, 2), [4]);
        drop(tx);
        assert!(pass(&mut set, 2).is_empty());
        assert_eq!(set.len(), 0, "ended");
        // Its slot is reused by the next stream.
        let (tx, rx) = mpsc::unbounded();
        set.push(Counted { rx, polls: 0 });
        tx.unbounded_send(9).unwrap();
        assert_eq!(pass(&mut set, 2), [9]);
        assert_eq!(set.slots.len(), 1);
    }

    #[test]
    fn a_wake_from_another_thread_wakes_the_polling_task() {
        let mut set = Woken::default();
        let (tx, rx) = mpsc::unbounded();
        set.push(Counted { rx, polls: 0 });
        let woke = Arc::new(AtomicBool::new(false));
        struct Task(Arc<AtomicBool>);
        impl Wake for Task {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let task = Waker::from(Arc::new(Task(woke.clone())));
        set.pass(&mut Context::from_waker(&task), |s, cx| match s.poll_next_unpin(cx) {
            std::task::Poll::Pending => Visited::Drained,
            _ => Visited::More,
        });
        assert!(!woke.load(Ordering::SeqCst));
        std::thread::spawn(move || tx.unbounded_send(1).unwrap()).join().unwrap();
        assert!(woke.load(Ordering::SeqCst), "the task is woken when one of its streams is");
        assert_eq!(pass(&mut set, 5), [1]);
    }
}
