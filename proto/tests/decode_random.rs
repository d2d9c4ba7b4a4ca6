//! Deterministic randomized decoding: thousands of random and mutated inputs through
//! both decoders. Nothing may panic, every frame stays within the maximum, the two
//! decoders agree, and no single allocation exceeds a bound tied to the maximum.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use proto::{
    encode_control, encode_frame, Control, Decoder, Exec, Exit, Frame, FrameKind, FrameReader,
    ProtoError, Rlimits,
};

/// Records the largest single allocation made by a thread that asked to be tracked.
struct TrackingAlloc;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static TRACKED: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the only extra work
// is an atomic max and a const thread-local read, neither of which allocates.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we forward.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded unchanged; `ptr` and `layout` came from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    if TRACKED.with(Cell::get) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

/// xorshift64*: small, deterministic, good enough to shake a parser.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const MAX: u32 = 64 << 10;
const CHUNK_MAX: usize = 4096;

fn sample_messages() -> Vec<Control> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), "/bin:/usr/bin".to_string());
    vec![
        Control::Hello {
            version: 1,
            max_frame: MAX,
        },
        Control::Ready {
            version: 1,
            agent_version: "0.1.0".into(),
            max_frame: MAX,
        },
        Control::Exec(Exec {
            id: 7,
            argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env,
            cwd: Some("/tmp".into()),
            stdin: true,
            timeout_ms: Some(5000),
            rlimits: Rlimits {
                nofile: Some(64),
                ..Rlimits::default()
            },
            pty: false,
            root: true,
            entropy: vec![0x5a; 32],
            wall_clock_ns: Some(1_765_000_000_000_000_000),
        }),
        Control::StdinClose { id: 7 },
        Control::StdinCredit {
            id: 7,
            bytes: 65536,
        },
        Control::Signal { id: 7, signo: 15 },
        Control::Exit(Exit {
            id: 7,
            code: Some(0),
            signal: None,
            timed_out: false,
            duration_ms: 12,
        }),
        Control::error(Some(7), "boom"),
        Control::Shutdown,
        Control::Ping,
        Control::Pong,
    ]
}

/// A valid stream of a few frames.
fn valid_stream(rng: &mut Rng) -> Vec<u8> {
    let msgs = sample_messages();
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(6) {
        if rng.below(2) == 0 {
            let msg = &msgs[rng.below(msgs.len())];
            encode_control(&mut out, msg, MAX).unwrap();
        } else {
            let kind = [FrameKind::Stdin, FrameKind::Stdout, FrameKind::Stderr][rng.below(3)];
            let len = rng.below(300);
            let stream = rng.next() as u32;
            let payload = rng.bytes(len);
            encode_frame(&mut out, kind, stream, &payload, MAX).unwrap();
        }
    }
    out
}

fn mutate(rng: &mut Rng, mut data: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            2 => data.truncate(rng.below(data.len() + 1)),
            3 => {
                let i = rng.below(data.len() + 1);
                let n = 1 + rng.below(16);
                let extra = rng.bytes(n);
                data.splice(i..i, extra);
            }
            4 if data.len() >= 4 => {
                let big = [
                    0xff, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff, 0x00, 0x10, 0x00, 0x00,
                ];
                let pick = rng.below(3) * 4;
                data[..4].copy_from_slice(&big[pick..pick + 4]);
            }
            5 if data.len() > 9 => {
                // Corrupt the JSON of a control frame, keeping the framing intact.
                let i = 9 + rng.below(data.len() - 9);
                data[i] = b"{}[]\":,\\x0"[rng.below(10)];
            }
            _ => {
                let n = rng.below(32);
                data.extend(rng.bytes(n));
            }
        }
    }
    data
}

/// Runs `input` through the incremental decoder in random chunk sizes.
fn decode_incremental(rng: &mut Rng, input: &[u8]) -> (Vec<Frame>, Option<String>) {
    let mut decoder = Decoder::new(MAX);
    let mut frames = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let n = (1 + rng.below(CHUNK_MAX)).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        for item in decoder.feed(chunk) {
            match item {
                Ok(frame) => frames.push(frame),
                Err(e) => return (frames, Some(kind_of(&e))),
            }
        }
        assert!(decoder.buffered() <= MAX as usize + CHUNK_MAX);
    }
    let end = decoder.finish().err().map(|e| kind_of(&e));
    (frames, end)
}

fn decode_blocking(input: &[u8]) -> (Vec<Frame>, Option<String>) {
    let mut reader = FrameReader::with_max_frame(input, MAX);
    let mut frames = Vec::new();
    loop {
        match reader.read_frame() {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(kind_of(&e))),
        }
    }
}

fn kind_of(err: &ProtoError) -> String {
    match err {
        ProtoError::Truncated { .. } => "truncated".into(),
        other => format!("{other}"),
    }
}

fn check_frames(frames: &[Frame]) {
    for frame in frames {
        assert!(frame.payload.len() + 9 <= MAX as usize);
        if frame.kind == FrameKind::Control {
            if let Ok(Control::Exec(exec)) = frame.to_control() {
                let _ = exec.validate();
            }
            if let Ok(Control::Exit(exit)) = frame.to_control() {
                let _ = exit.status();
            }
        }
    }
}

fn run_case(rng: &mut Rng, input: &[u8]) {
    let (inc_frames, inc_err) = decode_incremental(rng, input);
    let (blk_frames, blk_err) = decode_blocking(input);
    check_frames(&inc_frames);
    assert_eq!(inc_frames, blk_frames, "decoders disagree on frames");
    assert_eq!(inc_err, blk_err, "decoders disagree on the error");
}

#[test]
fn valid_streams_decode_identically_and_completely() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..2_000 {
        let input = valid_stream(&mut rng);

        let (frames, err) = decode_incremental(&mut rng, &input);

        assert!(err.is_none());
        let mut again = Vec::new();
        for f in &frames {
            encode_frame(&mut again, f.kind, f.stream, &f.payload, MAX).unwrap();
        }
        assert_eq!(again, input);
    }
}

#[test]
fn random_bytes_never_panic_and_stay_bounded() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    TRACKED.with(|t| t.set(true));
    for _ in 0..5_000 {
        let len = rng.below(2 * CHUNK_MAX);
        let mut input = rng.bytes(len);
        if rng.below(2) == 0 && input.len() >= 5 {
            // Plausible header: small length and a valid kind, so bodies get parsed.
            let l = rng.below(64) as u32;
            input[..4].copy_from_slice(&l.to_be_bytes());
            input[4] = 1 + rng.below(4) as u8;
        }
        run_case(&mut rng, &input);
    }
    TRACKED.with(|t| t.set(false));
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest > 0 && largest <= 2 * (MAX as usize + 2 * CHUNK_MAX),
        "allocation of {largest} bytes"
    );
}

#[test]
fn mutated_streams_never_panic_and_stay_bounded() {
    let mut rng = Rng(0x0bad_5eed_1357_9bdf);
    TRACKED.with(|t| t.set(true));
    for _ in 0..10_000 {
        let input = valid_stream(&mut rng);
        let input = mutate(&mut rng, input);
        run_case(&mut rng, &input);
    }
    TRACKED.with(|t| t.set(false));
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest > 0 && largest <= 2 * (MAX as usize + 2 * CHUNK_MAX),
        "allocation of {largest} bytes"
    );
}

#[test]
fn huge_announced_lengths_are_refused_without_allocating() {
    let mut rng = Rng(42);
    TRACKED.with(|t| t.set(true));
    for len in [u32::MAX, u32::MAX - 4, 1 << 31, MAX - 3, MAX] {
        let mut input = len.to_be_bytes().to_vec();
        input.extend([1, 0, 0, 0, 0]);

        let (frames, err) = decode_incremental(&mut rng, &input);

        assert!(frames.is_empty());
        assert!(err.unwrap().contains("exceeds the maximum"));
    }
    TRACKED.with(|t| t.set(false));
    assert!(LARGEST.load(Ordering::Relaxed) <= 2 * (MAX as usize + 2 * CHUNK_MAX));
}

#[test]
fn random_json_in_control_frames_never_panics() {
    let mut rng = Rng(7);
    let alphabet = br#"{}[]":,0123456789-.eE truefalsnl"typeexcidargvhloxt\u"#;
    for _ in 0..5_000 {
        let len = rng.below(200);
        let json: Vec<u8> = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();

        let result = Control::from_json(&json);

        if let Ok(Control::Exec(exec)) = result {
            let _ = exec.validate();
        }
    }
}
