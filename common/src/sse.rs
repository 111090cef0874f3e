//! A reader of Server-Sent Events (the WHATWG `text/event-stream` format), fed the body's
//! bytes as they arrive: the CLI's `--follow`, the tests and the worker read the master's
//! and the gateway's streams with it.

/// One message of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseMessage {
    /// `id:`, if the message had one.
    pub id: Option<String>,
    /// `event:`; `message` when absent.
    pub event: String,
    /// The `data:` lines, joined with newlines.
    pub data: String,
    /// `retry:` (ms), if given.
    pub retry_ms: Option<u64>,
}

/// The stream broke the format's bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an event-stream message passed {0} bytes")]
pub struct TooLarge(pub usize);

/// Turns bytes into messages. Lines may arrive cut anywhere, in any number of pieces.
#[derive(Debug)]
pub struct SseReader {
    /// Bytes of the line not finished yet.
    line: Vec<u8>,
    /// The message being read.
    current: SseMessage,
    /// Whether `current` has any field yet (a blank line after none is no message).
    started: bool,
    /// Bytes read into the message being read: more than `max` is an error.
    size: usize,
    max: usize,
    /// The last byte was a `\r`, so a `\n` next belongs to the same line end.
    after_cr: bool,
    /// `data:` lines read into the message being read.
    data_lines: usize,
}

impl SseReader {
    /// A reader refusing messages over `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            line: Vec::new(),
            current: SseMessage::default(),
            started: false,
            size: 0,
            max,
            after_cr: false,
            data_lines: 0,
        }
    }

    /// Reads `bytes`; returns the messages they completed, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseMessage>, TooLarge> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(m) = self.line_end(&line) {
                        out.push(m);
                    }
                }
                _ => {
                    self.size += 1;
                    if self.size > self.max {
                        return Err(TooLarge(self.max));
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(out)
    }

    fn line_end(&mut self, line: &[u8]) -> Option<SseMessage> {
        if line.is_empty() {
            let done = std::mem::take(&mut self.current);
            let started = std::mem::replace(&mut self.started, false);
            self.size = 0;
            self.data_lines = 0;
            return started.then(|| SseMessage {
                event: if done.event.is_empty() {
                    "message".into()
                } else {
                    done.event
                },
                ..done
            });
        }
        let line = String::from_utf8_lossy(line);
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => {
                if self.data_lines > 0 {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.data_lines += 1;
            }
            "event" => self.current.event = value.to_string(),
            "id" if !value.contains('\0') => self.current.id = Some(value.to_string()),
            "retry" => self.current.retry_ms = value.parse().ok(),
            _ => return None,
        }
        self.started = true;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_read_whatever_the_bytes_are_cut_into() {
        let text = ": hello\nretry: 2000\n\nid: 1-0.0\nevent: step.queued\ndata: {\"a\":\ndata: 1}\n\r\nid: 1-0.1\r\ndata: x\r\n\r\n";
        for cut in 1..text.len() {
            let mut r = SseReader::new(1024);
            let mut got = r.push(&text.as_bytes()[..cut]).unwrap();
            got.extend(r.push(&text.as_bytes()[cut..]).unwrap());
            assert_eq!(got.len(), 3, "cut at {cut}: {got:?}");
            assert_eq!(got[0].retry_ms, Some(2000));
            assert_eq!(got[1].id.as_deref(), Some("1-0.0"));
            assert_eq!(got[1].event, "step.queued");
            assert_eq!(got[1].data, "{\"a\":\n1}");
            assert_eq!(got[2].event, "message");
            assert_eq!(got[2].data, "x");
        }
    }

    #[test]
    fn a_message_over_the_bound_is_an_error_not_a_growing_buffer() {
        let mut r = SseReader::new(16);
        assert_eq!(r.push(b"data: 0123456789abcdef"), Err(TooLarge(16)));
    }
}
