//! A minimal, allocation-free netlink message writer.
//!
//! Why not `netlink-packet-netfilter`'s `Emitable` types for encoding: they
//! build a tree of owned `Vec`/`String` nodes per attribute and measure it
//! twice before emitting, which is about 7× slower than libnftnl
//! (netlink.md). Rules are by far the most numerous messages (10,000 chains ×
//! 10 rules must encode in well under a second), so we write the bytes
//! straight into one growing buffer and back-patch lengths. The typed crate
//! is still used for everything we *read* (see `decode.rs`).

/// `NLA_F_NESTED`.
pub const NLA_F_NESTED: u16 = 1 << 15;
/// Largest value an attribute's 16-bit length field can hold.
pub const NLA_MAX_LEN: usize = u16::MAX as usize;

pub const NLMSG_HDRLEN: usize = 16;

#[inline]
pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends netlink messages and attributes to one buffer.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    pub buf: Vec<u8>,
    /// Set when a nest grew past 64 KiB: its length field cannot represent
    /// it, so the message must not be sent (callers check `overflowed`).
    overflow: bool,
}

impl Writer {
    pub fn with_capacity(n: usize) -> Writer {
        Writer {
            buf: Vec::with_capacity(n),
            overflow: false,
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// Starts a netfilter message: `nlmsghdr` (length patched by
    /// [`Writer::end_msg`], sequence number patched at send time) followed by
    /// `nfgenmsg`. Returns the message's start offset.
    pub fn begin_msg(&mut self, nlmsg_type: u16, flags: u16, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len
        self.buf.extend_from_slice(&nlmsg_type.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    pub fn end_msg(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// One attribute with a raw value, padded to 4 bytes.
    #[inline]
    pub fn put(&mut self, kind: u16, value: &[u8]) {
        let len = 4 + value.len();
        if len > NLA_MAX_LEN {
            self.overflow = true;
        }
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    #[inline]
    pub fn put_u32_be(&mut self, kind: u16, v: u32) {
        self.put(kind, &v.to_be_bytes());
    }

    #[inline]
    pub fn put_u64_be(&mut self, kind: u16, v: u64) {
        self.put(kind, &v.to_be_bytes());
    }

    #[inline]
    pub fn put_u16_be(&mut self, kind: u16, v: u16) {
        self.put(kind, &v.to_be_bytes());
    }

    /// A NUL-terminated string attribute (`NLA_STRING` as the kernel and
    /// libnftnl write them).
    #[inline]
    pub fn put_str(&mut self, kind: u16, s: &str) {
        let len = 4 + s.len() + 1;
        if len > NLA_MAX_LEN {
            self.overflow = true;
        }
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    /// Opens a nested attribute; close it with [`Writer::nest_end`].
    #[inline]
    pub fn nest_start(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        start
    }

    #[inline]
    pub fn nest_end(&mut self, start: usize) {
        let len = self.buf.len() - start;
        if len > NLA_MAX_LEN {
            self.overflow = true;
        }
        self.buf[start..start + 2].copy_from_slice(&(len as u16).to_ne_bytes());
    }

    /// Drops everything written after `pos` (used to move an element that
    /// would overflow a nest into the next message).
    pub fn truncate(&mut self, pos: usize) {
        self.buf.truncate(pos);
    }

    #[inline]
    fn pad(&mut self) {
        let n = align4(self.buf.len()) - self.buf.len();
        self.buf.extend_from_slice(&[0u8; 3][..n]);
    }
}

/// Iterates the attributes in `buf` as `(kind without flags, value)`.
/// Malformed trailing bytes end the iteration (the kernel never sends them;
/// decoders treat missing attributes as "not ours").
pub struct AttrIter<'a> {
    buf: &'a [u8],
}

impl<'a> AttrIter<'a> {
    pub fn new(buf: &'a [u8]) -> AttrIter<'a> {
        AttrIter { buf }
    }
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([self.buf[0], self.buf[1]]) as usize;
        let kind = u16::from_ne_bytes([self.buf[2], self.buf[3]]) & 0x3fff;
        if len < 4 || len > self.buf.len() {
            self.buf = &[];
            return None;
        }
        let value = &self.buf[4..len];
        let next = align4(len).min(self.buf.len());
        self.buf = &self.buf[next..];
        Some((kind, value))
    }
}

/// A NUL-terminated string attribute's text.
pub fn c_str(v: &[u8]) -> String {
    let s = v.split(|&c| c == 0).next().unwrap_or(&[]);
    String::from_utf8_lossy(s).into_owned()
}

/// A big-endian `u32` attribute's value.
pub fn be_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

/// A big-endian `u64` attribute's value.
pub fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nests_and_padding() {
        let mut w = Writer::default();
        let m = w.begin_msg(0x0a00, 1, 2, 0);
        w.put_str(1, "nftpolicy");
        let n = w.nest_start(4);
        w.put_u32_be(1, 7);
        w.nest_end(n);
        w.end_msg(m);
        assert_eq!(w.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(w.buf[0..4].try_into().unwrap()) as usize,
            w.len()
        );
        let attrs: Vec<_> = AttrIter::new(&w.buf[20..]).collect();
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0], (1, &b"nftpolicy\0"[..]));
        assert_eq!(attrs[1].0, 4);
        let inner: Vec<_> = AttrIter::new(attrs[1].1).collect();
        assert_eq!(inner, vec![(1, &7u32.to_be_bytes()[..])]);
        assert!(!w.overflowed());
    }
}
