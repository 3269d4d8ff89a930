//! The services waiting to be read: each at most once waiting and once being read. One asked
//! for again while it is being read is read once more after that read, never by two readers
//! at once (the older answer could land last and win).

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Queue {
    names: Mutex<Names>,
    ready: Notify,
}

#[derive(Default)]
struct Names {
    waiting: BTreeSet<String>,
    reading: BTreeSet<String>,
    /// Asked for while being read.
    again: BTreeSet<String>,
}

impl Queue {
    fn names(&self) -> MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn push(&self, names: impl IntoIterator<Item = String>) {
        let mut added = false;
        {
            let mut queue = self.names();
            for name in names {
                if queue.reading.contains(&name) {
                    queue.again.insert(name);
                } else {
                    added |= queue.waiting.insert(name);
                }
            }
        }
        if added {
            self.ready.notify_one();
        }
    }

    /// The next name to read; [`Queue::done`] when its read is over.
    pub async fn pop(&self) -> String {
        loop {
            let ready = self.ready.notified();
            {
                let mut queue = self.names();
                if let Some(name) = queue.waiting.pop_first() {
                    queue.reading.insert(name.clone());
                    if !queue.waiting.is_empty() {
                        // More to read: wake the next reader too.
                        self.ready.notify_one();
                    }
                    return name;
                }
            }
            ready.await;
        }
    }

    pub fn done(&self, name: &str) {
        let again = {
            let mut queue = self.names();
            queue.reading.remove(name);
            queue.again.remove(name) && queue.waiting.insert(name.to_string())
        };
        if again {
            self.ready.notify_one();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let queue = self.names();
        queue.waiting.len() + queue.reading.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[tokio::test]
    async fn each_name_waits_once_and_is_never_read_twice_at_once() {
        let queue = Queue::default();
        queue.push(names(&["shop", "cart", "shop"]));
        assert_eq!(queue.len(), 2);
        let first = queue.pop().await;
        assert_eq!(first, "cart");
        // Asked for again while being read: not handed to a second reader.
        queue.push(names(&["cart"]));
        assert_eq!(queue.pop().await, "shop");
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(50), queue.pop());
        assert!(
            nothing.await.is_err(),
            "cart was handed out while being read"
        );
        // Its read over, it is read once more.
        queue.done("cart");
        assert_eq!(queue.pop().await, "cart");
        queue.done("cart");
        queue.done("shop");
        assert_eq!(queue.len(), 0);
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken() {
        let queue = std::sync::Arc::new(Queue::default());
        let reader = tokio::spawn({
            let queue = queue.clone();
            async move { queue.pop().await }
        });
        tokio::task::yield_now().await;
        queue.push(names(&["shop"]));
        assert_eq!(reader.await.unwrap(), "shop");
    }
}
