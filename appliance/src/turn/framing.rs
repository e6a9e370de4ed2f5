//! Splitting a TURN-over-TCP (or TLS) byte stream into frames: STUN messages and ChannelData.
//!
//! RFC 8656 §12.5: over a stream, ChannelData is padded to a multiple of four bytes; STUN
//! messages always are. The engine's own TCP buffer ignores that padding, so the service frames
//! the stream here and feeds the engine one unpadded frame at a time. A stream that starts a
//! frame with anything else (the first two bits must be 00 for STUN, 01 for ChannelData) cannot
//! be resynchronised and is closed; so is a STUN header without the magic cookie.

/// Largest frame: a 16-bit length plus the STUN header.
pub const MAX_FRAME: usize = 20 + 65_535;

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// A stream that cannot be TURN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("stream is neither STUN nor ChannelData (first byte {0:#04x})")]
    NotTurn(u8),
    #[error("STUN message length {0} is not a multiple of 4")]
    BadLength(usize),
}

/// Accumulates stream bytes and yields complete frames.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    start: usize,
}

impl Framer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > MAX_FRAME {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes of a frame that is not complete yet.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, without ChannelData padding; `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FramingError> {
        let rest = &self.buf[self.start..];
        if rest.len() < 4 {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let (frame_len, consumed) = match rest[0] {
            0x00..=0x3f => {
                if rest.len() >= 8 && rest[4..8] != MAGIC_COOKIE {
                    return Err(FramingError::NotTurn(rest[0]));
                }
                if len % 4 != 0 {
                    return Err(FramingError::BadLength(len));
                }
                (20 + len, 20 + len)
            }
            // RFC 8656 §12 narrowed channel numbers to 0x4000..=0x4FFF, but RFC 5766 clients
            // (coturn's among them) still bind up to 0x7FFF, and the engine accepts them.
            0x40..=0x7f => (4 + len, 4 + len.div_ceil(4) * 4),
            _ => return Err(FramingError::NotTurn(rest[0])),
        };
        if rest.len() < consumed {
            return Ok(None);
        }
        let at = self.start;
        self.start += consumed;
        Ok(Some(&self.buf[at..at + frame_len]))
    }
}

/// Pads a ChannelData frame for a stream; STUN messages are returned unchanged.
pub fn pad_for_stream(mut frame: Vec<u8>) -> Vec<u8> {
    if frame.first().is_some_and(|b| b >> 6 == 1) {
        let padded = frame.len().div_ceil(4) * 4;
        frame.resize(padded, 0);
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun(len: u16) -> Vec<u8> {
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        m.extend_from_slice(&[7; 12]);
        m.extend(std::iter::repeat_n(0u8, usize::from(len)));
        m
    }

    #[test]
    fn frames_split_across_reads_and_joined_in_one_read() {
        let mut f = Framer::new();
        let a = stun(8);
        let mut chan = vec![0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
        let mut stream = a.clone();
        stream.append(&mut chan);
        stream.extend_from_slice(&stun(0));
        f.push(&stream[..10]);
        assert_eq!(f.next_frame(), Ok(None));
        f.push(&stream[10..]);
        assert_eq!(f.next_frame().expect("ok").map(<[u8]>::to_vec), Some(a));
        assert_eq!(
            f.next_frame().expect("ok").map(<[u8]>::to_vec),
            Some(vec![0x40, 0, 0, 5, 1, 2, 3, 4, 5])
        );
        assert_eq!(f.next_frame().expect("ok").map(<[u8]>::len), Some(20));
        assert_eq!(f.next_frame(), Ok(None));
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn garbage_stream_is_an_error_not_a_hang() {
        let mut f = Framer::new();
        f.push(&[0x80, 0, 0, 4, 1, 2, 3, 4]);
        assert_eq!(f.next_frame(), Err(FramingError::NotTurn(0x80)));
        let mut f = Framer::new();
        // A TLS ClientHello sent to the plain TCP port.
        f.push(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]);
        assert_eq!(f.next_frame(), Err(FramingError::NotTurn(0x16)));
        let mut f = Framer::new();
        f.push(&[0, 1, 0, 3, 0x21, 0x12, 0xa4, 0x42]);
        assert_eq!(f.next_frame(), Err(FramingError::BadLength(3)));
    }

    #[test]
    fn channel_data_is_padded_for_streams() {
        assert_eq!(pad_for_stream(vec![0x40, 0, 0, 1, 9]).len(), 8);
        assert_eq!(pad_for_stream(vec![0x40, 0, 0, 4, 1, 2, 3, 4]).len(), 8);
        assert_eq!(pad_for_stream(stun(4)).len(), 24);
    }
}
