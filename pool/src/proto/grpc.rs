//! gRPC's message framing, as far as the service config's size limits need it: each message
//! is a 1-byte compression flag and a 4-byte big-endian length, then that many bytes. The
//! scanner reads only the prefixes, across chunks cut anywhere, and copies nothing.

use std::fmt;

/// Follows a body's message prefixes and finds the first message longer than a limit.
#[derive(Debug, Clone)]
pub(crate) struct MessageLimit {
    max: u64,
    /// Which way the messages go, for the error: `request` or `response`.
    direction: &'static str,
    /// The prefix bytes read so far of the next message.
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
}

impl MessageLimit {
    pub(crate) fn new(max: u64, direction: &'static str) -> MessageLimit {
        MessageLimit { max, direction, prefix: [0; 5], have: 0, remaining: 0 }
    }

    /// Reads the next chunk of the body; the error if a message in it is over the limit.
    pub(crate) fn check(&mut self, mut chunk: &[u8]) -> Result<(), MessageTooLarge> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(chunk.len());
                self.remaining -= skip as u64;
                chunk = &chunk[skip..];
                continue;
            }
            let take = (5 - self.have).min(chunk.len());
            self.prefix[self.have..self.have + take].copy_from_slice(&chunk[..take]);
            self.have += take;
            chunk = &chunk[take..];
            if self.have == 5 {
                self.have = 0;
                let len = u64::from(u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]));
                if len > self.max {
                    return Err(MessageTooLarge { direction: self.direction, len, max: self.max });
                }
                self.remaining = len;
            }
        }
        Ok(())
    }
}

/// Follows a body's message prefixes to find where each message ends, so that a body can
/// hand its data out one message at a time.
#[derive(Debug, Clone, Default)]
pub(crate) struct MessageEnds {
    /// The prefix bytes read so far of the next message.
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
}

impl MessageEnds {
    /// Reads `chunk` up to the end of the first message that ends in it; how many bytes that
    /// is (all of them when none ends in it). The rest is for the next call.
    pub(crate) fn through_next_end(&mut self, chunk: &[u8]) -> usize {
        let mut read = 0;
        while read < chunk.len() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(chunk.len() - read);
                self.remaining -= skip as u64;
                read += skip;
                if self.remaining == 0 {
                    return read;
                }
                continue;
            }
            let take = (5 - self.have).min(chunk.len() - read);
            self.prefix[self.have..self.have + take].copy_from_slice(&chunk[read..read + take]);
            self.have += take;
            read += take;
            if self.have == 5 {
                self.have = 0;
                let [_, a, b, c, d] = self.prefix;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
                if self.remaining == 0 {
                    return read;
                }
            }
        }
        read
    }
}

/// A message over the service config's `maxRequestMessageBytes` or `maxResponseMessageBytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MessageTooLarge {
    pub(crate) direction: &'static str,
    pub(crate) len: u64,
    pub(crate) max: u64,
}

impl fmt::Display for MessageTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field =
            if self.direction == "request" { "maxRequestMessageBytes" } else { "maxResponseMessageBytes" };
        write!(
            f,
            "a {} message of {} bytes is over the service config's {field} ({} bytes)",
            self.direction, self.len, self.max
        )
    }
}

impl std::error::Error for MessageTooLarge {}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7, len as usize));
        bytes
    }

    #[test]
    fn finds_each_message_end_however_the_chunks_are_cut() {
        let lens = [10u32, 0, 16, 1, 3];
        let body: Vec<u8> = lens.iter().flat_map(|len| message(*len)).collect();
        let ends: Vec<usize> = lens
            .iter()
            .scan(0, |at, len| {
                *at += 5 + *len as usize;
                Some(*at)
            })
            .collect();
        for cut in 1..=body.len() {
            let (mut ends_seen, mut cuts, mut at) = (Vec::new(), MessageEnds::default(), 0);
            for chunk in body.chunks(cut) {
                let mut chunk = chunk;
                while !chunk.is_empty() {
                    let read = cuts.through_next_end(chunk);
                    at += read;
                    chunk = &chunk[read..];
                    if cuts.have == 0 && cuts.remaining == 0 {
                        ends_seen.push(at);
                    }
                }
            }
            assert_eq!(ends_seen, ends, "chunks of {cut}");
        }
    }

    #[test]
    fn finds_the_first_message_over_the_limit_however_the_chunks_are_cut() {
        let body: Vec<u8> = [message(10), message(0), message(16), message(17), message(3)].concat();
        for cut in 1..=body.len() {
            let mut limit = MessageLimit::new(16, "response");
            let found = body.chunks(cut).find_map(|chunk| limit.check(chunk).err());
            assert_eq!(
                found,
                Some(MessageTooLarge { direction: "response", len: 17, max: 16 }),
                "chunks of {cut}"
            );
        }
        let mut limit = MessageLimit::new(17, "request");
        assert!(body.chunks(3).all(|chunk| limit.check(chunk).is_ok()));
    }
}
