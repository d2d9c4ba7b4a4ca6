//! Fuzz the frame decoders: the first byte picks the maximum frame and the chunk size
//! for the incremental decoder; the rest is the stream. Both decoders must agree, never
//! panic, and never return a frame above the maximum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::{Control, Decoder, Frame, FrameKind, FrameReader};

fuzz_target!(|data: &[u8]| {
    let Some((&knob, input)) = data.split_first() else {
        return;
    };
    let max = [64u32, 512, 4096, 1 << 20][usize::from(knob & 3)];
    let chunk = 1 + usize::from(knob >> 2) * 37;

    let mut decoder = Decoder::new(max);
    let mut inc: Vec<Frame> = Vec::new();
    let mut inc_failed = false;
    'outer: for piece in input.chunks(chunk) {
        for item in decoder.feed(piece) {
            match item {
                Ok(frame) => inc.push(frame),
                Err(_) => {
                    inc_failed = true;
                    break 'outer;
                }
            }
        }
        assert!(decoder.buffered() <= max as usize + chunk);
    }
    let inc_failed = inc_failed || decoder.finish().is_err();

    let mut reader = FrameReader::with_max_frame(input, max);
    let mut blk = Vec::new();
    let blk_failed = loop {
        match reader.read_frame() {
            Ok(Some(frame)) => blk.push(frame),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };

    assert_eq!(inc, blk);
    assert_eq!(inc_failed, blk_failed);
    for frame in &inc {
        assert!(frame.payload.len() + 9 <= max as usize);
        if frame.kind == FrameKind::Control {
            match frame.to_control() {
                Ok(Control::Exec(exec)) => {
                    let _ = exec.validate();
                }
                Ok(Control::Exit(exit)) => {
                    let _ = exit.status();
                }
                _ => {}
            }
        }
    }
});
