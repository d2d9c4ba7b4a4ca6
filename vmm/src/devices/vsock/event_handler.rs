//! Event-loop glue: which fds the device watches, and what each one triggers.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::{Vsock, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use super::VsockBackend;
use crate::logging::guest_warn;

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_RX: u32 = 1;
const TOKEN_TX: u32 = 2;
const TOKEN_EVENT: u32 = 3;
const TOKEN_BACKEND: u32 = 4;

impl<B: VsockBackend> Vsock<B> {
    /// Watch the three queue notify fds and the backend (once active).
    fn register_active(&mut self, ops: &mut EventOps) {
        let queues = [
            (RX_QUEUE, TOKEN_RX),
            (TX_QUEUE, TOKEN_TX),
            (EVENT_QUEUE, TOKEN_EVENT),
        ];
        for (idx, token) in queues {
            if let Some(evt) = self.queue_evt(idx) {
                if let Err(e) = ops.add(Events::with_data(evt, token, EventSet::IN)) {
                    tracing::error!(error = ?e, queue = idx, "vsock: cannot watch queue");
                }
            }
        }
        if let Err(e) = ops.add(Events::with_data(
            self.backend(),
            TOKEN_BACKEND,
            EventSet::IN,
        )) {
            tracing::error!(error = ?e, "vsock: cannot watch backend");
        }
    }

    fn on_activate(&mut self, ops: &mut EventOps) {
        // Non-blocking read; the value does not matter.
        let _ = self.activate_evt().read();
        if let Err(e) = ops.remove(Events::with_data(
            self.activate_evt(),
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!(error = ?e, "vsock: cannot unwatch activation eventfd");
        }
        self.register_active(ops);
        // Host connections may have queued work before the guest was ready.
        if self.process_rx() {
            self.signal_used();
        }
    }

    fn drain_queue_evt(&mut self, idx: usize) {
        if let Some(evt) = self.queue_evt(idx) {
            // The transport's eventfd may be blocking; it is readable, so this returns.
            if evt.read().is_err() {
                guest_warn!(queue = idx, "vsock: cannot read queue eventfd");
            }
        }
    }
}

impl<B: VsockBackend> MutEventSubscriber for Vsock<B> {
    fn init(&mut self, ops: &mut EventOps) {
        if self.is_activated() {
            self.register_active(ops);
        } else if let Err(e) = ops.add(Events::with_data(
            self.activate_evt(),
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!(error = ?e, "vsock: cannot watch activation eventfd");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let used = match events.data() {
            TOKEN_ACTIVATE => {
                self.on_activate(ops);
                false
            }
            TOKEN_RX => {
                self.drain_queue_evt(RX_QUEUE);
                self.process_rx()
            }
            TOKEN_TX => {
                self.drain_queue_evt(TX_QUEUE);
                // Sending may queue answers (RESPONSE, RST, credit): deliver them now.
                let tx = self.process_tx();
                self.process_rx() || tx
            }
            TOKEN_EVENT => {
                // The driver's event buffers are kept for transport-reset events, which
                // this device never sends.
                self.drain_queue_evt(EVENT_QUEUE);
                false
            }
            TOKEN_BACKEND => {
                self.process_backend();
                self.process_rx()
            }
            _ => false,
        };
        if used {
            self.signal_used();
        }
    }
}
