//! Idle associations to the PACS kept for the next operation that needs the same presentation
//! contexts, and released when unused for a while, so the PACS's association slots are not held;
//! and the places under `pacs.max_associations` every association to the PACS takes.
//!
//! Owns: the idle list (bounded in count and time), the reaper, the check an association
//! passes before it is reused: nothing may be waiting on it (an A-RELEASE-RQ, an A-ABORT, a
//! closed connection, a late answer), found without sending anything the PACS did not
//! negotiate; and [`Slots`], the one count of associations open to the PACS (look-ups,
//! DICOMweb by translation, client relays), which releases idle ones to make room. Must not
//! know what the associations are used for.

use crate::dicom::peer::Peer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

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
    /// Keeps the registration with [`Slots`] alive.
    _evictable: Option<Arc<dyn Evict>>,
    reaper: Arc<AtomicBool>,
    max_idle: usize,
    max_idle_time: Duration,
}

impl<C: Pooled> Pool<C> {
    pub(crate) fn new(max_idle: usize, max_idle_time: Duration) -> Pool<C> {
        Pool {
            idle: Arc::new(Mutex::new(Vec::new())),
            _evictable: None,
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

    /// A pool whose idle associations `slots` may release when a place is wanted.
    pub(crate) fn counted(max_idle: usize, max_idle_time: Duration, slots: &Slots) -> Pool<C> {
        let mut p = Pool::new(max_idle, max_idle_time);
        let e: Arc<dyn Evict> = Arc::new(Evictable(Arc::downgrade(&p.idle)));
        slots.register(Arc::downgrade(&e));
        p._evictable = Some(e);
        p
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

fn evict_oldest<C: Pooled>(list: &List<C>) -> bool {
    let oldest = {
        let mut l = list.lock().unwrap_or_else(|e| e.into_inner());
        if l.is_empty() {
            return false;
        }
        l.remove(0)
    };
    tokio::spawn(release(oldest.conn));
    true
}

/// Something holding idle associations that can release one.
pub(crate) trait Evict: Send + Sync {
    fn evict_one(&self) -> bool;
}

struct Evictable<C: Pooled>(Weak<List<C>>);

impl<C: Pooled> Evict for Evictable<C> {
    fn evict_one(&self) -> bool {
        self.0.upgrade().is_some_and(|l| evict_oldest(&l))
    }
}

/// The places under `pacs.max_associations`: every association the gateway opens to the PACS
/// holds one while it is open (idle in a pool included). Client relays and DICOMweb by
/// translation may take all but one, so an ownership look-up (which those requests need before
/// anything else) always finds a place soon. While none is free, idle associations are released
/// one by one; a wait is bounded.
pub struct Slots {
    all: Arc<Semaphore>,
    relays: Arc<Semaphore>,
    pools: Mutex<Vec<Weak<dyn Evict>>>,
    wait: Duration,
}

/// A place under [`Slots`], held for as long as its association is open.
#[derive(Debug)]
pub struct Slot {
    _all: OwnedSemaphorePermit,
    _relay: Option<OwnedSemaphorePermit>,
}

impl Slots {
    pub fn new(max: usize, wait: Duration) -> Arc<Slots> {
        let max = max.max(1);
        Arc::new(Slots {
            all: Arc::new(Semaphore::new(max)),
            relays: Arc::new(Semaphore::new((max - 1).max(1))),
            pools: Mutex::default(),
            wait,
        })
    }

    fn register(&self, pool: Weak<dyn Evict>) {
        let mut p = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|w| w.strong_count() > 0);
        p.push(pool);
    }

    /// Releases one idle association of any pool; `false` when none is idle.
    fn evict_one(&self) -> bool {
        let pools: Vec<Arc<dyn Evict>> = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        pools.iter().any(|p| p.evict_one())
    }

    /// A place for an ownership look-up's association.
    pub async fn lookup(&self) -> Result<Slot, String> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let all = self.take(&self.all, deadline).await?;
        Ok(Slot {
            _all: all,
            _relay: None,
        })
    }

    /// A place for a client relay's or a translation's association.
    pub async fn relay(&self) -> Result<Slot, String> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let relay = self.take(&self.relays, deadline).await?;
        let all = self.take(&self.all, deadline).await?;
        Ok(Slot {
            _all: all,
            _relay: Some(relay),
        })
    }

    async fn take(
        &self,
        sem: &Arc<Semaphore>,
        deadline: tokio::time::Instant,
    ) -> Result<OwnedSemaphorePermit, String> {
        loop {
            match sem.clone().try_acquire_owned() {
                Ok(p) => return Ok(p),
                Err(TryAcquireError::Closed) => return Err("the gateway is stopping".into()),
                Err(TryAcquireError::NoPermits) => {}
            }
            // An idle association holds a place too: one is released, then the wait is short.
            self.evict_one();
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "no association to the PACS free within {:?} (pacs.max_associations)",
                    self.wait
                ));
            }
            let wait = Duration::from_millis(100).min(deadline - tokio::time::Instant::now());
            if let Ok(Ok(p)) = tokio::time::timeout(wait, sem.clone().acquire_owned()).await {
                return Ok(p);
            }
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
