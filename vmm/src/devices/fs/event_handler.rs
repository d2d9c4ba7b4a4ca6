//! Event-loop glue. The queues are served by the device's own worker thread, so the VMM's
//! event loop only watches the worker's exit eventfd: when the worker ends (killed, failed
//! or panicked), the loop collects the thread and says so once.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Fs;

const TOKEN_EXIT: u32 = 0;

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(self.exit_evt(), TOKEN_EXIT, EventSet::IN)) {
            tracing::error!(error = ?e, tag = self.tag(), "fs: cannot watch the worker");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() != TOKEN_EXIT {
            return;
        }
        // Non-blocking read; the value does not matter.
        let _ = self.exit_evt().read();
        self.reap_worker();
        tracing::warn!(tag = self.tag(), "fs: share no longer served");
        if let Err(e) = ops.remove(Events::with_data(self.exit_evt(), TOKEN_EXIT, EventSet::IN)) {
            tracing::error!(error = ?e, tag = self.tag(), "fs: cannot unwatch the worker");
        }
    }
}
