//! The boot-timer device: one MMIO page at `layout::BOOT_TIMER_ADDR`. The guest agent
//! writes a one-byte stage code at offset 0 (through `/dev/mem`) and the VMM records a
//! host timestamp for it. Reads return 0.

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::exit::{ExitReason, VmExit};
use crate::timeline::{Stage, Timeline};

/// The boot-timer device.
#[derive(Debug)]
pub struct BootTimer {
    timeline: Arc<Timeline>,
    /// End the VM for a snapshot when the agent reports ready.
    save_at_ready: Option<Arc<VmExit>>,
}

impl BootTimer {
    /// Record stages into `timeline` (bounded: see `timeline::MAX_ENTRIES`).
    pub fn new(timeline: Arc<Timeline>) -> Self {
        Self {
            timeline,
            save_at_ready: None,
        }
    }

    /// When the agent reports ready, stop the VM through `exit` with
    /// [`ExitReason::Saved`] (the VM is saved once every vCPU is out).
    pub fn saving_at_ready(mut self, exit: Arc<VmExit>) -> Self {
        self.save_at_ready = Some(exit);
        self
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        if let Some(&code) = data.first() {
            let stage = Stage::from_boot_timer(code);
            self.timeline.record(stage);
            if let (Stage::AgentReady, Some(exit)) = (stage, &self.save_at_ready) {
                exit.request(Ok(ExitReason::Saved));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_write_at_offset_zero_records_its_stage() {
        let timeline = Arc::new(Timeline::new(0));
        let mut dev = BootTimer::new(timeline.clone());

        dev.write(0, &[1]);
        dev.write(0, &[2, 0, 0, 0]);
        dev.write(0, &[77]);
        dev.write(8, &[1]);
        dev.write(0, &[]);

        let stages: Vec<Stage> = timeline.relative().into_iter().map(|(s, _)| s).collect();
        assert_eq!(
            stages,
            vec![
                Stage::ProcessStart,
                Stage::AgentStarted,
                Stage::AgentReady,
                Stage::Other(77)
            ]
        );
    }
}
