//! RFC 4571 framing for ICE-TCP: each packet on the TCP stream is preceded by its length as a
//! 16-bit big-endian number. Sans-I/O: bytes in, whole packets out; a stream that announces a
//! packet larger than the limit is reported as broken rather than buffered.

/// Largest packet one frame can carry.
pub const MAX_FRAME: usize = u16::MAX as usize;

/// Reassembles packets from a TCP byte stream.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    at: usize,
}

impl FrameReader {
    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.at > 0 && self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next whole packet, if one has arrived.
    pub fn next_frame(&mut self) -> Option<&[u8]> {
        let rest = self.buf.get(self.at..)?;
        if rest.len() < 2 {
            self.compact();
            return None;
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        if rest.len() < 2 + len {
            self.compact();
            return None;
        }
        let start = self.at + 2;
        self.at = start + len;
        self.buf.get(start..start + len)
    }

    /// Bytes held that do not yet form a packet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.at
    }

    fn compact(&mut self) {
        if self.at > 0 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
    }
}

/// Appends `packet` with its length prefix to `out`; false if it is too large to frame.
pub fn frame(packet: &[u8], out: &mut Vec<u8>) -> bool {
    let Ok(len) = u16::try_from(packet.len()) else {
        return false;
    };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(packet);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_split_and_joined_across_reads_come_out_whole() {
        let mut wire = Vec::new();
        for i in 0..5u8 {
            assert!(frame(&vec![i; 100 * usize::from(i)], &mut wire));
        }
        for chunk in [1usize, 3, 7, 500] {
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                r.push(piece);
                while let Some(p) = r.next_frame() {
                    got.push(p.to_vec());
                }
            }
            assert_eq!(got.len(), 5, "chunk {chunk}");
            for (i, p) in got.iter().enumerate() {
                assert_eq!(p, &vec![i as u8; 100 * i]);
            }
            assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn oversized_packets_are_not_framed() {
        let mut out = Vec::new();
        assert!(!frame(&vec![0; MAX_FRAME + 1], &mut out));
        assert!(out.is_empty());
    }
}
