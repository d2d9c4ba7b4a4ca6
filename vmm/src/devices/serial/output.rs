//! Where console bytes go: buffered per line, and capped so a guest cannot fill the
//! host's disk through its console.

use std::io::Write;

/// Most bytes a guest may write to its console.
pub const CONSOLE_LIMIT: u64 = 16 << 20;

/// A line-buffered, size-capped writer.
pub struct ConsoleOutput {
    inner: Box<dyn Write + Send>,
    line: Vec<u8>,
    remaining: u64,
}

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOutput")
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl ConsoleOutput {
    /// Write to `inner`, at most `limit` bytes in total.
    pub fn new(inner: Box<dyn Write + Send>, limit: u64) -> Self {
        Self {
            inner,
            line: Vec::with_capacity(256),
            remaining: limit,
        }
    }

    fn push_line(&mut self) -> std::io::Result<()> {
        if self.line.is_empty() {
            return Ok(());
        }
        let result = self
            .inner
            .write_all(&self.line)
            .and_then(|()| self.inner.flush());
        self.line.clear();
        result
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &byte in buf {
            if self.remaining == 0 {
                break;
            }
            self.remaining -= 1;
            self.line.push(byte);
            if byte == b'\n' || self.line.len() >= 4096 {
                self.push_line()?;
            }
        }
        // Bytes past the cap are dropped, not refused: the guest must not stall.
        Ok(buf.len())
    }

    /// The UART flushes after every byte; real flushing happens per line.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleOutput {
    fn drop(&mut self) {
        let _ = self.push_line();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_is_passed_on_a_line_at_a_time() {
        let sink = Sink::default();
        let mut out = ConsoleOutput::new(Box::new(sink.clone()), CONSOLE_LIMIT);

        for b in b"ab\ncd" {
            out.write_all(&[*b]).unwrap();
            out.flush().unwrap();
        }
        let before_drop = sink.0.lock().unwrap().clone();
        drop(out);

        assert_eq!(before_drop, vec![b"ab\n".to_vec()]);
        assert_eq!(sink.0.lock().unwrap().last().unwrap(), b"cd");
    }

    #[test]
    fn output_beyond_the_limit_is_dropped() {
        let sink = Sink::default();
        let mut out = ConsoleOutput::new(Box::new(sink.clone()), 4);

        let accepted = out.write(b"12345678\n").unwrap();
        drop(out);

        assert_eq!(accepted, 9);
        assert_eq!(sink.0.lock().unwrap().concat(), b"1234");
    }
}
