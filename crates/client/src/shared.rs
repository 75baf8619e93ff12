//! State the connection task publishes to every [`Client`](crate::Client) handle: counters, the
//! recent uncorrelated frames and how the connection ended. Locks are never held across `.await`.

use crate::error::{CloseInfo, ErrorFrame};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use tokio::sync::{Notify, watch};

#[derive(Debug)]
pub(crate) struct Shared {
    dropped: AtomicU64,
    history: usize,
    errors: Mutex<VecDeque<ErrorFrame>>,
    unexpected: Mutex<VecDeque<String>>,
    /// Woken when an error frame is recorded and when the connection ends.
    notify: Notify,
    closed: watch::Receiver<Option<CloseInfo>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, cap: usize) {
    if cap == 0 {
        return;
    }
    while queue.len() >= cap {
        queue.pop_front();
    }
    queue.push_back(item);
}

impl Shared {
    pub(crate) fn new(history: usize, closed: watch::Receiver<Option<CloseInfo>>) -> Self {
        Self {
            dropped: AtomicU64::new(0),
            history,
            errors: Mutex::new(VecDeque::new()),
            unexpected: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            closed,
        }
    }

    pub(crate) fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn push_error(&self, frame: ErrorFrame) {
        push_bounded(&mut lock(&self.errors), frame, self.history);
        self.notify.notify_waiters();
    }

    pub(crate) fn push_unexpected(&self, text: String) {
        push_bounded(&mut lock(&self.unexpected), text, self.history);
    }

    pub(crate) fn take_errors(&self) -> Vec<ErrorFrame> {
        lock(&self.errors).drain(..).collect()
    }

    pub(crate) fn take_unexpected(&self) -> Vec<String> {
        lock(&self.unexpected).drain(..).collect()
    }

    /// Called by the connection task once the close info is published.
    pub(crate) fn wake_all(&self) {
        self.notify.notify_waiters();
    }

    /// How the connection ended; `None` while it is open.
    pub(crate) fn close_info(&self) -> Option<CloseInfo> {
        if let Some(info) = self.closed.borrow().clone() {
            return Some(info);
        }
        // The task is gone without publishing (it never should): still report closed.
        self.closed.has_changed().is_err().then(CloseInfo::task_gone)
    }

    pub(crate) async fn closed(&self) -> CloseInfo {
        let mut rx = self.closed.clone();
        let waited = rx.wait_for(Option::is_some).await.map(|info| info.clone());
        match waited {
            Ok(info) => info,
            Err(_) => rx.borrow().clone(),
        }
        .unwrap_or_else(CloseInfo::task_gone)
    }

    pub(crate) async fn next_error(&self) -> Option<ErrorFrame> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(frame) = lock(&self.errors).pop_front() {
                return Some(frame);
            }
            if self.close_info().is_some() {
                return None;
            }
            notified.await;
        }
    }
}
