//! The device event loop: one thread running an `event-manager` loop for the devices'
//! file descriptors (virtio queue notifications, backend sockets), stopped by its kill
//! eventfd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::exit::{VmExit, VmFailure};

/// What the loop holds: any subscriber, shared with whoever else drives it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors starting the loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the event loop")]
    Create(#[source] event_manager::Error),
    #[error("cannot create the event loop's kill eventfd")]
    KillEvent(#[source] std::io::Error),
    #[error("cannot start the device thread")]
    Spawn(#[source] std::io::Error),
}

/// Stops the loop when its eventfd is written.
#[derive(Debug)]
struct KillSwitch {
    evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for KillSwitch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // If this fails the loop cannot be stopped; `spawn` refuses to start then.
        if ops.add(Events::new(&self.evt, EventSet::IN)).is_err() {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// An event loop being assembled.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    kill: EventFd,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").finish_non_exhaustive()
    }
}

impl EventLoop {
    /// An empty loop with its kill switch registered.
    pub fn new() -> Result<Self, EventLoopError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(EventLoopError::Create)?;
        let kill = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::KillEvent)?;
        let stop = Arc::new(AtomicBool::new(false));
        let switch = KillSwitch {
            evt: kill.try_clone().map_err(EventLoopError::KillEvent)?,
            stop: stop.clone(),
        };
        manager.add_subscriber(Arc::new(Mutex::new(switch)));
        Ok(Self {
            manager,
            kill,
            stop,
        })
    }

    /// Add a subscriber; its `init` runs now, on this thread.
    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Run the loop on its own thread, after `first` (run there once it is under its
    /// seccomp list). A loop failure ends the VM through `exit`.
    pub fn spawn(
        mut self,
        exit: Arc<VmExit>,
        first: impl FnOnce() + Send + 'static,
    ) -> Result<EventLoopHandle, EventLoopError> {
        let kill = self.kill.try_clone().map_err(EventLoopError::KillEvent)?;
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name("mxc-devices".into())
            .spawn(move || {
                if let Err(e) =
                    crate::seccomp::threads::enter(crate::seccomp::threads::ThreadKind::Devices)
                {
                    exit.request(Err(VmFailure::Seccomp(e)));
                    return;
                }
                first();
                while !self.stop.load(Ordering::SeqCst) {
                    if let Err(e) = self.manager.run() {
                        exit.request(Err(VmFailure::EventLoop(e)));
                        break;
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(EventLoopHandle { kill, stop, thread })
    }
}

/// A running event loop.
#[derive(Debug)]
pub struct EventLoopHandle {
    kill: EventFd,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl EventLoopHandle {
    /// Stop the loop and wait for its thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.kill.write(1);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Echo {
        evt: EventFd,
        seen: mpsc::Sender<u64>,
    }

    impl MutEventSubscriber for Echo {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            if let Ok(n) = self.evt.read() {
                let _ = self.seen.send(n);
            }
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn subscribers_run_on_the_loop_thread_until_stopped() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut event_loop = EventLoop::new().unwrap();
        event_loop.add(Arc::new(Mutex::new(Echo {
            evt: evt.try_clone().unwrap(),
            seen: tx,
        })));
        let exit = Arc::new(VmExit::new().unwrap());
        let handle = event_loop.spawn(exit.clone(), || {}).unwrap();

        evt.write(5).unwrap();
        let seen = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        handle.stop();

        assert_eq!(seen, 5);
        assert!(!exit.requested());
    }
}
