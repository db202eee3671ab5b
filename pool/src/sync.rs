//! The synchronisation primitives of the slot hand-off (`member.rs`, `internals.rs`): the
//! standard ones (and tokio's oneshot) in every normal build, loom's under
//! `--cfg grpc_pool_loom`, so that the loom model (`wait_queue/loom_tests.rs`) runs the pool's
//! own acquire, release and wait-queue code under every interleaving loom explores.
//!
//! The switch is `grpc_pool_loom`, not the usual `loom`: RUSTFLAGS reach every crate, and
//! under `--cfg loom` tokio leaves out its `net` module, which the pool needs to compile.
//!
//! `Arc` is not swapped: `Member`'s methods take `self: &Arc<Self>`, which only the standard
//! `Arc` allows, and no ordering of the protocol rests on a reference count.

#[cfg(not(grpc_pool_loom))]
pub(crate) use std::sync::{atomic, Mutex, MutexGuard};
#[cfg(not(grpc_pool_loom))]
pub(crate) use tokio::sync::oneshot;

#[cfg(grpc_pool_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

/// loom's atomics, with one change: a new atomic's first value counts as a SeqCst store.
///
/// loom takes a SeqCst load to read the newest SeqCst store (as the memory model says), but
/// marks the value an atomic is created with as no SeqCst store, so a SeqCst load may still
/// read it after a newer SeqCst store: a false lost wake-up in the hand-off, where a releaser
/// reads `waiting` as 0 after a waiter's SeqCst increment that the waiter's own SeqCst read
/// of the slots ordered before the release. In the memory model the creation happens before
/// that increment and cannot be read past it. Storing the first value again, SeqCst, right
/// after creation (before any other thread can see the atomic) tells loom so; a weaker
/// ordering anywhere in the protocol still fails the model, as it must.
#[cfg(grpc_pool_loom)]
pub(crate) mod atomic {
    use std::ops::Deref;

    pub(crate) use loom::sync::atomic::Ordering;

    macro_rules! seq_cst_created {
        ($($name:ident: $value:ty),*) => {$(
            #[derive(Debug)]
            pub(crate) struct $name(loom::sync::atomic::$name);

            impl $name {
                pub(crate) fn new(value: $value) -> $name {
                    let atomic = loom::sync::atomic::$name::new(value);
                    atomic.store(value, Ordering::SeqCst);
                    $name(atomic)
                }
            }

            impl Deref for $name {
                type Target = loom::sync::atomic::$name;

                fn deref(&self) -> &Self::Target {
                    &self.0
                }
            }
        )*};
    }

    seq_cst_created!(AtomicBool: bool, AtomicU8: u8, AtomicU32: u32, AtomicUsize: usize);
}

/// A stand-in for tokio's oneshot channel under loom, with the part of its API that the wait
/// queue and checkout use and the same meaning: `send` fails, returning the value, once the
/// receiver is closed or dropped; a value sent before `close` stays there for `try_recv`, and
/// is dropped with the receiver. Each operation is one step under a loom mutex, as tokio's
/// are single atomic steps (tokio checks its own channel with loom).
#[cfg(grpc_pool_loom)]
pub(crate) mod oneshot {
    use std::fmt;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use loom::sync::{Arc, Mutex};

    struct State<T> {
        value: Option<T>,
        receiver_closed: bool,
        sender_gone: bool,
        waker: Option<Waker>,
    }

    type Shared<T> = Arc<Mutex<State<T>>>;

    fn lock<T>(shared: &Shared<T>) -> loom::sync::MutexGuard<'_, State<T>> {
        shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sending half.
    pub(crate) struct Sender<T>(Option<Shared<T>>);

    /// The receiving half.
    pub(crate) struct Receiver<T>(Shared<T>);

    /// The sender went away without sending.
    #[derive(Debug)]
    pub(crate) struct RecvError;

    /// Nothing was sent (yet, or ever).
    #[derive(Debug)]
    pub(crate) struct TryRecvError;

    pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
        let shared = Arc::new(Mutex::new(State {
            value: None,
            receiver_closed: false,
            sender_gone: false,
            waker: None,
        }));
        (Sender(Some(shared.clone())), Receiver(shared))
    }

    impl<T> Sender<T> {
        pub(crate) fn send(mut self, value: T) -> Result<(), T> {
            let shared = self.0.take().expect("a sender sends once");
            let mut state = lock(&shared);
            state.sender_gone = true;
            if state.receiver_closed {
                return Err(value);
            }
            state.value = Some(value);
            let waker = state.waker.take();
            drop(state);
            if let Some(waker) = waker {
                waker.wake();
            }
            Ok(())
        }

        pub(crate) fn is_closed(&self) -> bool {
            self.0.as_ref().is_none_or(|shared| lock(shared).receiver_closed)
        }
    }

    impl<T> Drop for Sender<T> {
        fn drop(&mut self) {
            if let Some(shared) = self.0.take() {
                let mut state = lock(&shared);
                state.sender_gone = true;
                let waker = state.waker.take();
                drop(state);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
        }
    }

    impl<T> Receiver<T> {
        pub(crate) fn close(&mut self) {
            lock(&self.0).receiver_closed = true;
        }

        pub(crate) fn try_recv(&mut self) -> Result<T, TryRecvError> {
            lock(&self.0).value.take().ok_or(TryRecvError)
        }
    }

    impl<T> Drop for Receiver<T> {
        fn drop(&mut self) {
            // Closed first, then the value (a slot, whose drop serves waiters) is dropped
            // outside the lock, as tokio's receiver does.
            let value = {
                let mut state = lock(&self.0);
                state.receiver_closed = true;
                state.value.take()
            };
            drop(value);
        }
    }

    impl<T> Future for Receiver<T> {
        type Output = Result<T, RecvError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let mut state = lock(&self.0);
            if let Some(value) = state.value.take() {
                return Poll::Ready(Ok(value));
            }
            if state.sender_gone {
                return Poll::Ready(Err(RecvError));
            }
            state.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    impl<T> fmt::Debug for Sender<T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Sender")
        }
    }

    impl<T> fmt::Debug for Receiver<T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Receiver")
        }
    }
}
