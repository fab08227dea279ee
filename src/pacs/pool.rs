//! Idle associations to the PACS kept for the next operation that needs the same presentation
//! contexts, and released when unused for a while, so the PACS's association slots are not held.
//!
//! Owns: the idle list (bounded in count and time), the reaper, and the check an association
//! passes before it is reused: nothing may be waiting on it (an A-RELEASE-RQ, an A-ABORT, a
//! closed connection, a late answer), found without sending anything the PACS did not
//! negotiate. Must not know what the associations are used for.

use crate::dicom::peer::Peer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// An association a pool can keep.
pub(crate) trait Pooled: Send + 'static {
    fn peer(&mut self) -> &mut Peer;
}

struct Idle<C> {
    key: String,
    conn: C,
    since: Instant,
}

type List<C> = Mutex<Vec<Idle<C>>>;

/// Idle associations by the key of their presentation contexts.
pub(crate) struct Pool<C: Pooled> {
    idle: Arc<List<C>>,
    reaper: Arc<AtomicBool>,
    max_idle: usize,
    max_idle_time: Duration,
}

impl<C: Pooled> Pool<C> {
    pub(crate) fn new(max_idle: usize, max_idle_time: Duration) -> Pool<C> {
        Pool {
            idle: Arc::new(Mutex::new(Vec::new())),
            reaper: Arc::default(),
            max_idle,
            max_idle_time,
        }
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Idle<C>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle association for `key` that nothing is waiting on; those that fail the check or
    /// idled too long are released on the way.
    pub(crate) fn take(&self, key: &str) -> Option<C> {
        loop {
            let found = {
                let mut l = self.list();
                let i = l.iter().rposition(|c| c.key == key)?;
                l.swap_remove(i)
            };
            let mut c = found.conn;
            if found.since.elapsed() < self.max_idle_time && quiet(c.peer()) {
                return Some(c);
            }
            tokio::spawn(release(c));
        }
    }

    /// Releases one idle association of any key (to make room under an association limit);
    /// `false` when there is none.
    pub(crate) fn evict_one(&self) -> bool {
        let oldest = {
            let mut l = self.list();
            if l.is_empty() {
                return false;
            }
            l.remove(0)
        };
        tokio::spawn(release(oldest.conn));
        true
    }

    /// Keeps an association for the next operation with the same contexts (at most
    /// `max_idle`; anything still unread would be mistaken for the next answer, so such an
    /// association is released instead).
    pub(crate) fn put(&self, key: String, mut conn: C) {
        if conn.peer().has_input_at_hand() {
            tokio::spawn(release(conn));
            return;
        }
        let mut l = self.list();
        if l.len() >= self.max_idle {
            let oldest = l.remove(0);
            tokio::spawn(release(oldest.conn));
        }
        l.push(Idle {
            key,
            conn,
            since: Instant::now(),
        });
        drop(l);
        if !self.reaper.swap(true, Ordering::AcqRel) {
            tokio::spawn(reap(
                Arc::downgrade(&self.idle),
                self.reaper.clone(),
                self.max_idle_time,
            ));
        }
    }
}

/// Whether nothing waits on an idle association: polling it once must find nothing (a PDU at
/// hand, or the connection closed, would be answered at once).
fn quiet(peer: &mut Peer) -> bool {
    use futures_util::FutureExt;
    !peer.has_input_at_hand() && peer.next().now_or_never().is_none()
}

/// Releases an association politely, without waiting long.
async fn release<C: Pooled>(mut c: C) {
    let _ = c.peer().release(Duration::from_secs(2)).await;
}

/// Releases idle associations unused for `max`; ends when the list is empty (the next `put`
/// starts it again) or the pool is gone.
async fn reap<C: Pooled>(list: Weak<List<C>>, running: Arc<AtomicBool>, max: Duration) {
    loop {
        tokio::time::sleep(max / 2).await;
        let Some(list) = list.upgrade() else { return };
        let (stale, empty) = {
            let mut l = list.lock().unwrap_or_else(|e| e.into_inner());
            let (stale, keep): (Vec<Idle<C>>, Vec<Idle<C>>) =
                l.drain(..).partition(|c| c.since.elapsed() >= max);
            *l = keep;
            if l.is_empty() {
                running.store(false, Ordering::Release);
            }
            (stale, l.is_empty())
        };
        for c in stale {
            release(c.conn).await;
        }
        if empty {
            return;
        }
    }
}

/// A configuration replaced by a reload drops its pool: its idle associations are released,
/// not left for the PACS to find closed.
impl<C: Pooled> Drop for Pool<C> {
    fn drop(&mut self) {
        let idle: Vec<Idle<C>> = std::mem::take(&mut *self.list());
        if idle.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            for c in idle {
                rt.spawn(release(c.conn));
            }
        }
    }
}
