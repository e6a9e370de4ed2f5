//! UDP I/O for the media workers behind one narrow trait, [`DatagramIo`], so that a later
//! io_uring backend (multishot receive, provided buffers) can replace the batched-syscall one
//! without the worker noticing.
//!
//! [`MmsgSocket`] is the default backend: `recvmmsg` for receiving a batch, `sendmmsg` for
//! sending one, and UDP GSO (`UDP_SEGMENT`) to fold a run of equal-sized datagrams to one
//! destination into a single message when the kernel supports it. It owns no policy: what to
//! send and what a datagram means is the worker's business.

use std::io;
use std::mem;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

/// Largest datagram a worker receives; larger ones are truncated by the kernel and then fail
/// to parse, which is the right outcome for media.
pub const MAX_DATAGRAM: usize = 2048;

/// Most datagrams moved by one call.
pub const BATCH: usize = 32;

/// Most segments folded into one GSO message (the kernel allows 64).
const MAX_GSO_SEGMENTS: usize = 32;

/// One datagram to send.
#[derive(Debug, Clone)]
pub struct OutDatagram {
    pub destination: SocketAddr,
    pub data: Vec<u8>,
}

/// What `recv_batch` learned about one received datagram.
#[derive(Debug, Clone, Copy)]
pub struct RecvMeta {
    pub len: usize,
    pub source: SocketAddr,
}

/// The operations a media worker needs from its socket.
pub trait DatagramIo {
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// A descriptor that becomes readable when datagrams are waiting (for poll/epoll).
    fn readiness_fd(&self) -> RawFd;
    /// Receives up to `bufs.len()` datagrams without blocking; `Ok(0)` when none are waiting.
    fn recv_batch(&mut self, bufs: &mut [Vec<u8>], meta: &mut [RecvMeta]) -> io::Result<usize>;
    /// Sends `out` in order without blocking; returns how many were handed to the kernel
    /// (fewer when its buffer is full; the caller drops the rest, as a router would).
    fn send_batch(&mut self, out: &[OutDatagram]) -> io::Result<usize>;
}

/// A non-blocking UDP socket driven with `recvmmsg`/`sendmmsg` and GSO.
pub struct MmsgSocket {
    socket: UdpSocket,
    gso: bool,
}

impl MmsgSocket {
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let gso = gso_supported(socket.as_raw_fd());
        Ok(Self { socket, gso })
    }

    pub fn gso_enabled(&self) -> bool {
        self.gso
    }

    /// Turns GSO off (for tests, or when the NIC path refuses it).
    pub fn disable_gso(&mut self) {
        self.gso = false;
    }
}

fn gso_supported(fd: RawFd) -> bool {
    let mut val: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0
}

fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

impl DatagramIo for MmsgSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn readiness_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn recv_batch(&mut self, bufs: &mut [Vec<u8>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        let n = bufs.len().min(meta.len()).min(BATCH);
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: zeroed sockaddr_storage/iovec/mmsghdr are valid "empty" values.
        let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { mem::zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for i in 0..n {
            bufs[i].resize(MAX_DATAGRAM, 0);
            iovs[i] = libc::iovec {
                iov_base: bufs[i].as_mut_ptr().cast(),
                iov_len: bufs[i].len(),
            };
            hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as u32;
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at live buffers of the stated sizes for this call.
        let r = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let mut got = 0;
        for i in 0..r as usize {
            // Datagrams from an unknown address family are skipped, not reported.
            if let Some(source) = from_sockaddr(&addrs[i]) {
                let len = (hdrs[i].msg_len as usize).min(MAX_DATAGRAM);
                if got != i {
                    bufs.swap(got, i);
                }
                meta[got] = RecvMeta { len, source };
                got += 1;
            }
        }
        Ok(got)
    }

    fn send_batch(&mut self, out: &[OutDatagram]) -> io::Result<usize> {
        let mut sent = 0;
        while sent < out.len() {
            match self.send_some(&out[sent..]) {
                Ok(0) => break,
                Ok(k) => sent += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if self.gso && e.raw_os_error() == Some(libc::EIO) => {
                    // The device refused segmentation offload; fall back for good.
                    self.gso = false;
                }
                Err(e) => {
                    // One bad destination (e.g. unreachable) must not stall the rest: skip it.
                    tracing::trace!(error = %e, dest = %out[sent].destination, "send failed");
                    sent += 1;
                }
            }
        }
        Ok(sent)
    }
}

/// A level-triggered epoll set over a few fixed descriptors, for a worker's wait.
///
/// A worker used to `poll(2)` its socket, eventfd and ICE-TCP listener on every loop turn: the
/// kernel then looked up and polled all three each time (about a tenth of the SFU's CPU in the
/// profile of a 1 → 40 fan-out). Registered once, epoll only reports what is ready.
pub struct Epoll {
    fd: std::os::fd::OwnedFd,
}

impl Epoll {
    /// Registers each descriptor for readability with its token (a bit index below 64).
    pub fn new(fds: &[(RawFd, u32)]) -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor we own from here on.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        for &(target, token) in fds {
            if token >= 64 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("epoll token {token} for fd {target}: tokens are bit indexes 0..64"),
                ));
            }
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: u64::from(token),
            };
            // SAFETY: registers a live descriptor; the kernel copies `ev`.
            let r = unsafe { libc::epoll_ctl(raw, libc::EPOLL_CTL_ADD, target, &mut ev) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self { fd })
    }

    /// The epoll descriptor itself (readable when any registered descriptor is).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Waits up to `timeout_ms` (0: do not block) and returns the ready tokens as a bit set.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<u64> {
        // SAFETY: an all-zero epoll_event is a valid value.
        let mut evs: [libc::epoll_event; 8] = unsafe { mem::zeroed() };
        // SAFETY: the kernel writes at most evs.len() entries into the live array.
        let r = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                evs.as_mut_ptr(),
                evs.len() as libc::c_int,
                timeout_ms,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(evs[..r as usize]
            .iter()
            .fold(0u64, |set, e| set | 1u64 << (e.u64 & 63)))
    }
}

/// Space for one cmsg carrying a u16 (UDP_SEGMENT).
const CMSG_SPACE: usize = 32;

impl MmsgSocket {
    /// One `sendmmsg` over the front of `out`; returns how many datagrams went.
    fn send_some(&mut self, out: &[OutDatagram]) -> io::Result<usize> {
        // Group runs to one destination of equal size (the last of a run may be shorter).
        let mut groups: Vec<(usize, usize)> = Vec::with_capacity(BATCH);
        let mut i = 0;
        while i < out.len() && groups.len() < BATCH {
            let mut j = i + 1;
            if self.gso {
                let size = out[i].data.len();
                while j < out.len()
                    && j - i < MAX_GSO_SEGMENTS
                    && out[j].destination == out[i].destination
                    && out[j].data.len() <= size
                    && (j - i + 1) * size <= 65_000
                {
                    let shorter = out[j].data.len() < size;
                    j += 1;
                    if shorter {
                        break;
                    }
                }
            }
            groups.push((i, j));
            i = j;
        }
        let total_iov: usize = groups.iter().map(|(a, b)| b - a).sum();
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(total_iov);
        let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
            Vec::with_capacity(groups.len());
        let mut cmsgs: Vec<[u8; CMSG_SPACE]> = vec![[0u8; CMSG_SPACE]; groups.len()];
        for &(a, b) in &groups {
            addrs.push(to_sockaddr(&out[a].destination));
            for d in &out[a..b] {
                iovs.push(libc::iovec {
                    iov_base: d.data.as_ptr() as *mut libc::c_void,
                    iov_len: d.data.len(),
                });
            }
        }
        // SAFETY: zeroed mmsghdr is a valid empty header.
        let mut hdrs: Vec<libc::mmsghdr> = (0..groups.len())
            .map(|_| unsafe { mem::zeroed::<libc::mmsghdr>() })
            .collect();
        let mut at = 0;
        for (g, &(a, b)) in groups.iter().enumerate() {
            let h = &mut hdrs[g].msg_hdr;
            h.msg_name = (&mut addrs[g].0 as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = addrs[g].1;
            h.msg_iov = iovs[at..].as_mut_ptr();
            h.msg_iovlen = b - a;
            at += b - a;
            if b - a > 1 {
                let seg = out[a].data.len() as u16;
                let buf = &mut cmsgs[g];
                // SAFETY: the buffer is large enough for one cmsg with a u16 payload
                // (CMSG_SPACE(2) is 24 on 64-bit Linux) and lives until sendmmsg returns.
                unsafe {
                    h.msg_control = buf.as_mut_ptr().cast();
                    h.msg_controllen = libc::CMSG_SPACE(mem::size_of::<u16>() as u32) as usize;
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
                }
            }
        }
        // SAFETY: every header points into `iovs`, `addrs` and `cmsgs`, alive for the call.
        let r = unsafe {
            libc::sendmmsg(
                self.socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(groups[..r as usize].iter().map(|(a, b)| b - a).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn pair() -> (MmsgSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
        b.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        (MmsgSocket::new(a).expect("mmsg"), b)
    }

    fn send_and_collect(s: &mut MmsgSocket, peer: &UdpSocket, out: &[OutDatagram]) -> Vec<Vec<u8>> {
        assert_eq!(s.send_batch(out).expect("send"), out.len());
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < out.len() {
            let (n, _) = peer.recv_from(&mut buf).expect("recv");
            got.push(buf[..n].to_vec());
        }
        got
    }

    #[test]
    fn a_batch_reaches_several_destinations_in_order() {
        let (mut s, peer) = pair();
        let dest = peer.local_addr().expect("addr");
        let out: Vec<OutDatagram> = (0..40u8)
            .map(|i| OutDatagram {
                destination: dest,
                data: vec![i; 100 + usize::from(i)],
            })
            .collect();
        let got = send_and_collect(&mut s, &peer, &out);
        assert_eq!(got, out.iter().map(|d| d.data.clone()).collect::<Vec<_>>());
    }

    #[test]
    fn gso_runs_arrive_as_separate_datagrams_with_the_short_tail() {
        let (mut s, peer) = pair();
        if !s.gso_enabled() {
            eprintln!("kernel without UDP GSO; checking the plain path only");
        }
        let dest = peer.local_addr().expect("addr");
        let mut out: Vec<OutDatagram> = (0..10u8)
            .map(|i| OutDatagram {
                destination: dest,
                data: vec![i; 1000],
            })
            .collect();
        out.push(OutDatagram {
            destination: dest,
            data: vec![99; 300],
        });
        let got = send_and_collect(&mut s, &peer, &out);
        assert_eq!(got.len(), 11);
        assert_eq!(got[10], vec![99; 300]);
        assert!(got[..10].iter().all(|d| d.len() == 1000));
    }

    #[test]
    fn epoll_reports_only_the_ready_descriptor() {
        let (s, peer) = pair();
        let other = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let ep = Epoll::new(&[(s.readiness_fd(), 0), (other.as_raw_fd(), 5)]).expect("epoll");
        assert_eq!(ep.wait(0).expect("wait"), 0);
        peer.send_to(b"x", other.local_addr().expect("addr"))
            .expect("send");
        assert_eq!(ep.wait(2000).expect("wait"), 1 << 5);
        // Level-triggered: still reported until read.
        assert_eq!(ep.wait(0).expect("wait"), 1 << 5);
        assert!(Epoll::new(&[(s.readiness_fd(), 64)]).is_err());
    }

    #[test]
    fn recv_batch_reports_sources_and_lengths() {
        let (mut s, peer) = pair();
        let to = s.local_addr().expect("addr");
        for i in 0..5u8 {
            peer.send_to(&vec![i; 10 + usize::from(i)], to)
                .expect("send");
        }
        let mut bufs = vec![Vec::new(); BATCH];
        let mut meta = vec![RecvMeta { len: 0, source: to }; BATCH];
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut total = 0;
        while total < 5 && Instant::now() < deadline {
            let n = s
                .recv_batch(&mut bufs[total..], &mut meta[total..])
                .expect("recv");
            total += n;
        }
        assert_eq!(total, 5);
        for (i, m) in meta[..5].iter().enumerate() {
            assert_eq!(m.len, 10 + i);
            assert_eq!(m.source, peer.local_addr().expect("addr"));
        }
    }
}
